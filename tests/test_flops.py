"""The flops metric counts the same multiply-accumulates from a Keras graph and from its TFLite conversion."""

from __future__ import annotations

import numpy as np
import pytest

from kfopt import _tf
from kfopt.convert import to_tflite
from kfopt.flops import keras_flops, tflite_flops


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_a_recurrent_model_has_the_same_flops_in_keras_and_in_tflite(cell):
    # A fused LSTM is one TFLite operator: counted as nothing, an int8 LSTM would show a 300x flops cut.
    keras = _tf.keras()
    layers = keras.layers
    model = keras.Sequential([keras.Input((10, 8)), getattr(layers, cell)(16), layers.Dense(3)])
    gates = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}[cell]
    assert keras_flops(model) == 10 * gates * 16 * (8 + 16) + 16 * 3
    assert tflite_flops(to_tflite(model)) == keras_flops(model)
    samples = np.random.default_rng(0).normal(size=(8, 1, 10, 8)).astype("float32")
    assert tflite_flops(to_tflite(model, "int8", lambda: ([x] for x in samples))) == keras_flops(model)


def test_a_tflite_operator_that_multiplies_by_weights_kfopt_cannot_count_gives_no_flops():
    from kfopt.flops import _tflite_op_macs, _Unknown

    for name in ("FlexConv2D", "FlexBatchMatMulV2", "BIDIRECTIONAL_SEQUENCE_LSTM"):
        with pytest.raises(_Unknown):
            _tflite_op_macs(name, [(1, 4)], (1, 4))
    assert _tflite_op_macs("FlexTensorListReserve", [(1, 4)], (1, 4)) == 0


def test_a_transformer_has_the_same_flops_in_keras_and_in_tflite():
    # Its feed-forward block reads a tensor reshaped at run time: counted before running, it looked 1 token long.
    keras = _tf.keras()
    layers = keras.layers
    tokens = keras.Input((24,), dtype="int32")
    x = layers.Embedding(64, 32)(tokens)
    x = layers.Add()([x, layers.MultiHeadAttention(num_heads=2, key_dim=16)(x, x)])
    x = layers.Dense(32)(layers.Dense(64, activation="relu")(x))
    model = keras.Model(tokens, layers.Dense(3)(layers.GlobalAveragePooling1D()(x)))
    attention = 4 * 24 * 32 * 32 + 2 * 24 * 24 * 2 * 16
    assert keras_flops(model) == attention + 2 * 24 * 32 * 64 + 32 * 3
    assert tflite_flops(to_tflite(model)) == keras_flops(model)
