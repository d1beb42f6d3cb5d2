"""distill: width-scaled students, logits handling, real training on digits."""

import numpy as np
import pydantic
import pytest
from conftest import accuracy, clone

from kfopt import _tf
from kfopt.errors import KfoptError
from kfopt.plugins import ModelHandle
from kfopt.plugins.distill import DENSE_HIDDEN_LAYERS, Distill, build_dense_student, build_student, logits_model


def _widths(model):
    return [
        layer.get_config().get("units") or layer.get_config().get("filters")
        for layer in model.layers
        if "units" in layer.get_config() or "filters" in layer.get_config()
    ]


def _functional_cnn(softmax_layer: bool = True):
    """A small functional model with a residual Add and a separate Softmax layer."""
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    y = layers.Conv2D(8, 3, padding="same")(x)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Dense(32, activation="relu")(layers.Flatten()(x))
    x = layers.Dense(10)(x)
    outputs = layers.Softmax()(x) if softmax_layer else x
    return keras.Model(inputs, outputs, name="functional_cnn")


def test_student_of_sequential_mlp_is_narrower_with_same_interface(mlp):
    student = build_student(mlp, 0.5)
    assert _widths(student) == [128, 128, 10]  # the output layer keeps the number of classes
    assert student.input_shape == mlp.input_shape and student.output_shape == mlp.output_shape
    assert 0.25 <= student.count_params() / mlp.count_params() <= 0.5
    assert student.layers[-1].activation.__name__ == "softmax"  # same output convention as the teacher
    assert _widths(mlp) == [256, 256, 10]  # teacher untouched


def test_student_of_functional_model_scales_convs_and_keeps_residual_shapes():
    teacher = _functional_cnn()
    student = build_student(teacher, 0.5)
    assert _widths(student) == [4, 4, 16, 10]
    assert student.output_shape == teacher.output_shape
    probabilities = student.predict(np.random.rand(3, 8, 8, 1).astype("float32"), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_width_never_drops_a_layer_below_one_unit(mlp):
    assert _widths(build_student(mlp, 0.001)) == [1, 1, 10]


def test_logits_model_handles_softmax_activation_and_softmax_layer(mlp):
    x = np.random.default_rng(0).random((5, 64)).astype("float32")
    logits, shares = logits_model(mlp)
    assert not shares and logits.layers[-1].activation.__name__ == "linear"
    np.testing.assert_allclose(_tf.tf().nn.softmax(logits(x)).numpy(), mlp(x).numpy(), atol=1e-5)
    assert mlp.layers[-1].activation.__name__ == "softmax"  # the original keeps its softmax

    functional = _functional_cnn()
    cut, shares = logits_model(functional)
    assert shares and type(cut.layers[-1]).__name__ == "Dense"
    plain = _functional_cnn(softmax_layer=False)
    assert logits_model(plain) == (plain, True)


@pytest.mark.slow
def test_distill_trains_an_accurate_student_without_touching_the_teacher(mlp, digits_flat, ctx_factory):
    before = clone(mlp).get_weights()
    handle = ModelHandle.from_keras(mlp, info={"source": "test", "sparsity": 0.5})
    result = Distill().apply(handle, Distill.Config(width=0.5, epochs=6), ctx_factory(digits_flat))
    student = result.keras()
    assert result.format == "keras"
    assert student is not mlp and student.count_params() < mlp.count_params() / 2
    assert accuracy(student, digits_flat) > 0.85
    assert result.info == {"source": "test"}  # the teacher's sparsity does not describe the student
    for old, new in zip(before, mlp.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_distill_a_functional_teacher_with_a_softmax_layer(digits_flat, ctx_factory):
    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    outputs = keras.layers.Softmax()(keras.layers.Dense(10)(hidden))
    teacher = keras.Model(inputs, outputs)
    # Keras trains the teacher on its probabilities; distillation reaches under the Softmax for logits.
    teacher.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    teacher.fit(digits_flat.train.x, digits_flat.train.y, epochs=5, verbose=0)
    assert accuracy(teacher, digits_flat) > 0.85

    config = Distill.Config(width=0.5, epochs=4, learning_rate=3e-3)
    student = Distill().apply(ModelHandle.from_keras(teacher), config, ctx_factory(digits_flat)).keras()
    assert type(student.layers[-1]).__name__ == "Softmax"
    assert _widths(student) == [32, 10]
    assert accuracy(student, digits_flat) > 0.8


def test_student_from_a_file_is_used_as_given(mlp, digits_flat, ctx_factory, tmp_path):
    keras = _tf.keras()
    given = keras.Sequential([keras.Input((64,)), keras.layers.Dense(24, activation="relu"), keras.layers.Dense(10)])
    given.save(tmp_path / "student.keras")
    config = Distill.Config(student=str(tmp_path / "student.keras"), width=0.1, epochs=1)
    student = Distill().apply(ModelHandle.from_keras(mlp), config, ctx_factory(digits_flat)).keras()
    assert _widths(student) == [24, 10]  # width is ignored when a student is given
    assert student.layers[-1].activation.__name__ == "linear"  # the file's own output convention

    wrong = keras.Sequential([keras.Input((64,)), keras.layers.Dense(3)])
    wrong.save(tmp_path / "wrong.keras")
    with pytest.raises(KfoptError, match=r"output shape \(3,\)"):
        Distill().apply(
            ModelHandle.from_keras(mlp), Distill.Config(student=str(tmp_path / "wrong.keras")), ctx_factory(digits_flat)
        )


def _has_conv(model):
    return any("Conv" in type(layer).__name__ for layer in model.layers)


def test_dense_student_of_a_cnn_is_flatten_and_dense_sized_by_the_widest_layer(cnn):
    student = build_dense_student(cnn, 0.5)
    assert not _has_conv(student) and type(student.layers[1]).__name__ == "Flatten"
    assert student.input_shape == cnn.input_shape and student.output_shape == cnn.output_shape
    assert _widths(student) == [32] * DENSE_HIDDEN_LAYERS + [10]  # 0.5 x the widest layer (Dense 64), then classes
    assert student.layers[-1].activation.__name__ == "softmax"  # the teacher's output convention
    assert _widths(build_dense_student(cnn, 0.001)) == [1] * DENSE_HIDDEN_LAYERS + [10]
    # A teacher ending in a Softmax layer or in logits: the student's output matches.
    assert build_dense_student(_functional_cnn(), 1).layers[-1].activation.__name__ == "softmax"
    assert build_dense_student(_functional_cnn(softmax_layer=False), 1).layers[-1].activation.__name__ == "linear"
    assert _widths(build_dense_student(_functional_cnn(), 1)) == [32] * DENSE_HIDDEN_LAYERS + [10]


def test_distill_a_cnn_into_a_dense_student(cnn, digits_images, ctx_factory):
    config = Distill.Config(architecture="dense", width=1, epochs=5, learning_rate=3e-3)
    handle = Distill().apply(ModelHandle.from_keras(cnn), config, ctx_factory(digits_images))
    student = handle.keras()
    assert not _has_conv(student) and _has_conv(cnn)
    assert student.input_shape == cnn.input_shape == (None, 28, 28, 1)
    assert accuracy(student, digits_images) > 0.85


def test_dense_architecture_with_a_student_file_is_a_config_error(techniques_registry):
    from kfopt.recipe import parse_recipe, plan

    with pytest.raises(pydantic.ValidationError, match="drop architecture, or drop student"):
        Distill.Config(architecture="dense", student="student.keras")
    with pytest.raises(KfoptError, match=r"architecture=dense builds a student.*student='s.keras'"):
        plan(parse_recipe(["distill(architecture=dense,student=s.keras)"]), techniques_registry)
    assert Distill.Config(student="s.keras").architecture == "same"


@pytest.fixture
def techniques_registry():
    from kfopt.plugins.manager import registry

    return registry()


@pytest.mark.parametrize(
    "bad",
    [
        {"architecture": "conv"},
        {"width": 0},
        {"width": 1.5},
        {"alpha": 2},
        {"temperature": 0},
        {"epochs": 0},
        {"widht": 0.5},
    ],
)
def test_config_rejects_bad_values_and_unknown_keys(bad):
    with pytest.raises(pydantic.ValidationError):
        Distill.Config(**bad)


def test_config_fields_are_documented():
    assert all(field.description for field in Distill.Config.model_fields.values())


def _squeeze_excite(keep_per_channel_rescaling: bool = False):
    """Conv, a squeeze-excite gate (pool, Reshape, two 1x1 convs, Multiply), a residual Add, a nested head."""
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inputs)
    if keep_per_channel_rescaling:
        x = layers.Rescaling([0.5] * 16, name="per_channel")(x)
    gate = layers.Reshape((1, 1, 16), name="se_reshape")(layers.GlobalAveragePooling2D()(x))
    gate = layers.Conv2D(16, 1, activation="sigmoid", name="se_expand")(layers.Conv2D(4, 1, name="se_reduce")(gate))
    y = layers.Multiply(name="excite")([x, gate])
    x = layers.Add()([x, layers.Conv2D(16, 3, padding="same", name="branch")(y)])
    head_in = keras.Input((16,))
    head = keras.Model(head_in, layers.Dense(32, activation="relu", name="hidden")(head_in), name="head")
    x = head(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Dense(10, activation="softmax", name="classes")(x), name="se_net")


def test_student_of_a_squeeze_excite_residual_net_scales_joined_layers_together():
    teacher = _squeeze_excite()
    student = build_student(teacher, 0.5)
    assert student.output_shape == teacher.output_shape
    filters = {layer.name: layer.filters for layer in student.layers if hasattr(layer, "filters")}
    # The gate multiplies the stem's output and the branch is added to it: all three share one width.
    assert filters == {"stem": 8, "se_reduce": 2, "se_expand": 8, "branch": 8}
    assert student.get_layer("se_reshape").output_shape == (None, 1, 1, 8)
    assert student.get_layer("head").get_layer("hidden").units == 16  # nested models are scaled too
    assert student.get_layer("classes").units == 10
    assert student.predict(np.zeros((2, 8, 8, 3), "float32"), verbose=0).shape == (2, 10)


def test_a_layer_with_per_channel_constants_keeps_its_group_wide_and_says_why(digits_flat, ctx_factory):
    from kfopt.plugins.distill import plan_widths

    teacher = _squeeze_excite(keep_per_channel_rescaling=True)
    plan = plan_widths(teacher)
    assert plan.kept == {
        name: "it meets 'per_channel' (Rescaling), which holds one constant per channel"
        for name in ("stem", "se_expand", "branch")
    }
    student = build_student(teacher, 0.5, plan)
    assert {layer.name: layer.filters for layer in student.layers if hasattr(layer, "filters")} == {
        "stem": 16,
        "se_reduce": 2,
        "se_expand": 16,
        "branch": 16,
    }


def test_a_teacher_whose_widths_are_all_tied_to_its_input_or_output_is_refused(digits_flat, ctx_factory):
    keras = _tf.keras()
    inputs = keras.Input((64,))
    hidden = keras.layers.Add()([inputs, keras.layers.Dense(64, activation="relu", name="residual")(inputs)])
    teacher = keras.Model(inputs, keras.layers.Dense(10, name="classes")(hidden), name="tied")
    with pytest.raises(KfoptError) as refused:
        Distill().apply(ModelHandle.from_keras(teacher), Distill.Config(width=0.5, epochs=1), ctx_factory(digits_flat))
    assert str(refused.value) == (
        "distill(width=0.5) cannot make 'tied' narrower: every layer that sets a width keeps the teacher's "
        "(residual: its width is tied to the model's input; classes: it sets the model's output). "
        "Fix: use architecture=dense, or pass a student model file with student=PATH."
    )


@pytest.mark.parametrize("rank,padding", [(2, "valid"), (2, "same"), (1, "causal")])
def test_a_narrow_strided_1x1_conv_trains_through_a_unit_stride_conv_with_the_same_numbers(rank, padding):
    """oneDNN's kernel gradient of a strided 1x1 conv on < 16 input channels writes past its workspace (a segfault
    on an odd-sized batch, uxlfoundation/oneDNN#6035): while training, such a layer subsamples and then convolves
    at unit stride. Its outputs and kernel gradient stay the same, and the layer is itself again afterwards."""
    from kfopt.training import unit_stride_pointwise

    tf, keras = _tf.tf(), _tf.keras()
    spatial = (9, 8)[:rank] if rank == 2 else (9,)
    conv = getattr(keras.layers, f"Conv{rank}D")(16, 1, strides=2, padding=padding, name="projection")
    wide = getattr(keras.layers, f"Conv{rank}D")(16, 1, strides=2, name="wide")  # 16 channels: not affected
    inputs = keras.Input((*spatial, 8))
    model = keras.Model(inputs, [conv(inputs), wide(keras.layers.Concatenate()([inputs, inputs]))])
    x = tf.constant(np.random.default_rng(0).random((3, *spatial, 8)).astype("float32"))  # an odd batch
    expected = conv(x).numpy()  # the forward kernel is not affected
    with unit_stride_pointwise(model) as changed:
        assert changed == ["projection"]
        with tf.GradientTape() as tape:
            y = conv(x)
            loss = tf.reduce_sum(y * y)
        gradient = tape.gradient(loss, conv.kernel).numpy()
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)
    # d/dW sum((xs W + b)^2) = 2 xs^T (xs W + b), xs the inputs at the strided positions.
    xs = x.numpy()[(slice(None), *[slice(None, None, 2)] * rank)].reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(gradient.reshape(8, 16), 2 * xs.T @ expected.reshape(-1, 16), rtol=1e-4)
    assert "convolution_op" not in vars(conv)  # the layer is itself again


def test_a_student_with_a_squeeze_excite_reshape_converts_to_int8():
    """The resized Reshape names its channel count: with a -1 the traced graph has unknown channels, and the
    TFLite converter cannot take the 1x1 convs after it (EfficientNet's squeeze-excite blocks)."""
    from kfopt.convert import to_tflite

    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    gate = layers.Reshape((1, 1, 32))(layers.GlobalAveragePooling2D()(x))
    gate = layers.Conv2D(32, 1, activation="sigmoid")(layers.Conv2D(8, 1, activation="relu")(gate))
    x = layers.Multiply()([x, gate])
    teacher = keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(x)))
    student = build_student(teacher, 0.5)
    (reshape,) = [layer for layer in student.layers if type(layer).__name__ == "Reshape"]
    assert reshape.target_shape == (1, 1, 16)
    rng = np.random.default_rng(0)
    assert to_tflite(student, "int8", lambda: ([rng.random((1, 8, 8, 3), dtype=np.float32)] for _ in range(4)))
