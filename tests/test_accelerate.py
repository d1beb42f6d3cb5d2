"""accelerate: XLA SavedModel, TFLite with threads, and honest skips on a CPU-only host."""

import numpy as np
import pydantic
import pytest

from kfopt import _tf
from kfopt.convert import to_saved_model
from kfopt.errors import TechniqueSkipped
from kfopt.plugins import ModelHandle
from kfopt.plugins.accelerate import Accelerate, is_xla_compiled, with_policy


def _apply(model, ctx, **config):
    return Accelerate().apply(ModelHandle.from_keras(model), Accelerate.Config(**config), ctx)


def test_xla_backend_gives_a_jit_compiled_saved_model_that_predicts_like_keras(mlp, digits_flat, ctx_factory):
    tf = _tf.tf()
    result = _apply(mlp, ctx_factory(digits_flat), backend="xla")
    assert result.format == "saved_model"
    assert is_xla_compiled(result.saved_model_path())
    assert result.info["params"] == mlp.count_params()

    serve = tf.saved_model.load(str(result.saved_model_path())).signatures["serving_default"]
    x, _ = digits_flat.test.arrays()
    compiled = serve(input=tf.constant(x))["output"].numpy()
    agreement = (compiled.argmax(1) == mlp.predict(x, verbose=0).argmax(1)).mean()
    assert agreement > 0.99


def test_xla_check_tells_a_plain_saved_model_apart(mlp, tmp_path):
    assert not is_xla_compiled(to_saved_model(mlp, tmp_path / "plain"))


@pytest.mark.slow
def test_tflite_backend_matches_keras_and_carries_threads(cnn, digits_images, ctx_factory):
    tf = _tf.tf()
    result = _apply(cnn, ctx_factory(digits_images), backend="tflite", threads=2)
    assert result.format == "tflite" and result.info["threads"] == 2

    interpreter = tf.lite.Interpreter(model_content=result.tflite(), num_threads=result.info["threads"])
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    x, _ = digits_images.test.arrays()
    x = x[:100]
    predictions = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None])
        interpreter.invoke()
        predictions.append(interpreter.get_tensor(out["index"])[0].argmax())
    agreement = (np.array(predictions) == cnn.predict(x, verbose=0).argmax(1)).mean()
    assert agreement > 0.99


def test_mixed_precision_is_skipped_on_a_cpu_host(mlp, digits_flat, ctx_factory):
    with pytest.raises(TechniqueSkipped, match="GPU"):
        _apply(mlp, ctx_factory(digits_flat), backend="mixed_precision")


def test_tensorrt_is_skipped_with_the_reason(mlp, digits_flat, ctx_factory):
    with pytest.raises(TechniqueSkipped, match="TF-TRT cannot run on this host: no NVIDIA GPU") as skipped:
        _apply(mlp, ctx_factory(digits_flat), backend="tensorrt")
    assert "tensorrt" in skipped.value.reason


def test_mixed_precision_rebuild_keeps_the_output_float32(mlp, digits_flat):
    """The GPU/TPU path, exercised on CPU: float16 compute, float32 variables and output."""
    keras = _tf.keras()
    before = keras.mixed_precision.global_policy().name
    mixed = with_policy(mlp, "mixed_float16")
    assert keras.mixed_precision.global_policy().name == before  # restored
    assert [layer.dtype_policy.name for layer in mixed.layers] == ["mixed_float16", "mixed_float16", "float32"]
    assert mixed.output.dtype.name == "float32"
    x, _ = digits_flat.test.arrays()
    agreement = (mixed.predict(x, verbose=0).argmax(1) == mlp.predict(x, verbose=0).argmax(1)).mean()
    assert agreement > 0.98


@pytest.mark.parametrize(
    "backend, produces, trains",
    [
        ("xla", "saved_model", False),
        ("tflite", "tflite", False),
        ("mixed_precision", "keras", True),
        ("tensorrt", "saved_model", False),
    ],
)
def test_format_and_placement_depend_on_backend(backend, produces, trains):
    config = Accelerate.Config(backend=backend)
    assert Accelerate().produces_for(config) == produces
    assert Accelerate().trains_for(config) is trains


@pytest.mark.parametrize("bad", [{"backend": "onnx"}, {"threads": 0}, {"backend": "xla", "threads": 4}, {"thread": 2}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(pydantic.ValidationError):
        Accelerate.Config(**bad)


def test_config_defaults_and_docs():
    config = Accelerate.Config()
    assert (config.backend, config.threads) == ("xla", 1)
    assert all(field.description for field in Accelerate.Config.model_fields.values())
