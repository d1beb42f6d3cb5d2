"""The built-in quantize technique: every mode yields a TFLite model that runs and stays accurate."""

from __future__ import annotations

import gzip

import numpy as np
import pydantic
import pytest
from conftest import accuracy, clone

from kfopt import _tf
from kfopt.errors import KfoptError
from kfopt.plugins import ModelHandle
from kfopt.plugins import quantize as quantize_module
from kfopt.plugins.prune import threshold_global
from kfopt.plugins.quantize import Quantize
from kfopt.sparsity import weight_sparsity

# tf.lite.Interpreter still works in TF 2.21; kfopt's evaluator decides on its successor.
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")


def interpreter(tflite_bytes):
    tf = _tf.tf()
    it = tf.lite.Interpreter(model_content=tflite_bytes)
    it.allocate_tensors()
    return it


def tflite_accuracy(tflite_bytes, data) -> float:
    """Test accuracy of a TFLite model, quantizing inputs when the model takes int8."""
    it = interpreter(tflite_bytes)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    x, y = data.test.arrays()
    if inp["dtype"] == np.int8:
        scale, zero_point = inp["quantization"]
        x = np.clip(np.round(x / scale + zero_point), -128, 127)
    it.resize_tensor_input(inp["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.astype(inp["dtype"]))
    it.invoke()
    # Argmax is unaffected by the int8 output's (positive) scale, so no dequantizing.
    return float((it.get_tensor(out["index"]).argmax(axis=1) == y).mean())


def kernel_sparsity(tflite_bytes) -> float:
    """Fraction of zeros in the Dense layers' weight tensors stored in the flatbuffer."""
    it = interpreter(tflite_bytes)
    kernels = [
        it.get_tensor(d["index"])
        for d in it.get_tensor_details()
        if "MatMul" in d["name"] and len(d["shape"]) == 2 and d["shape"][0] > 1
    ]
    assert kernels, "no Dense weight tensors found"
    return sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)


def run(model, data, ctx_factory, **config):
    return Quantize().apply(
        ModelHandle.from_keras(model, info={"from": "test"}), Quantize.Config(**config), ctx_factory(data)
    )


@pytest.fixture(scope="module")
def sparse_mlp(mlp):
    """The mlp with its 80% smallest kernel weights zeroed (a stand-in for a pruned model)."""
    model = clone(mlp)
    model.set_weights(threshold_global(model.get_weights(), 0.8))
    return model


def test_registers_through_the_hook():
    registered = []
    quantize_module.kfopt_register_techniques(register=registered.append)
    (technique,) = registered
    assert (technique.name, technique.kind, technique.accepts, technique.produces) == (
        "quantize",
        "quantize",
        {"keras", "saved_model"},  # post-training modes take a SavedModel through its signature
        "tflite",
    )
    assert technique.trains_for(Quantize.Config(mode="qat"))
    assert not technique.trains_for(Quantize.Config(mode="int8"))


@pytest.mark.parametrize("bad", [{"mode": "int4"}, {"bits": 8}, {"calibration_samples": 0}])
def test_config_rejects(bad):
    with pytest.raises(pydantic.ValidationError):
        Quantize.Config(**bad)


@pytest.mark.parametrize("mode", ["dynamic", "float16", "int8"])
def test_post_training_modes_run_and_keep_accuracy(mode, mlp, digits_flat, ctx_factory):
    out = run(mlp, digits_flat, ctx_factory, mode=mode, calibration_samples=100)

    assert out.format == "tflite"
    assert out.info == {"from": "test", "sparsity": 0.0, "params": mlp.count_params(), "quantization": mode}
    assert tflite_accuracy(out.tflite(), digits_flat) >= accuracy(mlp, digits_flat) - 0.02
    io_types = {
        d["dtype"]
        for d in (*interpreter(out.tflite()).get_input_details(), *interpreter(out.tflite()).get_output_details())
    }
    assert io_types == ({np.int8} if mode == "int8" else {np.float32})


def test_int8_keeps_zero_weights_of_a_pruned_model(mlp, sparse_mlp, digits_flat, ctx_factory):
    dense = run(mlp, digits_flat, ctx_factory, mode="int8").tflite()
    out = run(sparse_mlp, digits_flat, ctx_factory, mode="int8")

    assert out.info["sparsity"] == pytest.approx(0.8, abs=0.005)
    assert kernel_sparsity(out.tflite()) >= 0.8
    assert len(gzip.compress(out.tflite())) < 0.5 * len(gzip.compress(dense))


def test_qat_yields_accurate_int8_model(mlp, digits_flat, ctx_factory):
    before = clone(mlp)
    out = run(mlp, digits_flat, ctx_factory, mode="qat", epochs=1)

    it = interpreter(out.tflite())
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert it.get_output_details()[0]["dtype"] == np.int8
    assert out.info["quantization"] == "qat"
    assert tflite_accuracy(out.tflite(), digits_flat) >= accuracy(mlp, digits_flat) - 0.03
    for got, want in zip(mlp.get_weights(), before.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_qat_preserves_sparsity_of_a_pruned_model(sparse_mlp, digits_flat, ctx_factory):
    out = run(sparse_mlp, digits_flat, ctx_factory, mode="qat", epochs=1)

    assert kernel_sparsity(out.tflite()) >= 0.8
    assert out.info["sparsity"] == pytest.approx(weight_sparsity(sparse_mlp))


def test_qat_float_layers_stay_float_and_the_others_int8(mlp, sparse_mlp, digits_flat, ctx_factory):
    kept = mlp.layers[-1].name
    out = run(sparse_mlp, digits_flat, ctx_factory, mode="qat", epochs=1, float_layers=[kept])

    it = interpreter(out.tflite())
    weights = {
        d["name"]: d["dtype"]
        for d in it.get_tensor_details()
        if "MatMul" in d["name"] and len(d["shape"]) == 2 and d["shape"][0] > 1
    }  # kernels, not activations
    assert [dtype for name, dtype in weights.items() if f"/{kept}/" in name] == [np.float32]
    assert sorted(dtype.__name__ for name, dtype in weights.items() if f"/{kept}/" not in name) == ["int8", "int8"]
    assert it.get_input_details()[0]["dtype"] == np.float32  # float layers need float inputs/outputs around them
    assert tflite_accuracy(out.tflite(), digits_flat) >= accuracy(sparse_mlp, digits_flat) - 0.03
    assert kernel_sparsity(out.tflite()) >= 0.8  # the float layer was not trained, so it kept its zeros too


def test_float_layers_unknown_name_or_without_qat_is_a_user_error(mlp, digits_flat, ctx_factory):
    names = [layer.name for layer in mlp.layers]
    with pytest.raises(KfoptError) as err:
        run(mlp, digits_flat, ctx_factory, mode="qat", epochs=1, float_layers=[names[0] + "x"])
    assert f"no layer with weights named '{names[0]}x'. Did you mean" in str(err.value)
    assert f"Layers with weights: {', '.join(names)}." in str(err.value)
    with pytest.raises(pydantic.ValidationError, match="float_layers applies to mode=qat only"):
        Quantize.Config(mode="int8", float_layers=["dense"])


def _conv_model():
    """Rescaling, a conv folded with its BatchNorm, a BatchNorm after an activation, a squeeze-excite Multiply."""
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = layers.Rescaling(1.0, name="scale")(inputs)
    x = layers.BatchNormalization(name="folded")(layers.Conv2D(8, 3, strides=2, name="conv")(x))
    x = layers.BatchNormalization(name="after_relu")(layers.ReLU()(x))
    gate = layers.Dense(8, activation="sigmoid", name="gate")(layers.GlobalAveragePooling2D()(x))
    x = layers.Multiply(name="excite")([x, layers.Reshape((1, 1, 8))(gate)])
    outputs = layers.Dense(10, activation="softmax", name="head")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="conv_model")


def test_qat_trains_what_tfmot_supports_and_names_what_stays_float(digits_images, ctx_factory):
    out = run(_conv_model(), digits_images, ctx_factory, mode="qat", epochs=1, calibration_samples=16)
    assert out.info["float_layers"] == {
        "scale": "tfmot's 8-bit scheme has no Rescaling",
        "after_relu": "tfmot quantizes BatchNormalization only right after a linear Conv or Dense",
        "excite": "tfmot's 8-bit scheme has no Multiply",
    }
    (line,) = out.info["notes"]
    assert line.startswith("quantize(mode=qat) left 3 of 11 layers float: tfmot's 8-bit scheme has no Rescaling")
    assert interpreter(out.tflite()).get_input_details()[0]["dtype"] == np.int8  # full-integer all the same


def test_qat_with_nothing_to_quantize_is_refused_in_one_line(digits_flat, ctx_factory):
    keras = _tf.keras()
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(inputs), name="linear")
    with pytest.raises(KfoptError) as refused:
        run(model, digits_flat, ctx_factory, mode="qat", float_layers=["head"], epochs=1)
    assert str(refused.value) == (
        "quantize(mode=qat) has no layer with weights of 'linear' to train quantization-aware "
        "(head: kept float by float_layers). Fix: use quantize(mode=int8) (post-training, takes any layer), "
        "or keep fewer layers in float_layers."
    )


def test_qat_of_a_gru_text_model_converts_with_the_gru_left_float(ctx_factory):
    from sklearn.datasets import load_digits

    from kfopt.data import load_data

    digits = load_digits()
    tokens = digits.data.astype("int32")[:, ::4]  # 16 pixel intensities as token ids 0..16
    data = load_data(
        {"x_train": tokens[:200], "y_train": digits.target[:200], "x_test": tokens[-64:], "y_test": digits.target[-64:]}
    )
    keras = _tf.keras()
    inputs = keras.Input((16,), dtype="int32")
    x = keras.layers.GRU(8, name="reader")(keras.layers.Embedding(17, 8, name="ids")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(x))
    out = run(model, data, ctx_factory, mode="qat", epochs=1, calibration_samples=16)
    assert out.info["float_layers"] == {
        "ids": "tfmot's 8-bit scheme has no Embedding",
        "reader": "tfmot's 8-bit scheme has no GRU",
    }
    it = interpreter(out.tflite())  # the GRU was unrolled from the QAT model's config for TFLite
    detail = it.get_input_details()[0]
    assert detail["dtype"] == np.int32  # token ids stay integers
    it.set_tensor(detail["index"], tokens[:1])
    it.invoke()
    assert it.get_tensor(it.get_output_details()[0]["index"]).shape == (1, 10)


def test_qat_of_a_gru_fed_by_a_float_reshape_converts_with_the_qat_weights(ctx_factory):
    """A float input quantized in front of a Reshape: the QAT model rebuilt to unroll the GRU holds more weights
    than the original (tfmot's QuantizeLayer builds its ranges twice), so weights are copied layer by layer."""
    from kfopt.convert import unrolled
    from kfopt.data import load_data
    from kfopt.plugins.quantize import qat_scheme, quantization_aware_model

    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((320, 48)).astype("float32")
    y = (x[:, :24].sum(axis=1) > x[:, 24:].sum(axis=1)).astype(int)  # which half of the sequence is brighter
    data = load_data({"x_train": x[:256], "y_train": y[:256], "x_test": x[256:], "y_test": y[256:]})
    model = keras.Sequential(
        [
            keras.Input((48,)),
            keras.layers.Reshape((12, 4)),
            keras.layers.GRU(8, name="reader"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    out = run(model, data, ctx_factory, mode="qat", epochs=1, calibration_samples=16)
    assert out.info["float_layers"] == {"reader": "tfmot's 8-bit scheme has no GRU"}
    it = interpreter(out.tflite())
    detail = it.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    it.set_tensor(detail["index"], np.clip(np.round(x[:1] / scale + zero_point), -128, 127).astype(np.int8))
    it.invoke()
    assert it.get_tensor(it.get_output_details()[0]["index"]).shape == (1, 2)

    # The unrolled copy computes what the QAT model computes: every weight, quantizer ranges included, in place.
    qat_model, _ = quantization_aware_model(model, [], qat_scheme(preserve=False))
    qat_model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    qat_model.fit(x, y, epochs=1, verbose=0)  # ranges away from their initial values
    with _tf.tfmot().quantization.keras.quantize_scope():
        copy = unrolled(qat_model)
    assert len(copy.weights) > len(qat_model.weights)
    assert copy.get_layer("reader").unroll
    np.testing.assert_allclose(copy.predict(x, verbose=0), qat_model.predict(x, verbose=0), atol=1e-6)
