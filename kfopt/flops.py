"""The ``flops`` metric: multiply-accumulates (MACs) of one forward pass for one input.

Counted as FLOPs tables of vision models count them: the multiply-accumulates
of convolutions, dense layers, attention and recurrent cells, read from the
layer graph of a tf_keras model (:func:`keras_flops`) or from the operators of
a TFLite flatbuffer (:func:`tflite_flops`). Element-wise work (activations,
normalisation, pooling, additions) and table lookups (Embedding) count 0: they
are a small share of the time on the models kfopt optimizes, and counting
them would make the number depend on how a runtime fuses them.

A model whose count cannot be known (a custom layer with kernels, a sequence
of unknown length) has ``None``, never a guess.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import _tf

#: Recurrent cells: multiply-accumulate blocks per step (one per gate).
RNN_GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}


class _Unknown(Exception):
    """A layer whose multiply-accumulates cannot be counted."""


def _prod(dims) -> int:
    dims = list(dims)
    if any(not isinstance(d, int) for d in dims):
        raise _Unknown("a dimension is not known")
    return math.prod(dims)


def _shape(tensor) -> tuple:
    return tuple(tensor.shape)


def model_flops(handle) -> int | None:
    """The ``flops`` of a :class:`~kfopt.plugins.ModelHandle`: from its Keras graph or TFLite operators, else
    what the step that made it recorded (``info["flops"]``); None when unknown."""
    try:
        if handle.format == "keras":
            return keras_flops(handle.keras())
        if handle.format == "tflite":
            return tflite_flops(handle.tflite())
    except Exception:  # a metric must never fail a candidate: unknown is None
        return None
    return handle.info.get("flops")


def keras_flops(model) -> int | None:
    """Multiply-accumulates of ``model`` (Sequential or functional tf_keras, nested models included) for one input.

    None for a subclassed model or a layer that cannot be counted.
    """
    try:
        return _graph_macs(model)
    except _Unknown:
        return None


def _graph_macs(model) -> int:
    keras = _tf.keras()
    nodes = getattr(model, "_nodes_by_depth", None)
    if not nodes:
        raise _Unknown(f"'{model.name}' has no layer graph")
    total = 0
    for depth in sorted(nodes, reverse=True):
        for node in nodes[depth]:
            layer = node.layer
            if type(layer).__name__ == "InputLayer":
                continue
            if isinstance(layer, keras.Model):
                total += _graph_macs(layer)
                continue
            inputs = [_shape(t) for t in node.keras_inputs]
            outputs = [_shape(t) for t in _tf.tf().nest.flatten(node.outputs)]
            total += layer_macs(layer, inputs, outputs)
    return total


def layer_macs(layer, inputs: list[tuple], outputs: list[tuple]) -> int:
    """Multiply-accumulates of one call of ``layer`` on inputs of shapes ``inputs`` (batch axis first) for one
    sample. Raises _Unknown for a layer with kernels kfopt does not know."""
    kind = type(layer).__name__
    out = outputs[0][1:] if outputs else ()
    if kind in ("Conv1D", "Conv2D", "Conv3D"):
        # kernel (*window, in / groups, filters): each output value is one window over in/groups channels
        return _prod(out) * _prod(layer.kernel.shape[:-1])
    if kind in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        # kernel (*window, filters, in): each input value is spread over a window of every filter
        return _prod(inputs[0][1:]) * _prod(layer.kernel.shape[:-1])
    if kind in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return _prod(out) * _prod(layer.depthwise_kernel.shape[:-2])
    if kind in ("SeparableConv1D", "SeparableConv2D"):
        positions = _prod(out) // out[-1] if layer.data_format == "channels_last" else _prod(out[1:])
        return positions * (_prod(layer.depthwise_kernel.shape) + _prod(layer.pointwise_kernel.shape))
    if kind == "Dense":
        return _prod(out) * int(layer.kernel.shape[0])
    if kind == "EinsumDense":
        # every output value sums over the kernel's axes that are not output axes
        return _prod(out) * (_prod(layer.kernel.shape) // max(1, _prod(_einsum_output_dims(layer))))
    if kind == "MultiHeadAttention":
        return _attention_macs(layer, inputs, outputs)
    if kind in RNN_GATES:
        steps, features = inputs[0][1], inputs[0][-1]
        units = layer.cell.units
        return _prod([steps]) * RNN_GATES[kind] * (_prod([features]) + units) * units
    if kind == "Bidirectional":
        return layer_macs(layer.forward_layer, inputs, outputs) + layer_macs(layer.backward_layer, inputs, outputs)
    if kind == "TimeDistributed":
        steps = _prod([inputs[0][1]])
        inner_in = [(s[0], *s[2:]) for s in inputs]
        inner_out = [(s[0], *s[2:]) for s in outputs]
        return steps * layer_macs(layer.layer, inner_in, inner_out)
    if kind == "Embedding" or not [w for w in layer.trainable_weights if len(w.shape) >= 2]:
        return 0  # lookups and element-wise layers
    raise _Unknown(f"cannot count the multiply-accumulates of {kind}")


def _einsum_output_dims(layer) -> list[int]:
    """The sizes of an EinsumDense kernel's axes that appear in its output."""
    equation = layer.equation.replace(" ", "")
    operands, output = equation.split("->")
    kernel = operands.split(",")[1]
    return [int(size) for axis, size in zip(kernel, layer.kernel.shape) if axis in output]


def _attention_macs(layer, inputs: list[tuple], outputs: list[tuple]) -> int:
    """Projections of query, key and value, the scores, the weighted sum and the output projection."""
    query = inputs[0]
    value = inputs[1] if len(inputs) > 1 else query
    key = inputs[2] if len(inputs) > 2 else value
    heads, key_dim = layer._num_heads, layer._key_dim
    value_dim = layer._value_dim or key_dim
    tq, tk, tv = _prod(query[1:-1]), _prod(key[1:-1]), _prod(value[1:-1])
    dq, dk, dv = _prod(query[-1:]), _prod(key[-1:]), _prod(value[-1:])
    dout = _prod(outputs[0][-1:])
    return (
        tq * dq * heads * key_dim
        + tk * dk * heads * key_dim
        + tv * dv * heads * value_dim
        + tq * tk * heads * (key_dim + value_dim)
        + tq * heads * value_dim * dout
    )


def tflite_flops(content: bytes) -> int | None:
    """Multiply-accumulates of a TFLite model for one input, from its operators (None when a shape is unknown).

    The model runs once on zeros first: the shapes of tensors a runtime Reshape makes are only known then.
    """
    tf = _tf.tf()
    with warnings.catch_warnings():  # tf.lite.Interpreter's notice about LiteRT
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_content=content,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    inputs = interpreter.get_input_details()
    try:  # a tensor after a Reshape computed at run time has its shape only once the model ran
        interpreter.allocate_tensors()
        for detail in inputs:
            interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interpreter.invoke()
    except (RuntimeError, ValueError):
        return None
    shapes = {t["index"]: tuple(int(d) for d in t["shape"]) for t in interpreter.get_tensor_details()}
    batch = int(inputs[0]["shape"][0]) if inputs and len(inputs[0]["shape"]) > 1 else 1
    total = 0
    try:
        for op in interpreter._get_ops_details():  # tf.lite has no public per-operator listing
            total += _tflite_op_macs(op["op_name"], [shapes.get(i) for i in op["inputs"]], shapes.get(op["outputs"][0]))
    except (_Unknown, TypeError, IndexError):
        return None
    return total // max(1, batch)


#: TFLite operators that multiply by weights but whose count kfopt does not know: a model with one has None.
UNCOUNTED_OPS = frozenset({"BIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_RNN", "LSTM", "RNN", "SVDF"})
#: Words in a Select TF (Flex) or custom operator's name that mean it multiplies by weights.
UNCOUNTED_KERNELS = ("Conv", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Attention")


def _tflite_op_macs(name: str, inputs: list, output) -> int:
    if name in UNCOUNTED_OPS or (not name.isupper() and any(word in name for word in UNCOUNTED_KERNELS)):
        raise _Unknown(f"operator {name}")
    if name == "UNIDIRECTIONAL_SEQUENCE_LSTM":  # output (batch, steps, units); input_to_input weights (1) absent: CIFG
        gates = 4 if inputs[1] is not None else 3
        units, features = inputs[2]  # input_to_forget weights (units, input features)
        return _prod(output[:-1]) * gates * units * (features + units)
    if name == "UNIDIRECTIONAL_SEQUENCE_RNN":  # weights (units, in), recurrent (units, units)
        units, features = inputs[1]
        return _prod(output[:-1]) * units * (features + units)
    if name == "CONV_2D":  # filter (out, h, w, in / groups)
        return _prod(output) * _prod(inputs[1][1:])
    if name == "CONV_3D":  # filter (d, h, w, in, out)
        return _prod(output) * _prod(inputs[1][:-1])
    if name == "DEPTHWISE_CONV_2D":  # filter (1, h, w, channels)
        return _prod(output) * _prod(inputs[1][1:3])
    if name == "TRANSPOSE_CONV":  # inputs: output shape, filter (out, h, w, in), input
        return _prod(inputs[2]) * _prod(inputs[1][:3])
    if name == "FULLY_CONNECTED":  # filter (units, in)
        return _prod(output) * inputs[1][-1]
    if name == "BATCH_MATMUL":  # (..., m, k) x (..., k, n) -> (..., m, n)
        a, m = inputs[0], output[-2]
        depth = a[-1] if a[-2] == m else a[-2]
        return _prod(output) * depth
    return 0
