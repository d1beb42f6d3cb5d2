"""The built-in prune technique on a real trained model."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from conftest import accuracy, clone

from kfopt import _tf
from kfopt.data import Split
from kfopt.errors import KfoptError
from kfopt.plugins import ModelHandle
from kfopt.plugins import prune as prune_module
from kfopt.plugins.prune import Prune, steps_per_epoch, threshold_global
from kfopt.sparsity import weight_sparsity


def assert_same_weights(model, reference):
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def run(model, data, ctx_factory, **config):
    return Prune().apply(
        ModelHandle.from_keras(model, info={"from": "test"}), Prune.Config(**config), ctx_factory(data)
    )


def test_registers_through_the_hook():
    registered = []
    prune_module.kfopt_register_techniques(register=registered.append)
    (technique,) = registered
    assert (technique.name, technique.kind, technique.accepts, technique.produces) == (
        "prune",
        "prune",
        {"keras"},
        "keras",
    )
    assert technique.trains_for(Prune.Config())


@pytest.mark.parametrize(
    "bad",
    [
        {"target_sparsity": 1.5},
        {"target_sparsity": 0},
        {"method": "random"},
        {"epochs": 0},
        {"m_by_n": "4:2"},
        {"m_by_n": "two:four"},
        {"sparsity": 0.5},  # unknown key
        {"method": "structured", "target_sparsity": 0.7},  # would be silently ignored
        {"method": "l1", "norm": "l2"},  # norm ranks whole filters: channels only
        {"method": "channels", "norm": "l3"},
    ],
)
def test_config_rejects(bad):
    with pytest.raises(pydantic.ValidationError):
        Prune.Config(**bad)


def test_magnitude_reaches_target_keeps_accuracy_and_input(mlp, digits_flat, ctx_factory):
    before = clone(mlp)
    out = run(mlp, digits_flat, ctx_factory, target_sparsity=0.8, epochs=3)

    pruned = out.keras()
    assert out.format == "keras"
    assert abs(weight_sparsity(pruned) - 0.8) < 0.02
    assert out.info == {"from": "test", "sparsity": pytest.approx(weight_sparsity(pruned))}
    assert accuracy(pruned, digits_flat) > 0.85
    # Wrappers are stripped: the same plain layers as the input.
    assert [type(layer).__name__ for layer in pruned.layers] == [type(layer).__name__ for layer in mlp.layers]
    assert_same_weights(mlp, before)


def test_structured_2_4_has_two_zeros_in_every_group_of_four(mlp, digits_flat, ctx_factory):
    before = clone(mlp)
    out = run(mlp, digits_flat, ctx_factory, method="structured", m_by_n="2:4", epochs=2)

    pruned = out.keras()
    assert weight_sparsity(pruned) == pytest.approx(0.5, abs=0.01)
    for kernel in (w for w in pruned.get_weights() if w.ndim == 2):
        # tfmot groups consecutive weights along a Dense kernel's input axis (axis 0).
        groups = kernel.reshape(kernel.shape[0] // 4, 4, kernel.shape[1])
        zeros_per_group = (groups == 0).sum(axis=1)
        assert (zeros_per_group == 2).all()
    assert accuracy(pruned, digits_flat) > 0.85
    assert_same_weights(mlp, before)


def test_l1_reaches_target_and_keeps_input(mlp, digits_flat, ctx_factory):
    before = clone(mlp)
    out = run(mlp, digits_flat, ctx_factory, method="l1", target_sparsity=0.7, epochs=2)

    pruned = out.keras()
    assert weight_sparsity(pruned) == pytest.approx(0.7, abs=0.005)
    assert out.info["sparsity"] == pytest.approx(weight_sparsity(pruned))
    assert not pruned.losses  # the training penalty does not travel with the model
    assert accuracy(pruned, digits_flat) > 0.85
    assert_same_weights(mlp, before)


def test_threshold_global_is_exact_with_ties_and_leaves_biases():
    kernel = np.ones((10, 10), np.float32)  # all tied
    bias = np.zeros(10, np.float32) + 0.5
    out_kernel, out_bias = threshold_global([kernel, bias], 0.3)
    assert (out_kernel == 0).sum() == 30
    np.testing.assert_array_equal(out_bias, bias)


def test_steps_per_epoch_follows_how_the_data_is_batched(digits_flat):
    x, y = digits_flat.train.arrays()
    assert steps_per_epoch(digits_flat.train) == -(-len(x) // 32)
    dataset = _tf.tf().data.Dataset.from_tensor_slices((x, y)).batch(100)
    assert steps_per_epoch(Split(dataset=dataset)) == -(-len(x) // 100)
    unknown = dataset.filter(lambda *_: True)  # cardinality unknown: counted
    assert steps_per_epoch(Split(dataset=unknown)) == -(-len(x) // 100)


def test_unsupported_layer_is_a_clear_error(digits_flat, ctx_factory):
    keras = _tf.keras()

    class Custom(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(name="w", shape=(input_shape[-1], 10))

        def call(self, x):
            return x @ self.w

    model = keras.Sequential([keras.Input((64,)), Custom()])
    with pytest.raises(KfoptError, match="method=l1"):
        run(model, digits_flat, ctx_factory, target_sparsity=0.5, epochs=1)


@pytest.mark.parametrize("method, target", [("magnitude", 0.9), ("l1", 0.9), ("structured", 0.5)])
def test_keep_dense_leaves_those_layers_dense_and_prunes_the_others_to_the_target(
    method, target, mlp, digits_flat, ctx_factory
):
    before = clone(mlp)
    kept = mlp.layers[-1].name  # the small output layer
    config = {} if method == "structured" else {"target_sparsity": target}
    out = run(mlp, digits_flat, ctx_factory, method=method, epochs=2, keep_dense=[kept], **config)

    pruned = out.keras()
    zeros = {layer.name: float((layer.get_weights()[0] == 0).mean()) for layer in pruned.layers}
    assert zeros.pop(kept) == 0  # fine-tuned, not pruned
    kernels = [layer.get_weights()[0] for layer in pruned.layers if layer.name != kept]
    # target_sparsity (structured: m/n) is the sparsity of the pruned layers (each, or together for l1) ...
    assert sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels) == pytest.approx(target, abs=0.005)
    if method != "l1":
        assert all(value == pytest.approx(target, abs=0.005) for value in zeros.values())
    # ... and info["sparsity"] is the whole model's, the dense layer included.
    assert out.info["sparsity"] == pytest.approx(weight_sparsity(pruned)) and out.info["sparsity"] < target
    assert accuracy(pruned, digits_flat) > 0.8
    assert_same_weights(mlp, before)


def test_keep_dense_with_an_unknown_layer_names_it_and_lists_the_layers(mlp, digits_flat, ctx_factory):
    names = [layer.name for layer in mlp.layers]
    with pytest.raises(KfoptError) as err:
        run(mlp, digits_flat, ctx_factory, epochs=1, keep_dense=[names[0], "dense_99"])
    text = str(err.value)
    assert "'dense_99'" in text and ", ".join(names) in text and "\n" not in text
    assert Prune.Config(keep_dense="dense").keep_dense == ["dense"]  # one name is a list of one


def test_weightless_and_unsupported_layers_never_block_pruning_and_are_listed(digits_images, ctx_factory):
    """A Rescaling layer, a depthwise conv and a nested model: tfmot prunes what it can, the rest stays."""
    keras = _tf.keras()
    layers = keras.layers
    inner_in = keras.Input((14, 14, 8))
    inner = keras.Model(inner_in, layers.Conv2D(8, 3, padding="same", activation="relu")(inner_in), name="block")
    inputs = keras.Input((28, 28, 1))
    x = layers.Rescaling(1.0, name="scale")(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = inner(x)
    outputs = layers.Dense(10, activation="softmax", name="head")(layers.Flatten()(x))
    model = keras.Model(inputs, outputs)

    out = run(model, digits_images, ctx_factory, target_sparsity=0.6, epochs=1)
    pruned = out.keras()
    assert out.info["left_dense"] == {"depthwise": "tfmot does not prune DepthwiseConv2D kernels"}
    assert out.info["notes"] == [
        "prune(method=magnitude) left 1 of 4 layers with weights dense: "
        "tfmot does not prune DepthwiseConv2D kernels (depthwise)"
    ]
    for name in ("stem", "head"):
        assert (pruned.get_layer(name).kernel.numpy() == 0).mean() == pytest.approx(0.6, abs=0.01)
    assert (pruned.get_layer("block").layers[-1].kernel.numpy() == 0).mean() == pytest.approx(0.6, abs=0.01)
    assert not (pruned.get_layer("depthwise").depthwise_kernel.numpy() == 0).any()


def test_recurrent_layers_in_bidirectional_and_time_distributed_wrappers_are_pruned(digits_flat, ctx_factory):
    keras = _tf.keras()
    layers = keras.layers
    inputs = keras.Input((64,))
    x = layers.Reshape((8, 8))(inputs)  # eight rows of eight pixels: a sequence
    x = layers.TimeDistributed(layers.Dense(8), name="rows")(x)
    x = layers.Bidirectional(layers.LSTM(8), name="reader")(x)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", name="head")(x))

    out = run(model, digits_flat, ctx_factory, target_sparsity=0.5, epochs=1)
    assert "left_dense" not in out.info
    pruned = out.keras()
    for name in ("rows", "reader", "head"):
        kernels = [w for w in pruned.get_layer(name).get_weights() if w.ndim == 2]
        assert kernels and all((k == 0).mean() == pytest.approx(0.5, abs=0.01) for k in kernels)
