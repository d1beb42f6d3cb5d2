"""Every built-in technique on architectures kfopt was not designed around: what users bring.

Random-weight models built here (tf_keras, 32x32 inputs): ``keras.applications``
EfficientNetB0 and MobileNetV2 (alpha 0.35), a small ResNet with a leading
Rescaling layer, BatchNorm and residual adds, and a small Transformer encoder on
integer tokens. Tiny data (digits, upsampled to RGB or read as token ids), one
epoch: these tests check that each technique works on the structure and says
what it left alone, not how accurate the result is.
"""

from __future__ import annotations

import numpy as np
import pytest

from kfopt import _tf
from kfopt.data import load_data
from kfopt.errors import KfoptError
from kfopt.plugins import ModelHandle
from kfopt.plugins.distill import Distill
from kfopt.plugins.prune import Prune, kernel_layers
from kfopt.plugins.quantize import Quantize, qat_scheme, quantization_aware_model
from kfopt.signature import model_info

pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")

TRAIN, TEST = 64, 48


# -- the models ----------------------------------------------------------------
def efficientnet():
    return _tf.keras().applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)


def mobilenet():
    return _tf.keras().applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)


def resnet():
    """Two residual blocks (BatchNorm, ReLU, a projection shortcut) after a Rescaling layer."""
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", use_bias=False)(x)))
    for filters, stride in ((16, 1), (32, 2)):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization()(y))
        y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        if stride != 1:
            shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
            shortcut = layers.BatchNormalization()(shortcut)
        x = layers.ReLU()(layers.Add()([shortcut, y]))
    outputs = layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="resnet")


def transformer():
    """One encoder block on 16 integer tokens: Embedding, MultiHeadAttention, residual adds, LayerNormalization."""
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((16,), dtype="int32")
    x = layers.Embedding(17, 32)(inputs)
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=16)(x, x)
    x = layers.LayerNormalization()(layers.Add()([x, attention]))
    feed_forward = layers.Dense(32)(layers.Dense(64, activation="relu")(x))
    x = layers.LayerNormalization()(layers.Add()([x, feed_forward]))
    outputs = layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="transformer")


BUILDERS = {"efficientnet": efficientnet, "mobilenet": mobilenet, "resnet": resnet, "transformer": transformer}
#: The two keras.applications models take tens of seconds per technique on two cores.
HEAVY = {"efficientnet", "mobilenet"}


def each_model(*names):
    return [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name for name in names or BUILDERS]


@pytest.fixture(scope="module")
def images():
    """Digits upsampled to 32x32 RGB in [0, 255] (what an image model with a Rescaling layer expects)."""
    digits = load_data("digits", input_shape=(32, 32, 1), seed=0)
    (x, y), (x_test, y_test) = digits.train.arrays(), digits.test.arrays()

    def rgb(a):
        return np.repeat(a, 3, axis=-1).astype("float32") * 255.0

    arrays = {"x_train": rgb(x[:TRAIN]), "y_train": y[:TRAIN], "x_test": rgb(x_test[:TEST]), "y_test": y_test[:TEST]}
    return load_data(arrays, seed=0)


@pytest.fixture(scope="module")
def tokens():
    """Digits read as 16 integer tokens (every 4th pixel's intensity, ids 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype("int32")[:, ::4], digits.target
    arrays = {"x_train": x[:TRAIN], "y_train": y[:TRAIN], "x_test": x[-TEST:], "y_test": y[-TEST:]}
    return load_data(arrays, seed=0)


@pytest.fixture(scope="module")
def models():
    """Each architecture built once (random weights, seeded); techniques never change their input."""
    built = {}

    def get(name):
        if name not in built:
            _tf.keras().utils.set_random_seed(0)
            built[name] = BUILDERS[name]()
        return built[name]

    return get


@pytest.fixture
def setup(models, images, tokens, ctx_factory):
    """(model, data, context) for an architecture."""

    def make(name):
        data = tokens if name == "transformer" else images
        return models(name), data, ctx_factory(data)

    return make


def kinds(model, kind):
    return {layer.name for layer in model.layers if type(layer).__name__ == kind}


# -- prune ---------------------------------------------------------------------
@pytest.mark.parametrize("name", each_model())
def test_prune_reaches_the_target_on_what_tfmot_prunes_and_lists_what_it_left_dense(name, setup):
    model, _, ctx = setup(name)
    out = Prune().apply(ModelHandle.from_keras(model), Prune.Config(target_sparsity=0.5, epochs=1), ctx)

    pruned = out.keras()
    left = out.info.get("left_dense", {})
    # tfmot prunes no depthwise kernels: exactly those stay dense, each with why; weightless layers
    # (Rescaling, Normalization, Reshape, Multiply, Add) are not in the way and not listed.
    assert set(left) == kinds(model, "DepthwiseConv2D")
    assert all(why == "tfmot does not prune DepthwiseConv2D kernels" for why in left.values())
    if left:
        (line,) = out.info["notes"]
        assert line.startswith(f"prune(method=magnitude) left {len(left)} of ") and "DepthwiseConv2D" in line
    kernels = [w.numpy() for layer in kernel_layers(pruned) if layer.name not in left for w in layer.trainable_weights]
    kernels = [k for k in kernels if k.ndim >= 2]
    assert sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels) == pytest.approx(0.5, abs=0.01)
    assert [type(layer) for layer in pruned.layers] == [type(layer) for layer in model.layers]  # no wrappers left


@pytest.mark.parametrize("method", ["structured", "l1"])
def test_structured_and_l1_prune_the_transformer(method, setup):
    model, _, ctx = setup("transformer")
    config = Prune.Config(method=method, epochs=1, **({"target_sparsity": 0.5} if method == "l1" else {}))
    out = Prune().apply(ModelHandle.from_keras(model), config, ctx)

    if method == "l1":  # thresholds any layer's kernels
        assert "left_dense" not in out.info and out.info["sparsity"] == pytest.approx(0.5, abs=0.005)
    else:  # m:n is for matrix multiplies with 2-D/4-D kernels: the lookup table and attention's 3-D ones stay
        (embedding,), (attention,) = kinds(model, "Embedding"), kinds(model, "MultiHeadAttention")
        assert out.info["left_dense"] == {
            embedding: "m:n sparsity speeds up matrix multiplies, not an Embedding's lookup table",
            attention: "tfmot's m:n pruning takes 2-D and 4-D kernels, MultiHeadAttention has 3-D ones",
        }
        dense = [out.keras().get_layer(name).kernel.numpy() for name in kinds(model, "Dense")]
        assert all((k == 0).mean() == pytest.approx(0.5, abs=0.01) for k in dense)


# -- quantization-aware training ------------------------------------------------
def run_tflite_once(content: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = _tf.tf().lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    if detail["dtype"] == np.int8:
        scale, zero_point = detail["quantization"]
        x = np.clip(np.round(x / scale + zero_point), -128, 127)
    interpreter.set_tensor(detail["index"], x[:1].astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


#: The layer classes QAT leaves float in each model (tfmot's default 8-bit scheme has none for them).
QAT_FLOAT = {
    "resnet": ["Rescaling"],
    "transformer": ["Embedding", "MultiHeadAttention", "LayerNormalization"],
}


@pytest.mark.parametrize("name", each_model("resnet", "transformer"))
def test_qat_quantizes_what_tfmot_supports_and_lists_the_float_layers(name, setup):
    model, data, ctx = setup(name)
    config = Quantize.Config(mode="qat", epochs=1, calibration_samples=16)
    out = Quantize().apply(ModelHandle.from_keras(model), config, ctx)

    expected = {
        layer.name: f"tfmot's 8-bit scheme has no {type(layer).__name__}"
        for layer in model.layers
        if type(layer).__name__ in QAT_FLOAT[name]
    }
    assert out.info.get("float_layers", {}) == expected
    if expected:
        (line,) = out.info["notes"]
        assert line.startswith(f"quantize(mode=qat) left {len(expected)} of {len(model.layers) - 1} layers float: ")
    x, _ = data.test.arrays()
    assert run_tflite_once(out.tflite(), x).shape == (1, 10)


@pytest.mark.slow
def test_qat_wraps_efficientnet_with_its_rescaling_normalization_and_squeeze_excite_left_float(models):
    # What used to fail is wrapping the model for quantization-aware training (a Rescaling layer blocked it);
    # fine-tuning and converting a QAT EfficientNetB0 take minutes on two cores, and are the code paths the
    # models above run.
    model = models("efficientnet")
    qat_model, floats = quantization_aware_model(model, [], qat_scheme(preserve=False))

    assert set(floats) == kinds(model, "Rescaling") | kinds(model, "Normalization") | kinds(model, "Multiply")
    assert len(kinds(model, "Multiply")) == 16  # one squeeze-excite gate per block
    wrapped = {layer.layer.name for layer in qat_model.layers if type(layer).__name__ == "QuantizeWrapperV2"}
    assert wrapped >= kinds(model, "Conv2D") | kinds(model, "DepthwiseConv2D") | kinds(model, "BatchNormalization")
    assert not wrapped & set(floats)


# -- distillation --------------------------------------------------------------
def widths(model, kind, key):
    return [layer.get_config()[key] for layer in model.layers if type(layer).__name__ == kind]


# EfficientNetB0's student is built below; training it takes a minute on two cores.
@pytest.mark.parametrize("name", each_model("resnet", "transformer", "mobilenet"))
def test_distill_builds_a_half_width_student_with_the_same_interface(name, setup):
    model, data, ctx = setup(name)
    out = Distill().apply(ModelHandle.from_keras(model), Distill.Config(width=0.5, epochs=1), ctx)

    student = out.keras()
    assert student.input_shape == model.input_shape and student.output_shape == model.output_shape
    # Both sides of most kernels halve, so params fall to about a quarter (depthwise kernels: a half).
    assert 0.2 < student.count_params() / model.count_params() < 0.35
    teacher_filters, student_filters = widths(model, "Conv2D", "filters"), widths(student, "Conv2D", "filters")
    assert student_filters == [max(1, round(f / 2)) for f in teacher_filters]
    assert widths(student, "Dense", "units")[-1] == 10  # the classes
    assert "kept_width" not in out.info  # nothing but the output layer had to keep its width
    x, _ = data.test.arrays()
    assert student.predict(x[:2], verbose=0).shape == (2, 10)


def test_transformer_student_scales_embedding_attention_and_feed_forward_together(models):
    from kfopt.plugins.student import build_student

    teacher = models("transformer")
    student = build_student(teacher, 0.5)
    assert widths(student, "Embedding", "output_dim") == [16]
    assert widths(student, "Dense", "units") == [32, 16, 10]  # the residual width follows the embedding
    (attention,) = [layer for layer in student.layers if type(layer).__name__ == "MultiHeadAttention"]
    assert (attention.get_config()["key_dim"], attention.get_config()["num_heads"]) == (8, 2)


def test_efficientnet_student_squeeze_excite_reshapes_follow_the_scaled_channels(models):
    from kfopt.plugins.student import build_student

    teacher = models("efficientnet")
    student = build_student(teacher, 0.5)
    assert student.output_shape == teacher.output_shape and 0.2 < student.count_params() / teacher.count_params() < 0.35
    targets = {layer.name: layer.get_config()["target_shape"] for layer in student.layers if "se_reshape" in layer.name}
    assert len(targets) == 16 and all(tuple(shape[:2]) == (1, 1) for shape in targets.values())
    block = student.get_layer("block2a_se_reshape")
    assert block.output_shape[-1] == student.get_layer("block2a_expand_conv").get_config()["filters"]


# -- refusals before any work --------------------------------------------------
def info_of(model):
    return model_info(ModelHandle.from_keras(model))


def test_refusals_come_from_check_in_one_line_before_any_work():
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((8,))
    hidden = layers.Add()([inputs, layers.Dense(8, activation="relu")(inputs)])  # tied to the input's width
    tied = keras.Model(inputs, layers.Dense(3)(hidden), name="tied")
    with pytest.raises(KfoptError) as refused:
        Distill().check(info_of(tied), Distill.Config(width=0.5))
    assert "cannot make 'tied' narrower" in str(refused.value) and "architecture=dense" in str(refused.value)
    assert "its width is tied to the model's input" in str(refused.value) and "\n" not in str(refused.value)
    Distill().check(info_of(tied), Distill.Config(architecture="dense", width=0.5))  # a dense student can

    two = keras.Model(inputs, [layers.Dense(3)(inputs), layers.Dense(2)(inputs)], name="two")
    with pytest.raises(KfoptError, match="distill trains a student on one output, but 'two' has 2"):
        Distill().check(info_of(two), Distill.Config())

    class Custom(layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(name="w", shape=(input_shape[-1], 3))

        def call(self, x):
            return x @ self.w

    custom = keras.Model(inputs, Custom()(inputs), name="custom")
    with pytest.raises(KfoptError, match=r"no layer of 'custom' to prune .*tfmot cannot prune Custom.*method=l1"):
        Prune().check(info_of(custom), Prune.Config())
    Prune().check(info_of(custom), Prune.Config(method="l1"))
    with pytest.raises(KfoptError, match=r"quantize\(mode=qat\) has no layer with weights .*mode=int8"):
        Quantize().check(info_of(custom), Quantize.Config(mode="qat"))
    Quantize().check(info_of(custom), Quantize.Config(mode="int8"))


def test_a_subclassed_model_is_refused_by_the_techniques_that_rebuild_layers():
    keras = _tf.keras()

    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model(np.zeros((1, 4), "float32"))
    handle = ModelHandle.from_keras(model)
    for technique, config in (
        (Prune(), Prune.Config()),
        (Quantize(), Quantize.Config(mode="qat")),
        (Distill(), Distill.Config()),
    ):
        with pytest.raises(KfoptError, match="'sub' is a subclassed model"):
            technique.check(model_info(handle), config)


# -- several inputs, several outputs --------------------------------------------
def test_a_two_input_model_prunes_trains_quantization_aware_and_distills(ctx_factory):
    from sklearn.datasets import load_digits

    keras = _tf.keras()
    layers = keras.layers
    digits = load_digits()
    x, y = digits.data.astype("float32") / 16, digits.target
    halves = {"top": x[:, :32], "bottom": x[:, 32:]}  # the image's upper and lower half, each its own input
    data = load_data(
        {
            "x_train": {k: v[:TRAIN] for k, v in halves.items()},
            "y_train": y[:TRAIN],
            "x_test": {k: v[-TEST:] for k, v in halves.items()},
            "y_test": y[-TEST:],
        }
    )
    top, bottom = keras.Input((32,), name="top"), keras.Input((32,), name="bottom")
    joined = layers.Concatenate()(
        [layers.Dense(16, activation="relu")(top), layers.Dense(16, activation="relu")(bottom)]
    )
    model = keras.Model([top, bottom], layers.Dense(10, activation="softmax")(joined))

    ctx = ctx_factory(data)
    pruned = Prune().apply(ModelHandle.from_keras(model), Prune.Config(target_sparsity=0.5, epochs=1), ctx)
    assert pruned.info["sparsity"] == pytest.approx(0.5, abs=0.01)
    qat = Quantize().apply(ModelHandle.from_keras(model), Quantize.Config(mode="qat", epochs=1), ctx)
    assert len(_tf.tf().lite.Interpreter(model_content=qat.tflite()).get_input_details()) == 2
    student = Distill().apply(ModelHandle.from_keras(model), Distill.Config(width=0.5, epochs=1), ctx).keras()
    assert widths(student, "Dense", "units") == [8, 8, 10]


def test_fine_tuning_a_two_output_model_trains_the_scored_output_and_keeps_the_other(digits_flat, ctx_factory):
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((64,))
    hidden = layers.Dense(32, activation="relu")(inputs)
    digit = layers.Dense(10, activation="softmax", name="digit")(hidden)
    model = keras.Model(inputs, [digit, layers.Dense(1, activation="sigmoid", name="odd")(hidden)])
    x, _ = digits_flat.test.arrays()
    before = model.predict(x, verbose=0)[1]

    # The labels are the digits (the first output, scored by default); the other output's targets are its own
    # predictions, so fine-tuning does not crash on labels it has none for, nor lets that output drift freely.
    out = Prune().apply(
        ModelHandle.from_keras(model), Prune.Config(target_sparsity=0.5, epochs=2), ctx_factory(digits_flat)
    )
    digits, odd = out.keras().predict(x, verbose=0)
    assert out.info["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert digits.shape == (len(x), 10) and float(np.abs(odd - before).mean()) < 0.1
