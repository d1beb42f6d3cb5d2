"""prune(method=channels): whole filters removed, the graph followed, a smaller model that computes the same."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

import kfopt
from kfopt import _tf
from kfopt.errors import KfoptError
from kfopt.flops import keras_flops, tflite_flops
from kfopt.plugins import ModelHandle
from kfopt.plugins.channels import (
    Sensitivity,
    allocate,
    group_fractions,
    masked,
    measure_sensitivity,
    plan_channels,
    remove_channels,
)
from kfopt.plugins.prune import Prune
from kfopt.signature import model_info

SHAPE = (12, 12, 3)


def graph_model():
    """Residual adds, a squeeze-excite multiply, a concatenation and depthwise convs, all with BatchNorm."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = layers.ReLU()(
        layers.BatchNormalization(name="stem_bn")(layers.Conv2D(16, 3, padding="same", name="stem")(inputs))
    )
    # residual block: conv -> bn -> relu -> conv -> bn, + x
    y = layers.ReLU()(layers.BatchNormalization(name="a_bn")(layers.Conv2D(8, 3, padding="same", name="a")(x)))
    y = layers.BatchNormalization(name="b_bn")(layers.Conv2D(16, 3, padding="same", name="b")(y))
    x = layers.ReLU()(layers.Add()([x, y]))
    # depthwise block
    d = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    d = layers.ReLU()(layers.BatchNormalization(name="dw_bn")(d))
    # squeeze-excite on the depthwise output
    s = layers.GlobalAveragePooling2D()(d)
    s = layers.Dense(4, activation="relu", name="se_reduce")(s)
    s = layers.Dense(16, activation="sigmoid", name="se_expand")(s)
    s = layers.Reshape((1, 1, 16))(s)
    d = layers.Multiply()([d, s])
    # a branch concatenated with the main path (channel offsets)
    c = layers.Conv2D(12, 1, name="branch")(x)
    x = layers.Concatenate()([d, c])
    x = layers.Conv2D(24, 3, strides=2, padding="same", activation="relu", name="mix")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="relu", name="fc")(x)
    outputs = layers.Dense(5, activation="softmax", name="out")(x)
    model = keras.Model(inputs, outputs, name="graph")
    # BatchNorm statistics that are not the identity, so slicing them wrongly shows in the outputs
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)]
            )
    return model


def inputs(count=8):
    return np.random.default_rng(1).normal(size=(count, *SHAPE)).astype(np.float32)


def widths(model) -> dict[str, int]:
    keys = ("filters", "units")
    return {
        layer.name: next(layer.get_config()[k] for k in keys if k in layer.get_config())
        for layer in model.layers
        if any(k in layer.get_config() for k in keys)
    }


def test_removing_half_the_channels_gives_a_valid_smaller_model_of_the_same_shape():
    model = graph_model()
    plan = plan_channels(model, 0.5)
    smaller = remove_channels(model, plan)

    assert smaller.output_shape == model.output_shape
    assert smaller.input_shape == model.input_shape
    got, want = widths(smaller), widths(model)
    assert got["out"] == 5  # the output keeps its width
    for name in ("stem", "a", "b", "se_reduce", "se_expand", "branch", "mix", "fc"):
        assert got[name] == max(1, round(want[name] * 0.5)), name
    # layers joined by the residual Add, the depthwise conv and the SE Multiply share one channel set
    assert got["stem"] == got["b"] == got["se_expand"]
    assert smaller.get_layer("dw").depthwise_kernel.shape[2] == got["stem"]
    assert smaller.get_layer("mix").kernel.shape[2] == got["se_expand"] + got["branch"]
    assert smaller.count_params() < model.count_params() / 2.5
    assert keras_flops(smaller) < keras_flops(model) / 2.5
    assert np.isfinite(smaller.predict(inputs(), verbose=0)).all()
    # the input model is untouched
    assert widths(model) == want


def test_pruning_nothing_gives_exactly_the_same_outputs():
    model = graph_model()
    plan = plan_channels(model, 1e-6)
    assert not plan.shrunk
    same = remove_channels(model, plan)
    np.testing.assert_array_equal(same.predict(inputs(), verbose=0), model.predict(inputs(), verbose=0))


def test_removing_channels_that_are_zero_gives_the_same_outputs():
    """Channels whose every producer is zero (filters, biases, BatchNorm scale and shift) contribute nothing:
    removing them must not change a single output, which proves each reader's slices are the right ones."""
    model = graph_model()
    rng = np.random.default_rng(2)
    zero = {  # group -> its layers (producers and their BatchNorms) and the channels to zero
        "stem": (["stem", "stem_bn", "b", "b_bn", "dw", "dw_bn", "se_expand"], rng.choice(16, 8, replace=False)),
        "a": (["a", "a_bn"], rng.choice(8, 4, replace=False)),
        "branch": (["branch"], rng.choice(12, 6, replace=False)),
        "mix": (["mix"], rng.choice(24, 12, replace=False)),
        "fc": (["fc"], rng.choice(32, 16, replace=False)),
        "se_reduce": (["se_reduce"], rng.choice(4, 2, replace=False)),
    }
    for names, channels in zero.values():
        for name in names:
            layer = model.get_layer(name)
            weights = layer.get_weights()
            if isinstance(layer, _tf.keras().layers.BatchNormalization):
                weights[0][channels] = 0  # gamma
                weights[1][channels] = 0  # beta
            elif isinstance(layer, _tf.keras().layers.DepthwiseConv2D):
                weights[0][:, :, channels] = 0
                weights[1][channels] = 0
            else:
                weights[0][..., channels] = 0
                weights[1][channels] = 0
            layer.set_weights(weights)
    # The stem group's channels also pass the SE gate: sigmoid(0) = 0.5 times a zero channel is still zero.
    plan = plan_channels(model, 0.5)
    smaller = remove_channels(model, plan)
    assert widths(smaller)["stem"] == 8 and widths(smaller)["mix"] == 12
    np.testing.assert_allclose(smaller.predict(inputs(), verbose=0), model.predict(inputs(), verbose=0), atol=1e-5)


def test_keep_dense_and_unfollowable_layers_keep_their_width():
    keras = _tf.keras()
    layers = keras.layers
    inputs_ = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, name="c1")(inputs_)
    x = layers.Conv2D(8, 3, name="c2")(x)
    x = layers.LayerNormalization(name="ln")(x)  # mixes channels: c2's width must stay
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs_, layers.Dense(3, name="out")(x))
    plan = plan_channels(model, 0.5, keep_dense=["c1"])
    assert plan.shrunk == {}
    assert plan.left == {"c1": "kept full width by keep_dense", "c2": plan.left["c2"]}
    assert "ln" in plan.left["c2"]


def zero_half_the_filters(model, names) -> None:
    """Zero half the filters (kernel and bias) of each named layer: the ones an L1 ranking removes at 0.5."""
    rng = np.random.default_rng(3)
    for name in names:
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        channels = rng.choice(bias.shape[0], bias.shape[0] // 2, replace=False)
        kernel[..., channels] = 0
        bias[channels] = 0
        layer.set_weights([kernel, bias])


def assert_same_outputs_when_pruned(model, x, shrunk: dict) -> None:
    """Prune half of zeroed filters: the named widths shrink, the shapes stay and not one output changes."""
    zero_half_the_filters(model, shrunk)
    plan = plan_channels(model, 0.5)
    assert plan.shrunk == shrunk and plan.left == {}
    smaller = remove_channels(model, plan)
    assert smaller.output_shape == model.output_shape
    np.testing.assert_allclose(smaller.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_flattened_conv_branches_concatenated_lose_channels_at_their_offsets():
    """Flatten -> Concatenate -> Dense: each branch's flattened block sits at its offset in the Dense's rows."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs_ = keras.Input((6, 6, 3))
    a = layers.Flatten()(layers.Conv2D(4, 3, name="a")(inputs_))  # 4x4x4 = 64 values
    b = layers.Flatten()(layers.Conv2D(6, 3, strides=2, name="b")(inputs_))  # 2x2x6 = 24 values
    x = layers.Dense(8, activation="relu", name="fc")(layers.Concatenate()([a, b]))
    model = keras.Model(inputs_, layers.Dense(2, name="out")(x))
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 3)).astype(np.float32)
    assert_same_outputs_when_pruned(model, x, {"a": (4, 2), "b": (6, 3), "fc": (8, 4)})


def test_flattened_conv_branch_concatenated_with_a_dense_side_input():
    """The two-input pattern: an image branch flattened next to a Dense over a second input, either order."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    for side_first in (False, True):
        image, extra = keras.Input((6, 6, 3)), keras.Input((5,))
        a = layers.Flatten()(layers.Conv2D(4, 3, name="a")(image))
        side = layers.Dense(6, activation="relu", name="side")(extra)
        x = layers.Concatenate()([side, a] if side_first else [a, side])
        x = layers.Dense(8, activation="relu", name="fc")(x)
        model = keras.Model([image, extra], layers.Dense(2, name="out")(x))
        rng = np.random.default_rng(1)
        x = [rng.normal(size=(4, 6, 6, 3)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)]
        assert_same_outputs_when_pruned(model, x, {"a": (4, 2), "side": (6, 3), "fc": (8, 4)})
        check = Prune.Config(method="channels", target_sparsity=0.5)
        Prune().check(model_info(ModelHandle.from_keras(model)), check)  # rebuilds the structure: no refusal


def test_a_channels_first_pooling_leaves_the_conv_before_it_full_width():
    """GlobalAveragePooling2D(channels_first) on a channels-last conv averages its rows, not its channels: the conv
    keeps its filters even when it has as many rows as filters (widths that agree by chance)."""
    keras = _tf.keras()
    layers = keras.layers
    for rows in (8, 6):
        inputs_ = keras.Input((rows + 2, 6, 3))
        x = layers.Conv2D(8, 3, name="a")(inputs_)
        x = layers.GlobalAveragePooling2D(data_format="channels_first")(x)
        model = keras.Model(inputs_, layers.Dense(2, name="out")(layers.Dense(6, name="fc")(x)))
        zero_half_the_filters(model, ["fc"])
        plan = plan_channels(model, 0.5)
        assert plan.shrunk == {"fc": (6, 3)} and set(plan.left) == {"a"}
        smaller = remove_channels(model, plan)
        x = np.random.default_rng(1).normal(size=(2, rows + 2, 6, 3)).astype(np.float32)
        np.testing.assert_allclose(smaller.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_a_plan_the_rebuilt_model_disagrees_with_is_refused_in_one_line():
    keras = _tf.keras()
    layers = keras.layers
    inputs_ = keras.Input((6, 6, 3))
    x = layers.Flatten()(layers.Conv2D(4, 3, name="a")(inputs_))
    model = keras.Model(inputs_, layers.Dense(2, name="out")(layers.Dense(8, name="fc")(x)))
    plan = plan_channels(model, 0.5)
    plan.widths["fc"] = (8, 5)  # a width that disagrees with the kept channels (4): a bug in a plan
    with pytest.raises(KfoptError, match="layer 'fc' .* weights of shapes"):
        remove_channels(model, plan)


def test_flops_of_a_small_model_are_counted_by_hand():
    keras = _tf.keras()
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((10, 10, 2)),
            layers.Conv2D(4, 3),  # 8x8x4 outputs, each 3*3*2 MACs: 4608
            layers.DepthwiseConv2D(3, padding="same"),  # 8x8x4 outputs, each 3*3 MACs: 2304
            layers.BatchNormalization(),  # element-wise: 0
            layers.MaxPooling2D(),  # 4x4x4
            layers.Flatten(),  # 64
            layers.Dense(5),  # 64*5 = 320
        ]
    )
    assert keras_flops(model) == 4608 + 2304 + 320
    converter = _tf.tf().lite.TFLiteConverter.from_keras_model(model)
    assert tflite_flops(converter.convert()) == 4608 + 2304 + 320


def test_config_takes_channels_and_refuses_norm_for_other_methods():
    assert Prune.Config(method="channels", target_sparsity=0.5, norm="l2").norm == "l2"
    with pytest.raises(pydantic.ValidationError):
        Prune.Config(method="magnitude", norm="l2")


def test_a_model_with_nothing_to_remove_is_refused_before_any_work():
    keras = _tf.keras()
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(KfoptError, match="no layer .* whose channels it can remove"):
        Prune().check(model_info(ModelHandle.from_keras(model)), Prune.Config(method="channels", target_sparsity=0.5))


def test_technique_fine_tunes_and_reports_what_shrank(cnn, digits_images, ctx_factory):
    out = Prune().apply(
        ModelHandle.from_keras(cnn),
        Prune.Config(method="channels", target_sparsity=0.5, epochs=1),
        ctx_factory(digits_images),
    )
    smaller = out.keras()
    assert smaller.count_params() < cnn.count_params() / 2.5
    assert out.info["channels"] == {"conv2d": [16, 8], "conv2d_1": [32, 16], "dense": [64, 32]} or all(
        after == before // 2 for before, after in out.info["channels"].values()
    )
    assert "prune(method=channels) removed 50% of the channels of 3 of 4 layers" in out.info["notes"][0]
    x, y = digits_images.test.arrays()
    assert float((smaller.predict(x, verbose=0).argmax(axis=1) == y).mean()) > 0.8


def test_channels_then_int8_runs_end_to_end(cnn, digits_images, tmp_path):
    x_train, y_train = digits_images.train.arrays()
    x_test, y_test = digits_images.test.arrays()
    result = kfopt.optimize(
        cnn,
        (x_train, y_train, x_test, y_test),
        "prune(method=channels,target_sparsity=0.5,epochs=1)>quantize(mode=int8)",
        out=tmp_path / "run",
        progress=False,
        max_accuracy_drop=0.5,  # any outcome: this test is about what the chain builds
    )
    (candidate,) = result.candidates
    assert candidate.status == "ok", candidate.reason
    assert candidate.format == "tflite"
    assert candidate.params < result.baseline.params / 2.5
    assert candidate.flops < result.baseline.flops / 2.5
    assert any("prune(method=channels) removed 50%" in line for line in candidate.notes)


def test_a_student_distilled_after_channel_pruning_does_not_carry_its_widths(cnn, digits_images, ctx_factory):
    from kfopt.plugins.distill import Distill

    info = {"channels": {"conv2d": [16, 8]}, "full_width": {"dense": "kept full width by keep_dense"}}
    handle = ModelHandle.from_keras(cnn, info=info)
    out = Distill().apply(handle, Distill.Config(width=0.5, epochs=1), ctx_factory(digits_images))
    assert "channels" not in out.info and "full_width" not in out.info


# -- per-group fractions from sensitivity ---------------------------------------------------------------------------
def test_a_masked_model_computes_what_the_smaller_model_computes():
    """Zeroing the rows that read removed channels is removing them: what the sensitivity pass relies on."""
    model = graph_model()
    x = inputs(16)
    before = model.predict(x, verbose=0)
    uniform = plan_channels(model, 0.5)
    ranks = {root: (i % 3) * 0.3 for i, root in enumerate(uniform.free)}  # an uneven plan too
    for plan in (uniform, uniform.removing(ranks)):
        assert plan.shrunk
        with masked(model, plan):
            got = model.predict(x, verbose=0)
        np.testing.assert_allclose(got, remove_channels(model, plan).predict(x, verbose=0), atol=1e-5)
        assert np.abs(got - before).max() > 1e-3  # it did remove something
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)  # the kernels were restored


def two_convs(tiny_half: str):
    """Two conv groups feeding a softmax head; ``tiny_half``'s least important half carries almost nothing."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs_ = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 3, activation="relu", name="a")(inputs_)
    x = layers.Conv2D(16, 3, activation="relu", name="b")(x)
    model = keras.Model(inputs_, layers.Dense(3, activation="softmax", name="out")(layers.GlobalAveragePooling2D()(x)))
    layer = model.get_layer(tiny_half)
    kernel, bias = layer.get_weights()
    kernel[..., :8] *= 1e-3
    bias[:8] = 0
    layer.set_weights([kernel, bias])
    return model


def sensitivity_of(model, count=300):
    from kfopt.plugins.manager import registry
    from kfopt.task import infer_task

    x = np.random.default_rng(4).normal(size=(count, 8, 8, 3)).astype(np.float32)
    y = model.predict(x, verbose=0).argmax(axis=1)  # the model is right on every sample: drops are its losses
    task = infer_task(model, [y])
    metric = registry().metrics[task.metric]
    return measure_sensitivity(model, plan_channels(model, 0.5), 0.5, x, task.targets(y), task, metric)


def test_a_sensitive_group_loses_fewer_channels_than_an_insensitive_one():
    for insensitive, sensitive in (("a", "b"), ("b", "a")):
        model = two_convs(insensitive)
        plan = plan_channels(model, 0.5)
        found = sensitivity_of(model)
        root = {name: plan.groups.find(("out", name)) for name in "ab"}
        assert found.metric == "accuracy" and found.resolution == pytest.approx(1 / 300)
        assert found.drops[root[sensitive]] > found.drops[root[insensitive]] + 3 * found.resolution
        smaller = allocate(plan, 0.5, found)
        fractions = group_fractions(smaller)
        assert fractions[root[sensitive]] < 0.5 < fractions[root[insensitive]]
        assert smaller.widths[sensitive][1] > smaller.widths[insensitive][1]
        # the MACs of removing half everywhere, within the rounding of whole channels
        assert plan.cost() * 0.8 < smaller.cost() <= plan.cost()


def test_groups_a_small_split_cannot_tell_apart_lose_the_same_fraction():
    model = graph_model()
    plan = plan_channels(model, 0.5)
    alike = Sensitivity("accuracy", {root: 0.01 * (i % 2) for i, root in enumerate(plan.free)}, 0.01, 100)
    same = allocate(plan, 0.5, alike)  # within one sample of each other: the uniform plan exactly
    assert same.widths == plan.widths and same.keep.keys() == plan.keep.keys()
    assert all(np.array_equal(same.keep[root], plan.keep[root]) for root in plan.keep)
    apart = Sensitivity("accuracy", {root: 0.05 * i for i, root in enumerate(plan.free)}, 0.01, 100)
    varied = allocate(plan, 0.5, apart)
    assert varied.widths != plan.widths
    # each group keeps between half and twice what uniform removal keeps (here 25% to 100% of its channels)
    assert all(0.25 - 1e-9 <= 1 - fraction <= 1 for fraction in varied.sparsity.values())
    assert all(after >= 1 for _, after in varied.widths.values())
    assert varied.cost() <= plan.cost()


def test_keep_dense_layers_keep_their_width_under_sensitivity():
    model = graph_model()
    plan = plan_channels(model, 0.5, keep_dense=["mix", "fc"])
    drops = Sensitivity("accuracy", {root: 0.03 * i for i, root in enumerate(plan.free)}, 0.01, 100)
    varied = allocate(plan, 0.5, drops)
    assert varied.widths["mix"] == (24, 24) and varied.widths["fc"] == (32, 32)
    assert set(varied.left) == {"mix", "fc"} and varied.shrunk


def test_config_allocation_is_for_channels_only():
    assert Prune.Config(method="channels", target_sparsity=0.5).allocation == "uniform"
    assert Prune.Config(method="channels", allocation="sensitivity").allocation == "sensitivity"
    with pytest.raises(pydantic.ValidationError, match="allocation applies to method=channels"):
        Prune.Config(method="magnitude", allocation="uniform")
    with pytest.raises(pydantic.ValidationError):
        Prune.Config(method="channels", allocation="flops")


def test_technique_allocates_by_validation_sensitivity(cnn, digits_images, ctx_factory):
    """Per-layer fractions vary, every shrunk layer is reported, no more MACs than uniform."""
    from kfopt.flops import keras_flops

    handle = ModelHandle.from_keras(cnn)
    ctx = ctx_factory(digits_images)
    config = Prune.Config(method="channels", target_sparsity=0.5, allocation="sensitivity", epochs=1)
    out = Prune().apply(handle, config, ctx)
    uniform = remove_channels(cnn, plan_channels(cnn, 0.5))
    (line,) = [n for n in out.info["notes"] if n.startswith("prune(method=channels) removed")]
    assert "by validation accuracy sensitivity (the MACs of 50% everywhere)" in line, line
    shrunk = {name: [before, after] for name, (before, after) in plan_channels(cnn, 0.5).widths.items()}
    assert set(out.info["channels"]) <= set(shrunk) and out.info["channels"]
    assert all(out.info["channels"][name][0] == shrunk[name][0] for name in out.info["channels"])
    assert keras_flops(out.keras()) <= keras_flops(uniform)
    x, y = digits_images.test.arrays()
    assert float((out.keras().predict(x, verbose=0).argmax(axis=1) == y).mean()) > 0.8


def test_without_validation_data_every_layer_loses_the_same_fraction(cnn, digits_images, ctx_factory):
    from dataclasses import replace

    from kfopt.data import Split
    from kfopt.plugins.prune import _by_sensitivity

    ctx = ctx_factory(digits_images)
    x, y = digits_images.validation.arrays()
    plan = plan_channels(cnn, 0.5)
    config = Prune.Config(method="channels", target_sparsity=0.5, allocation="sensitivity")
    assert _by_sensitivity(cnn, plan, config, replace(ctx, validation=Split(x[:0], y[:0]))) == (plan, None)
    measured, by = _by_sensitivity(cnn, plan, config, ctx)
    assert by == "validation accuracy" and measured.widths != plan.widths
