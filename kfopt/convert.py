"""Converting models to deployable formats: one TFLite converter, one SavedModel exporter.

Recurrent layers (LSTM, GRU, SimpleRNN) need a fixed sequence length in TFLite:
the converter cannot lower the loop of a Keras RNN whose shapes are dynamic
(``tf.TensorListReserve ... element_shape to be static``). kfopt converts

- a model whose recurrent layers are all unmasked LSTMs at batch size 1, where
  the converter fuses each into one ``UNIDIRECTIONAL_SEQUENCE_LSTM`` op (the
  TFLite guide's recipe; int8 keeps 16-bit cell state inside the op), and
- any other recurrent model (GRU, SimpleRNN, a masked LSTM) from a copy whose
  recurrent layers are unrolled over the fixed sequence length: plain builtin
  ops, any batch size, int8 like any other layer. (Converting their loop as
  it is works in float, but full-integer calibration of a TFLite ``WHILE``
  loop crashes the converter, so the unrolled copy is used in every mode.)

Select TF ops (the Flex delegate) are never used: TensorFlow's Python
interpreter and most devices cannot run them. :func:`tflite_ops` says what
a converted model is made of and which ops stay float in an int8 model.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from . import _tf
from .errors import KfoptError
from .signature import RECURRENT_LAYERS

TFLITE_MODES = ("fp32", "dynamic", "float16", "int8")
#: What a TFLite model runs on (``tflite_ops`` of a candidate).
BUILTINS = "TFLite builtins"
SELECT_TF_OPS = "TFLite builtins + Select TF ops"
#: Layers whose input is an id (a float input feeding one keeps float32 in int8: quantizing would change the ids).
ID_LAYERS = frozenset({"Embedding", "CategoryEncoding", "IntegerLookup", "StringLookup", "Hashing"})


def to_tflite(model, mode: str = "fp32", representative: Callable | None = None) -> bytes:
    """Convert to TFLite: ``fp32`` (no quantization), ``dynamic`` range, ``float16`` or full-integer ``int8``.

    ``model`` is a tf_keras model, or the path of a SavedModel (converted
    through its ``serving_default`` signature: no Keras layers needed).
    ``int8`` needs ``representative`` (a generator function yielding one input
    batch of one sample at a time: ``[x]``, ``[x1, x2]`` or ``{name: x}``) for
    calibration; float inputs and outputs become int8 too, so the model runs on
    integer-only accelerators, while integer inputs (token ids) stay integers
    and a float input that feeds an Embedding stays float32 (quantizing it
    would change the ids). Zero weights stay exactly zero (symmetric weight
    quantization), so a pruned model keeps its sparsity. A model the converter
    cannot take raises a KfoptError with the converter's first error line.
    """
    if mode not in TFLITE_MODES:
        raise ValueError(f"unknown TFLite mode {mode!r}; known: {', '.join(TFLITE_MODES)}")
    if mode == "int8" and representative is None:
        raise ValueError("int8 conversion needs a representative dataset")
    tf = _tf.tf()
    if isinstance(model, (str, os.PathLike)):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(model))
        return _convert(converter, mode, representative, int8_io=True)
    recurrent = recurrent_layers(model)
    if not recurrent:
        return _convert(keras_converter(model), mode, representative, int8_io=not id_inputs(model))
    return _recurrent_to_tflite(model, recurrent, mode, representative)


def tflite_problem(model) -> str | None:
    """Why ``model`` (tf_keras) cannot be converted to TFLite, found without converting; None when it can be tried."""
    recurrent = recurrent_layers(model)
    if recurrent and _open_dims(model):
        return (
            f"its recurrent layer{'s' if len(recurrent) > 1 else ''} {', '.join(recurrent)} need a fixed sequence "
            f"length in TFLite, but its input shape is {_input_shapes(model)}"
        )
    return None


def recurrent_layers(model) -> list[str]:
    """Names of the recurrent layers of ``model`` (inside Bidirectional wrappers and nested models too)."""
    from .signature import keras_info

    return list(keras_info(model).recurrent)


def id_inputs(model) -> list[str]:
    """Names of the model's float inputs that carry ids (they feed an Embedding or a lookup layer directly)."""
    names = []
    for name, tensor in zip(getattr(model, "input_names", None) or [], getattr(model, "inputs", None) or []):
        if tensor.dtype.is_integer:
            continue
        history = getattr(tensor, "_keras_history", None)
        consumers = [node.outbound_layer for node in getattr(history.layer, "_outbound_nodes", [])] if history else []
        if any(type(layer).__name__ in ID_LAYERS for layer in consumers):
            names.append(name)
    return names


def _recurrent_to_tflite(model, recurrent: list[str], mode: str, representative) -> bytes:
    problem = tflite_problem(model)
    if problem:
        raise KfoptError(
            f"The model cannot be converted to TFLite: {problem}.",
            "give the model's input a fixed sequence length (keras.Input(shape=(T, ...))), or use a recipe "
            "that keeps the Keras format (prune, distill).",
        )
    int8_io = not id_inputs(model)
    if _fusable_lstm(model):
        try:
            if mode == "int8" and "WHILE" in _op_names(_convert(keras_converter(model, 1), "fp32", None, int8_io)):
                raise KfoptError("the LSTM was not fused")  # its loop would crash int8 calibration: unroll instead
            return _convert(keras_converter(model, 1), mode, representative, int8_io)
        except KfoptError:
            pass  # not fused after all: unroll it like any other recurrent layer
    return _convert(keras_converter(unrolled(model)), mode, representative, int8_io)


def _fusable_lstm(model) -> bool:
    """True when every recurrent layer is a plain LSTM and nothing masks the sequence (TFLite fuses those)."""
    from .signature import _walk_layers

    layers = list(_walk_layers(model))
    if any(type(layer).__name__ == "Masking" or getattr(layer, "mask_zero", False) for layer in layers):
        return False
    cells = [layer for layer in layers if type(layer).__name__ in RECURRENT_LAYERS]
    return all(type(layer).__name__ == "LSTM" and not layer.stateful for layer in cells)


def keras_converter(model, batch: int | None = None):
    """A TFLite converter for the tf_keras ``model``, traced at ``batch`` (None: any batch size).

    Its signature is keyed by the Keras input and output names, as
    ``from_keras_model`` keys it; converting the traced function with only the
    model's variables is several times faster (``from_keras_model`` saves the
    whole Keras model first) and gives the same flatbuffer.
    """
    tf = _tf.tf()
    if not getattr(model, "inputs", None):  # a subclassed model never called on a Keras Input
        return tf.lite.TFLiteConverter.from_keras_model(model)
    specs = [
        tf.TensorSpec([batch, *tensor.shape[1:]], tensor.dtype, name=name)
        for name, tensor in zip(model.input_names, model.inputs)
    ]

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(model.output_names, outputs))

    holder = tf.Module()
    holder.weights_of_model = list(model.variables)  # what the converter needs to freeze the function
    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], holder)


def unrolled(model):
    """A copy of ``model`` (same weights) whose recurrent layers are unrolled over their fixed sequence length."""

    def unroll(config):
        if isinstance(config, dict):
            if config.get("class_name") in RECURRENT_LAYERS and isinstance(config.get("config"), dict):
                config["config"]["unroll"] = True
            for value in config.values():
                unroll(value)
        elif isinstance(config, list):
            for value in config:
                unroll(value)
        return config

    try:
        config = unroll({"class_name": type(model).__name__, "config": model.get_config()})["config"]
        copy = type(model).from_config(config)
        copy_weights(model, copy)
    except Exception as exc:  # a custom layer without from_config, a subclassed model, a weight with no twin
        raise KfoptError(
            f"The model's recurrent layers cannot be unrolled for TFLite ({type(exc).__name__}: {exc}).",
            "build the model from built-in Keras layers with a fixed sequence length, or use a Keras-format recipe.",
        ) from None
    return copy


def copy_weights(source, target) -> None:
    """Copy ``source``'s weights into ``target``, a model rebuilt from its config, layer by layer (by layer name).

    A rebuilt model need not list its weights as the original does: tfmot's ``QuantizeLayer`` (in front of a
    float input's first quantized layer, e.g. a Reshape) builds its quantizer's ranges twice when rebuilt, so the
    copy holds more weights than the original and one flat ``set_weights`` list misses by two. Within a layer the
    weights are matched by position when both list the same shapes, else by name (the full name, or the last
    part of it when that is unique); a weight of ``source`` with no twin raises ValueError.
    """
    keras = _tf.keras()
    originals = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        original = originals.get(layer.name)
        if original is None:
            raise ValueError(f"the rebuilt layer '{layer.name}' has no twin in '{source.name}'")
        if isinstance(layer, keras.Model):
            copy_weights(original, layer)
        else:
            _copy_layer_weights(original, layer)


def _copy_layer_weights(original, twin) -> None:
    if [tuple(w.shape) for w in original.weights] == [tuple(w.shape) for w in twin.weights]:
        twin.set_weights(original.get_weights())
        return
    by_name = {w.name: w for w in twin.weights}
    for weight in original.weights:
        match = by_name.get(weight.name)
        if match is None:
            tail = weight.name.split("/")[-1]
            same = [w for w in twin.weights if w.name.split("/")[-1] == tail and w.shape == weight.shape]
            if len(same) != 1:
                raise ValueError(f"the weight '{weight.name}' of layer '{original.name}' has no single twin")
            match = same[0]
        match.assign(weight)


def _convert(converter, mode: str, representative, int8_io: bool) -> bytes:
    """Configure ``converter`` for ``mode`` and convert; a KfoptError with the converter's own first error line."""
    tf = _tf.tf()
    if mode in ("dynamic", "float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():
            # int8 conversion warns about missing input statistics; the representative dataset provides them.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            return converter.convert()
    except Exception as exc:  # the converter's errors are pages of MLIR locations: keep the line that says why
        raise KfoptError(
            f"TFLite conversion ({mode}) failed: {_converter_error(exc)}",
            "use another quantize mode, or a recipe that keeps the Keras format (prune, distill).",
        ) from None


def _converter_error(exc: Exception) -> str:
    """The converter's reason in one line: its last ``error:`` line, with the lines that explain a generic one."""
    text = str(exc)
    found = list(re.finditer(r"error: ([^\n]*)", text))
    if not found:
        return ((text.strip().splitlines() or [type(exc).__name__])[0]).strip()[:300]
    last = found[-1]
    line = last.group(1).strip()
    if line.startswith("failed while converting"):  # a summary: the ops it could not take are listed after it
        missing = re.findall(r"(?:TF Select|Custom) ops: ([^\n]+)", text)
        if missing:
            line = f"the model needs ops that TFLite builtins do not have: {', '.join(m.strip() for m in missing)}"
        elif len(found) > 1:
            line = found[-2].group(1).strip()
    return line[:300]


def tflite_ops(content: bytes) -> dict:
    """What a TFLite model is made of, for its candidate's record.

    ``tflite_ops``: ``TFLite builtins`` or ``TFLite builtins + Select TF ops``
    (with ``, batch 1`` for a model converted at a fixed batch size, e.g. a
    fused LSTM, whose state variables a server resets between requests:
    ``interpreter.reset_all_variables()``); ``float_ops``: in a model that computes in int8, the ops that
    stay float (None when every op is integer, or the model is a float one).
    """
    tf = _tf.tf()
    with warnings.catch_warnings():  # tf.lite.Interpreter's notice about LiteRT
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_content=content,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    select = any(op["op_name"].startswith("Flex") for op in ops)
    described = SELECT_TF_OPS if select else BUILTINS
    batch = interpreter.get_input_details()[0]["shape_signature"]
    if len(batch) and batch[0] > 0:
        described += f", batch {batch[0]}"

    def computes_in(op, kinds) -> bool:
        return any(dtypes.get(i) is not None and dtypes[i].__name__ in kinds for i in op["outputs"])

    # An int8 GATHER is a dynamic-range embedding lookup (dequantized right after), not integer compute.
    integer = [op for op in ops if op["op_name"] != "GATHER" and computes_in(op, ("int8", "uint8", "int16"))]
    floats = sorted({op["op_name"] for op in ops if computes_in(op, ("float32", "float16"))})
    return {"tflite_ops": described, "float_ops": ", ".join(floats) if integer and floats else None}


def _op_names(content: bytes) -> set[str]:
    tf = _tf.tf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_content=content,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    return {op["op_name"] for op in interpreter._get_ops_details()}


def _open_dims(model) -> bool:
    shapes = model.input_shape if isinstance(model.input_shape, list) else [model.input_shape]
    return any(d is None for shape in shapes for d in tuple(shape)[1:])


def _input_shapes(model) -> str:
    shapes = model.input_shape if isinstance(model.input_shape, list) else [model.input_shape]
    return ", ".join(str(tuple(shape)[1:]) for shape in shapes)


def to_saved_model(keras_model, path: str | os.PathLike, *, jit_compile: bool = False) -> Path:
    """Export a serving SavedModel whose ``serving_default`` calls the model (XLA-compiled if asked).

    Its signature takes ``input`` and returns ``output``; a model with several
    inputs or outputs has them keyed by their Keras names. Each input keeps its
    own dtype (token ids stay integers).
    """
    tf = _tf.tf()
    names = list(keras_model.input_names) if len(keras_model.inputs) > 1 else ["input"]
    specs = [
        tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=name)
        for name, tensor in zip(names, keras_model.inputs)
    ]
    output_names = list(keras_model.output_names) if len(keras_model.outputs) > 1 else ["output"]

    class Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=specs, jit_compile=jit_compile)
        def serve(self, *inputs):
            outputs = self.model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            return dict(zip(output_names, outputs))

    module = Serving(keras_model)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)
