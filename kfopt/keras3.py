"""Keras 3 models in, the user's Keras out.

Today's Keras is Keras 3 (``tf.keras`` on TensorFlow 2.16+, or ``import keras``),
but kfopt works in tf_keras (Keras 2) because tensorflow-model-optimization
needs it. This module bridges the two: it translates a model's config from one
Keras to the other (input shapes, dtype policies, functional node format, the
options only one of them has), builds the model in the other Keras, copies the
weights layer by layer, and proves every conversion numerically: both models
run on the same batch and the conversion is refused when their outputs differ
by more than :data:`TOLERANCE`. Nothing is assumed equal because it looks equal.

Only built-in layers cross the bridge; a custom layer's code is written against
one Keras and cannot run in the other, so it is refused with one line naming it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import weakref
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _tf
from .errors import KfoptError
from .models import _first_line

#: The flavour a user's model came in, kept in ``ModelHandle.info[FLAVOR_KEY]``.
KERAS3 = "keras3"
TF_KERAS = "tf_keras"
FLAVOR_KEY = "keras_flavor"

#: Largest allowed difference between a model and its conversion (times max(1, largest output)).
TOLERANCE = 1e-5

#: Rows of generated input a conversion is proven on when the caller gives no data.
SAMPLE_ROWS = 8

_MODEL_CLASSES = ("Sequential", "Functional", "Model")
_CONSTANT_VALUE = "_CONSTANT_VALUE"  # tf_keras' marker for a constant in a node's first argument

# Options one Keras has and the other lacks, with the values for which dropping
# them computes exactly the same thing. ``None`` as the set means any value:
# the option only picks a kernel or seeds training-time randomness.
_ANY = None
_ONLY_IN_KERAS3: dict[str, set | None] = {
    "quantization_config": {None},
    "lora_rank": {None},
    "lora_alpha": {None},
    "optional": {False},
    "rms_scaling": {False},
    "use_gate": {False},
    "sliding_window": {None},
    "flash_attention": {None, False},
    "use_cudnn": _ANY,
    "seed": _ANY,
    "data_format": {"channels_last", None},  # e.g. ZeroPadding1D: tf_keras works channels-last only
}
_ONLY_IN_TF_KERAS: dict[str, set | None] = {
    "softmax_robust_masking": {False},
    "query_shape": _ANY,  # build hints; Keras 3 builds MultiHeadAttention from its first call
    "key_shape": _ANY,
    "value_shape": _ANY,
    "time_major": {False},
    "implementation": _ANY,  # which recurrent kernel runs, not what it computes
    "input_length": _ANY,
    "virtual_batch_size": {None},
    "adjustment": {None},
    "fused": _ANY,
    "renorm": {False},
    "renorm_clipping": {None},
    "renorm_momentum": _ANY,
    "groups": {1},  # DepthwiseConv2D
    "batch_input_shape": _ANY,  # on a layer after the InputLayer, which holds the shape
    # Separable and depthwise convolutions inherit these from tf_keras' Conv; Keras 3's do not take them.
    "kernel_initializer": _ANY,
    "kernel_regularizer": {None},
    "kernel_constraint": {None},
}
# Activations both Keras name alike but define differently: {name: what differs}.
_ACTIVATIONS_THAT_DIFFER = {
    "hard_sigmoid": "Keras 3 computes relu6(x + 3) / 6 and tf_keras clip(0.2 * x + 0.5, 0, 1)",
}
# Same option, different name: {class: {Keras 3 name: tf_keras name}}.
_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}}


# Operations Keras 3 records when a functional model applies keras.ops (or an operator such as
# ``x + y``) to tensors, and the TensorFlow function tf_keras records for the same call in a
# TFOpLambda layer: {Keras 3 op class: (TensorFlow function, its argument names, options)}.
# Both sides name a TensorFlow API symbol, never Python code, so they are safe to rebuild.
_OPS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "Add": ("math.add", ("x", "y"), ()),
    "Subtract": ("math.subtract", ("x", "y"), ()),
    "Multiply": ("math.multiply", ("x", "y"), ()),
    "Divide": ("math.truediv", ("x", "y"), ()),
    "TrueDivide": ("math.truediv", ("x", "y"), ()),
    "Maximum": ("math.maximum", ("x", "y"), ()),
    "Minimum": ("math.minimum", ("x", "y"), ()),
    "Equal": ("math.equal", ("x", "y"), ()),
    "NotEqual": ("math.not_equal", ("x", "y"), ()),
    "Mean": ("math.reduce_mean", ("input_tensor",), ("axis", "keepdims")),
    "Sum": ("math.reduce_sum", ("input_tensor",), ("axis", "keepdims")),
    "Max": ("math.reduce_max", ("input_tensor",), ("axis", "keepdims")),
    "Sqrt": ("math.sqrt", ("x",), ()),
    "Square": ("math.square", ("x",), ()),
    "Absolute": ("math.abs", ("x",), ()),
    "Negative": ("math.negative", ("x",), ()),
    "Exp": ("math.exp", ("x",), ()),
}
# tf_keras records some operators under their own names.
_TF_FUNCTION_OPS = {function: op for op, (function, _, _) in _OPS.items() if op != "TrueDivide"} | {
    "__operators__.add": "Add"
}


@dataclass(frozen=True)
class Proof:
    """How a conversion was checked: both models on the same inputs, outputs compared."""

    direction: str
    max_abs_diff: float
    tolerance: float
    rows: int
    inputs: str  # "given" (the caller's data) or "generated"

    def as_info(self) -> dict:
        """The proof as plain JSON values, for ``ModelHandle.info`` and metrics files."""
        return asdict(self)


# A tf_keras model built from a Keras 3 one -> the proof of that conversion. Weak keys:
# the record lives as long as the model does, and nothing is written into Keras objects.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Unconvertible(Exception):
    """One layer that cannot cross the bridge; becomes a KfoptError naming the model."""

    def __init__(self, layer: str, cls: str, why: str, fix: str):
        self.layer, self.cls, self.why, self.fix = layer, cls, why, fix
        super().__init__(f"layer '{layer}' ({cls}) {why}")


# -- which Keras is this -----------------------------------------------------------
def keras3():
    """Return the Keras 3 package (``import keras``), with TensorFlow set up by :mod:`kfopt._tf` first.

    ``TF_USE_LEGACY_KERAS=1`` only redirects ``tf.keras``; the ``keras`` package
    itself is Keras 3, so both live in one process.
    """
    _tf.tf()
    try:
        import keras
    except ImportError:
        raise KfoptError(
            "This model needs Keras 3 to be read, but the 'keras' package is not installed.",
            "pip install 'keras>=3'.",
        ) from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise KfoptError(
            f"The installed 'keras' package is {keras.__version__}, not Keras 3.", "pip install 'keras>=3'."
        )
    return keras


def file_keras_version(path: str | os.PathLike) -> str | None:
    """The Keras version a ``.keras`` or ``.h5`` file was saved with, or None when it does not say."""
    path = Path(path)
    try:
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                version = f.attrs.get("keras_version")
            return version.decode() if isinstance(version, bytes) else version
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("metadata.json")).get("keras_version")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def is_keras3_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.keras`` or ``.h5`` file saved by Keras 3 (tf_keras writes 2.x versions)."""
    major = str(file_keras_version(path) or "").split(".")[0]
    return major.isdigit() and int(major) >= 3


def is_keras3_model(obj) -> bool:
    """Whether ``obj`` is a Keras 3 model (checked without importing Keras 3)."""
    keras = sys.modules.get("keras")
    if keras is None or not hasattr(keras, "Model") or not hasattr(keras, "__version__"):
        return False
    return int(keras.__version__.split(".")[0]) >= 3 and isinstance(obj, keras.Model)


def flavor_of(model) -> str | None:
    """``"keras3"`` for a tf_keras model this module built from a Keras 3 model, else None."""
    try:
        return KERAS3 if model in _CONVERTED else None
    except TypeError:  # not weak-referenceable: not ours
        return None


def proof_of(model) -> Proof | None:
    """The proof of the Keras 3 -> tf_keras conversion that built ``model``, if it was built so."""
    try:
        return _CONVERTED.get(model)
    except TypeError:
        return None


def keras3_input_shape(path: str | os.PathLike) -> tuple | None:
    """Input shape (no batch axis) of a single-input Keras 3 file, read from its config without building it."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    inputs = [layer for layer in config.get("config", {}).get("layers", []) if layer.get("class_name") == "InputLayer"]
    if len(inputs) != 1:
        return None
    shape = inputs[0].get("config", {}).get("batch_shape")
    return tuple(shape[1:]) if shape else None


# -- the two directions --------------------------------------------------------------
def load(path: str | os.PathLike, *, unsafe: bool = False, sample=None):
    """Load a Keras 3 ``.keras`` (or ``.h5``) file as a proven tf_keras model.

    Keras 3 reads the file in safe mode (no Lambda, no unregistered custom
    objects) unless ``unsafe``; then :func:`to_tf_keras` rebuilds it.
    """
    keras = keras3()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        raise KfoptError(
            f"Model '{path}' could not be loaded by Keras {keras.__version__} ({_cause(exc)}).",
            "save the model with model.save('model.keras') from the same Keras, with every custom layer "
            "registered (keras.saving.register_keras_serializable); pass --unsafe only for a model you trust.",
        ) from None
    return to_tf_keras(model, unsafe=unsafe, sample=sample, name=str(path))


def to_tf_keras(model, *, unsafe: bool = False, sample=None, name: str | None = None):
    """Rebuild an in-memory Keras 3 model in tf_keras and prove the two compute the same outputs.

    ``sample`` is input data to prove the conversion on (an array, or a list of
    arrays for several inputs); without it, inputs of the right shape and dtype
    are generated (token ids for Embedding inputs). Raises KfoptError naming the
    first layer that cannot be converted, or when the outputs differ by more
    than :data:`TOLERANCE`.
    """
    keras = keras3()
    tk = _tf.keras()
    label = f"'{name or model.name}'"
    serialized = _serialized_keras3_model(model, keras, label)
    _refuse_lambda(serialized, label, unsafe)
    try:
        translated = _to_tf_keras(serialized)
        converted = _build(tk.layers.deserialize, translated, _tf_keras_layer_check)
        _copy_weights(model, converted)
    except _Unconvertible as bad:
        raise _error(label, bad, "tf_keras") from None
    proof = _prove(model, converted, sample, f"{KERAS3} -> {TF_KERAS}", label, _inputs_of_keras3(model))
    _CONVERTED[converted] = proof
    return converted


def to_keras3(model, *, sample=None, name: str | None = None):
    """Rebuild a tf_keras model in Keras 3 and prove the two compute the same outputs (the user's Keras out)."""
    keras = keras3()
    label = f"'{name or model.name}'"
    try:
        serialized = _to_keras3(_serialized_tf_keras_model(model, label), model)
        converted = _build(keras.saving.deserialize_keras_object, serialized, _keras3_layer_check)
        _copy_weights(model, converted)
    except _Unconvertible as bad:
        raise _error(label, bad, f"Keras {keras.__version__}") from None
    # The generated sample is decided on the Keras 3 side: one rule for both directions.
    _prove(model, converted, sample, f"{TF_KERAS} -> {KERAS3}", label, _inputs_of_keras3(converted))
    return converted


def save(model, path: str | os.PathLike, *, sample=None) -> Path:
    """Write a tf_keras model as a ``.keras`` file that Keras 3 loads (converted and proven first)."""
    path = Path(path)
    converted = to_keras3(model, sample=sample)
    converted.save(path)
    return path


# -- reading the source model --------------------------------------------------------
def _serialized_keras3_model(model, keras, label: str) -> dict:
    if not isinstance(model, keras.Model):
        raise KfoptError(f"{label} is a {type(model).__name__}, not a Keras 3 model.", "pass a keras.Model.")
    if type(model).__name__ not in _MODEL_CLASSES or not type(model).__module__.startswith("keras"):
        raise KfoptError(
            f"Model {label} is a subclassed Keras 3 model (class {type(model).__name__}); kfopt can rebuild "
            "only Sequential and functional models in tf_keras.",
            "build it with keras.Sequential or the functional API, or export a SavedModel with model.export(...).",
        )
    if not model.built or not model.inputs:
        raise KfoptError(
            f"Model {label} has no inputs yet (it was never built).",
            "start the model with keras.Input(shape=...) so its input shape is known.",
        )
    return keras.saving.serialize_keras_object(model)


def _serialized_tf_keras_model(model, label: str) -> dict:
    tk = _tf.keras()
    if type(model).__name__ not in _MODEL_CLASSES or not type(model).__module__.startswith("tf_keras"):
        raise KfoptError(
            f"Model {label} is a subclassed tf_keras model (class {type(model).__name__}); only Sequential and "
            "functional models can be written for Keras 3.",
            "build the model with Sequential or the functional API.",
        )
    return tk.layers.serialize(model)


def _refuse_lambda(serialized: dict, label: str, unsafe: bool) -> None:
    """A Lambda layer is Python code: it never runs without --unsafe (and cannot cross the bridge anyway)."""
    if unsafe:
        return
    for layer in _walk_layers(serialized):
        if layer.get("class_name") == "Lambda":
            raise KfoptError(
                f"Model {label} has Lambda layer '{layer.get('config', {}).get('name', '?')}', which runs "
                "arbitrary Python code; refused in safe mode.",
                "replace the Lambda with built-in layers, or pass --unsafe only if you trust the model.",
            )


def _walk_layers(serialized: dict):
    """Every layer config in a serialized model, nested models included."""
    for layer in serialized.get("config", {}).get("layers", []):
        yield layer
        if layer.get("class_name") in _MODEL_CLASSES:
            yield from _walk_layers(layer)


# -- Keras 3 config -> tf_keras config ----------------------------------------------
def _to_tf_keras(obj: dict) -> dict:
    """A serialized Keras 3 model or layer, rewritten as tf_keras serializes it."""
    cls = obj["class_name"]
    module = obj.get("module") or ""
    config = dict(obj["config"])
    name = config.get("name") or obj.get("name") or "?"
    if module.startswith(("keras.src.ops", "keras.ops")):
        return _op_to_tf_keras(obj, name)
    if cls in _MODEL_CLASSES and module.startswith("keras"):
        tf_cls = None
        config = _model_to_tf_keras(config)
    else:
        tf_cls = _tf_keras_layer_class(obj, name)
        config = _values_to_tf_keras(config, name, cls)
        if cls == "InputLayer":
            config["batch_input_shape"] = config.pop("batch_shape", None)
        for old, new in _RENAMED.get(cls, {}).items():
            if old in config:
                config[new] = config.pop(old)
        config = _drop_inert(config, tf_cls, _ONLY_IN_KERAS3, name, cls, "tf_keras")
        if cls == "MultiHeadAttention":  # tf_keras' from_config needs the shapes Keras 3 keeps in build_config
            shapes = (obj.get("build_config") or {}).get("shapes_dict", {})
            for key in ("query_shape", "value_shape", "key_shape"):
                config.setdefault(key, shapes.get(key, shapes.get("value_shape")))
    out = {
        "module": "keras.layers" if tf_cls else "keras",
        "class_name": cls,
        "config": config,
        "registered_name": None,
    }
    if "name" in obj:
        out["name"] = obj["name"]
    if "inbound_nodes" in obj:
        call_args = _call_arg_names(tf_cls or _tf.keras().Model)
        out["inbound_nodes"] = [_node_to_tf_keras(node, call_args, name, cls) for node in obj["inbound_nodes"]]
    return out


def _op_to_tf_keras(obj: dict, name: str) -> dict:
    """A keras.ops call in a Keras 3 graph as the TFOpLambda layer tf_keras records for the same call."""
    cls = obj["class_name"]
    if cls not in _OPS:
        raise _Unconvertible(
            name,
            f"keras.ops {cls}",
            "is an operation in the functional graph that kfopt cannot rebuild in tf_keras",
            f"use a keras.layers layer for it instead of keras.ops / an operator; operations kfopt rebuilds: "
            f"{', '.join(sorted(_OPS))}.",
        )
    function, arg_names, options = _OPS[cls]
    extra = {key: obj["config"][key] for key in options if key in obj["config"]}
    nodes = [
        _node_to_tf_keras(node, list(arg_names), name, cls, extra, wrap_single=False)
        for node in obj.get("inbound_nodes", [])
    ]
    return {
        "module": "keras.layers",
        "class_name": "TFOpLambda",
        "config": {"name": name, "trainable": True, "dtype": None, "function": function},
        "registered_name": None,
        "name": obj.get("name", name),
        "inbound_nodes": nodes,
    }


def _model_to_tf_keras(config: dict) -> dict:
    out = {key: value for key, value in config.items() if key not in ("dtype", "build_input_shape")}
    out["layers"] = [_to_tf_keras(layer) for layer in _without_computed_masks(config["layers"])]
    if "build_input_shape" in config and not any(layer["class_name"] == "InputLayer" for layer in config["layers"]):
        out["build_input_shape"] = config["build_input_shape"]
    if "input_layers" in out:
        _shift_nested_model_refs(out, +1)
        _check_tf_keras_graph(out)
    return out


def _without_computed_masks(layers: list[dict]) -> list[dict]:
    """Layer configs without the ``mask`` arguments Keras 3 computed with keras.ops.

    Keras 3 writes a propagated mask (an Embedding's ``mask_zero``) into the graph
    as a ``not_equal`` operation passed as ``mask=``; tf_keras propagates the same
    mask on its own, and given it explicitly as well it applies it twice.
    """
    ops = {layer["name"] for layer in layers if (layer.get("module") or "").startswith("keras.src.ops")}
    out = []
    for layer in layers:
        nodes = []
        for node in layer.get("inbound_nodes", []):
            mask = node.get("kwargs", {}).get("mask") if isinstance(node, dict) else None
            if _is_keras3_tensor(mask) and mask["config"]["keras_history"][0] in ops:
                node = {**node, "kwargs": {k: v for k, v in node["kwargs"].items() if k != "mask"}}
            nodes.append(node)
        out.append({**layer, "inbound_nodes": nodes} if "inbound_nodes" in layer else layer)
    return out


def _shift_nested_model_refs(config: dict, delta: int) -> None:
    """Renumber calls of nested models between the two Keras.

    A nested tf_keras model counts its own internal node as node 0, so its first
    call in the outer graph is node 1; Keras 3 numbers that call 0. (Both number
    a nested functional model's outputs in ``output_layers`` the tf_keras way.)
    """
    nested = {layer["config"]["name"]: layer["class_name"] for layer in config["layers"]}
    nested = {name: cls for name, cls in nested.items() if cls in _MODEL_CLASSES}
    if not nested:
        return

    def shift(value, sequential_only: bool):
        if _is_ref(value):
            cls = nested.get(value[0])
            if cls is not None and (cls == "Sequential" or not sequential_only):
                value[1] += delta
            if len(value) == 4:
                shift(value[3], False)
        elif isinstance(value, list):
            for item in value:
                shift(item, sequential_only)
        elif isinstance(value, dict):
            for item in value.values():
                shift(item, sequential_only)

    for layer in config["layers"]:
        shift(layer.get("inbound_nodes", []), False)
    shift(config["input_layers"], True)
    shift(config["output_layers"], True)


def _is_ref(value) -> bool:
    """A tensor reference in tf_keras' node format: [layer, node index, tensor index(, kwargs)]."""
    return (
        isinstance(value, list)
        and len(value) in (3, 4)
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and (value[0] == _CONSTANT_VALUE or isinstance(value[2], int))
        and (len(value) == 3 or isinstance(value[3], dict))
    )


def _check_tf_keras_graph(config: dict) -> None:
    """Resolve the call graph as tf_keras will, which loops forever on a graph it cannot resolve."""
    layers = config["layers"]
    made = {
        layer["config"]["name"]: int(layer["class_name"] == "InputLayer" or layer["class_name"] in _MODEL_CLASSES)
        for layer in layers
    }
    inputs_only = {layer["config"]["name"] for layer in layers if layer["class_name"] == "InputLayer"}
    pending = {layer["config"]["name"]: list(layer.get("inbound_nodes", [])) for layer in layers}

    def refs(value):
        if _is_ref(value):
            if value[0] != _CONSTANT_VALUE:
                yield value
            if len(value) == 4:
                yield from refs(value[3])
        elif isinstance(value, list):
            for item in value:
                yield from refs(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from refs(item)

    def ready(node) -> bool:
        return all(ref[0] in inputs_only or made.get(ref[0], 0) > ref[1] for ref in refs(node))

    while any(pending.values()):
        progress = False
        for name, nodes in pending.items():
            while nodes and ready(nodes[0]):
                nodes.pop(0)
                made[name] += 1
                progress = True
        if not progress:
            stuck = next(layer for layer in layers if pending[layer["config"]["name"]])
            raise _Unconvertible(
                stuck["config"]["name"],
                stuck["class_name"],
                "is called on a tensor that the rebuilt graph cannot resolve",
                "report this model's structure to kfopt.",
            )


def _tf_keras_layer_class(obj: dict, name: str):
    cls, module = obj["class_name"], obj.get("module") or ""
    if cls == "Lambda":
        raise _Unconvertible(
            name,
            cls,
            "is Python code written for Keras 3 and cannot be rebuilt in tf_keras",
            "replace it with built-in layers.",
        )
    tf_cls = getattr(_tf.keras().layers, cls, None)
    if not module.startswith("keras") or (obj.get("registered_name") not in (None, cls)) or tf_cls is None:
        raise _Unconvertible(
            name,
            cls,
            "is a custom layer (its code is written for Keras 3 and cannot run in tf_keras)"
            if not module.startswith("keras") or obj.get("registered_name") not in (None, cls)
            else "has no tf_keras counterpart",
            "replace it with built-in Keras layers, or save the model with tf_keras (import tf_keras as keras).",
        )
    return tf_cls


def _values_to_tf_keras(value: Any, layer: str, cls: str) -> Any:
    """Nested config values: dtype policies become names, nested objects are translated."""
    if isinstance(value, list):
        return [_values_to_tf_keras(item, layer, cls) for item in value]
    if not isinstance(value, dict):
        return value
    if "class_name" in value and "config" in value:
        kind = value["class_name"]
        if kind in ("DTypePolicy", "FloatDTypePolicy"):
            return value["config"]["name"]
        if "DTypePolicy" in kind:
            raise _Unconvertible(
                layer, cls, f"is quantized by Keras 3 ({kind})", "give kfopt the float model; it quantizes itself."
            )
        module = value.get("module") or ""
        if module == "keras.layers":  # a wrapped layer (Bidirectional, TimeDistributed)
            return _to_tf_keras(value)
        if module in ("keras.initializers", "keras.regularizers", "keras.constraints"):
            return _object_to_tf_keras(value, module, layer, cls)
    return {key: _values_to_tf_keras(item, layer, cls) for key, item in value.items()}


def _object_to_tf_keras(obj: dict, module: str, layer: str, cls: str) -> dict:
    """An initializer, regularizer or constraint, with the options tf_keras' class knows."""
    kind = module.rsplit(".", 1)[1]
    target = getattr(getattr(_tf.keras(), kind), obj["class_name"], None)
    if target is None:
        raise _Unconvertible(
            layer, cls, f"uses {kind[:-1]} {obj['class_name']}, which tf_keras lacks", f"use a built-in {kind[:-1]}."
        )
    known = _init_arg_names(target)
    config = {}
    for key, item in obj["config"].items():
        # Initializers only choose starting values, which the copied weights replace.
        if key in known or known is None:
            config[key] = item
        elif item is not None and kind != "initializers":
            raise _Unconvertible(
                layer, cls, f"uses {obj['class_name']}({key}={item!r}), which tf_keras lacks", f"drop {key} from it."
            )
    return {**obj, "config": config}


def _drop_inert(config: dict, target, inert: dict, layer: str, cls: str, other: str) -> dict:
    """Drop options ``target`` does not name whose value changes nothing; refuse the others."""
    known = _init_arg_names(target)
    out = {}
    for key, value in config.items():
        if key.endswith("activation") and value in _ACTIVATIONS_THAT_DIFFER:
            raise _Unconvertible(
                layer,
                cls,
                f"uses {key}='{value}', which means something else in {other}: {_ACTIVATIONS_THAT_DIFFER[value]}",
                "write the activation out with layers (e.g. layers.ReLU(6.0)(x + 3.0) / 6.0) or use 'sigmoid'.",
            )
        if known is not None and key not in known and key in inert:
            allowed = inert[key]
            if allowed is _ANY or _hashable(value) in allowed:
                continue
            raise _Unconvertible(
                layer, cls, f"uses {key}={value!r}, which {other} does not have", f"build it without {key}."
            )
        out[key] = value
    return out


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _init_arg_names(target) -> set | None:
    """Argument names of ``target.__init__`` (None when it names none, e.g. a C-level init)."""
    try:
        params = inspect.signature(target.__init__).parameters
    except (TypeError, ValueError):
        return None
    return {name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}


def _call_arg_names(target) -> list[str]:
    params = inspect.signature(target.call).parameters
    return [name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"]


def _node_to_tf_keras(
    node, call_args: list[str], layer: str, cls: str, extra: dict | None = None, wrap_single: bool = True
):
    """A Keras 3 call node ({"args", "kwargs"}) in tf_keras' format (first argument's tensors, kwargs)."""
    if isinstance(node, list):  # already the Keras 2 format (a Keras 3 file from a legacy config)
        return node
    args, kwargs = list(node.get("args", [])), {**(extra or {}), **node.get("kwargs", {})}
    # Keras 3 records the training flag it was built under (False) and overrides it on every call;
    # tf_keras would honour it forever, so dropout and batch statistics would never train.
    kwargs.pop("training", None)
    if not args:
        if not call_args or call_args[0] not in kwargs:
            raise _Unconvertible(layer, cls, "is called without inputs", "call it on a tensor.")
        args = [kwargs.pop(call_args[0])]
    for arg_name, value in zip(call_args[1:], args[1:]):
        kwargs[arg_name] = value
    if len(args) - 1 > len(call_args) - 1:
        raise _Unconvertible(layer, cls, "is called with more arguments than tf_keras' layer takes", "")
    call_kwargs = _tensor_refs(kwargs, layer, cls)

    def first_arg(value):
        if _is_keras3_tensor(value):
            name, node_index, tensor_index = value["config"]["keras_history"]
            return [name, node_index, tensor_index, call_kwargs]
        if isinstance(value, list):
            return [first_arg(item) for item in value]
        if isinstance(value, dict) and "class_name" not in value:
            return {key: first_arg(item) for key, item in value.items()}
        if isinstance(value, (int, float, bool)):
            return [_CONSTANT_VALUE, -1, value, call_kwargs]
        raise _Unconvertible(layer, cls, "is called on a value tf_keras cannot rebuild", "call it on a tensor.")

    data = first_arg(args[0])
    # tf_keras wraps a lone tensor in a list, except for layers that keep their input's structure (TFOpLambda).
    return [data] if wrap_single and _is_keras3_tensor(args[0]) else data


def _tensor_refs(value, layer: str, cls: str):
    if _is_keras3_tensor(value):
        return list(value["config"]["keras_history"])
    if isinstance(value, list):
        return [_tensor_refs(item, layer, cls) for item in value]
    if isinstance(value, dict):
        if "class_name" in value:
            raise _Unconvertible(
                layer, cls, f"is called with a {value['class_name']} argument tf_keras cannot rebuild", ""
            )
        return {key: _tensor_refs(item, layer, cls) for key, item in value.items()}
    return value


def _is_keras3_tensor(value) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


# -- tf_keras config -> Keras 3 config ----------------------------------------------
def _to_keras3(obj: dict, live) -> dict:
    """A serialized tf_keras model or layer, rewritten as Keras 3 serializes it.

    ``live`` is the tf_keras model the config came from (None for a layer): its
    inputs and outputs tell a lone tensor from a list of one, which the config does not.
    """
    cls = obj["class_name"]
    config = dict(obj["config"])
    name = config.get("name") or obj.get("name") or "?"
    if cls == "TFOpLambda" and config.get("function") in _TF_FUNCTION_OPS:
        return _op_to_keras3(obj, name)
    if cls in _MODEL_CLASSES:
        k3_cls = None
        config = _model_to_keras3(config, live)
    else:
        k3_cls = _keras3_layer_class(obj, name)
        config = _values_to_keras3(config, name, cls)
        if cls == "InputLayer":
            config["batch_shape"] = config.pop("batch_input_shape", None)
        for new, old in _RENAMED.get(cls, {}).items():
            if old in config:
                config[new] = config.pop(old)
        config = _drop_inert(config, k3_cls, _ONLY_IN_TF_KERAS, name, cls, "Keras 3")
        if cls == "BatchNormalization" and isinstance(config.get("axis"), list) and len(config["axis"]) == 1:
            config["axis"] = config["axis"][0]  # tf_keras keeps a list; Keras 3 takes one int
    if k3_cls is not None:
        out = {"module": "keras.layers", "class_name": cls, "config": config, "registered_name": None}
    elif cls == "Sequential":
        out = {"module": "keras", "class_name": "Sequential", "config": config, "registered_name": None}
    else:
        out = {
            "module": "keras.src.models.functional",
            "class_name": "Functional",
            "config": config,
            "registered_name": "Functional",
        }
    if "name" in obj:
        out["name"] = obj["name"]
    if "inbound_nodes" in obj:
        out["inbound_nodes"] = [_node_to_keras3(node, name, cls) for node in obj["inbound_nodes"]]
    return out


def _op_to_keras3(obj: dict, name: str) -> dict:
    """A tf_keras TFOpLambda call as the keras.ops operation Keras 3 records for the same call."""
    op = _TF_FUNCTION_OPS[obj["config"]["function"]]
    _, arg_names, options = _OPS[op]
    nodes, config = [], {"name": name}
    for node in obj.get("inbound_nodes", []):
        translated = _node_to_keras3(node, name, "TFOpLambda")
        kwargs = dict(translated["kwargs"])
        kwargs.pop("name", None)
        args = translated["args"] + [kwargs.pop(arg) for arg in arg_names[1:] if arg in kwargs]
        config.update({key: kwargs.pop(key) for key in options if key in kwargs})
        if kwargs:
            raise _Unconvertible(
                name, f"TFOpLambda {obj['config']['function']}", f"is called with {sorted(kwargs)}", ""
            )
        nodes.append({"args": args, "kwargs": {}})
    return {
        "module": "keras.src.ops.numpy",
        "class_name": op,
        "config": config,
        "registered_name": op,
        "name": obj.get("name", name),
        "inbound_nodes": nodes,
    }


def _model_to_keras3(config: dict, live) -> dict:
    out = copy.deepcopy(config)
    if "input_layers" in out:
        _shift_nested_model_refs(out, -1)
    config = out
    out = dict(config)
    nested = {layer.name: layer for layer in getattr(live, "layers", [])}
    out["layers"] = [_to_keras3(layer, nested.get(layer["config"].get("name"))) for layer in config["layers"]]
    if live is not None and "input_layers" in config:
        # tf_keras writes a list even for one input or output; Keras 3 keeps the structure it is given.
        if not isinstance(live._nested_inputs, (list, tuple)) and len(config["input_layers"]) == 1:
            out["input_layers"] = config["input_layers"][0]
        if not isinstance(live._nested_outputs, (list, tuple)) and len(config["output_layers"]) == 1:
            out["output_layers"] = config["output_layers"][0]
    return out


def _keras3_layer_class(obj: dict, name: str):
    cls, module = obj["class_name"], obj.get("module") or ""
    if cls in ("TFOpLambda", "SlicingOpLambda", "Lambda"):
        raise _Unconvertible(
            name,
            cls,
            "is TensorFlow/Python code in the graph, which Keras 3 cannot rebuild",
            "use keras.layers layers instead of TensorFlow functions on Keras tensors.",
        )
    if cls.startswith(("PruneLowMagnitude", "Quantize")) or "tensorflow_model_optimization" in module:
        raise _Unconvertible(
            name, cls, "is still wrapped by tensorflow-model-optimization", "strip the wrappers before saving."
        )
    k3_cls = getattr(keras3().layers, cls, None)
    if not module.startswith("keras") or obj.get("registered_name") not in (None, cls) or k3_cls is None:
        raise _Unconvertible(
            name,
            cls,
            "is not a built-in Keras layer that Keras 3 also has",
            "use built-in layers, or keep this candidate in tf_keras format.",
        )
    return k3_cls


def _values_to_keras3(value: Any, layer: str, cls: str) -> Any:
    """Nested config values: tf_keras' mixed-precision policies become names, wrapped layers are translated."""
    if isinstance(value, list):
        return [_values_to_keras3(item, layer, cls) for item in value]
    if not isinstance(value, dict):
        return value
    if "class_name" in value and "config" in value:
        if value["class_name"] == "Policy":  # tf_keras mixed precision: Keras 3 reads the policy's name
            return value["config"]["name"]
        if (value.get("module") or "") == "keras.layers":
            return _to_keras3(value, None)
    return {key: _values_to_keras3(item, layer, cls) for key, item in value.items()}


def _node_to_keras3(node, layer: str, cls: str) -> dict:
    """A tf_keras call node (tensors of the first argument, each carrying the kwargs) in Keras 3's format."""
    kwargs: dict = {}

    def tensor(ref) -> dict:
        return {
            "class_name": "__keras_tensor__",
            "config": {"shape": [None], "dtype": "float32", "keras_history": list(ref[:3])},
        }

    def first_arg(value):
        nonlocal kwargs
        if _is_ref(value):
            if len(value) == 4:
                kwargs = value[3]
            if value[0] == _CONSTANT_VALUE:
                return value[2]
            return tensor(value)
        if isinstance(value, list):
            return [first_arg(item) for item in value]
        if isinstance(value, dict):
            return {key: first_arg(item) for key, item in value.items()}
        raise _Unconvertible(layer, cls, "has a call Keras 3 cannot rebuild", "")

    def kwarg(value):
        if _is_ref(value) and len(value) == 3 and value[0] != _CONSTANT_VALUE:
            return tensor(value)
        if isinstance(value, list):
            return [kwarg(item) for item in value]
        if isinstance(value, dict):
            return {key: kwarg(item) for key, item in value.items()}
        return value

    data = first_arg(node)
    # tf_keras records defaults such as mask=None that some Keras 3 layers do not take.
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    # tf_keras wraps a lone input tensor in a list; the layer is called on the tensor itself.
    if isinstance(data, list) and len(data) == 1 and isinstance(node, list) and _is_ref(node[0]):
        data = data[0]
    return {"args": [data], "kwargs": kwarg(kwargs)}


# -- building, weights, proof ----------------------------------------------------------
def _build(build, serialized: dict, check_layer):
    """Build the model; when that fails, find the layer to blame by building layers one at a time."""
    try:
        return build(copy.deepcopy(serialized))  # Keras pops keys from the config it reads
    except _Unconvertible:
        raise
    except Exception as exc:
        for layer in _walk_layers(serialized):
            if layer["class_name"] in _MODEL_CLASSES:
                continue
            try:
                check_layer(layer)
            except Exception as layer_exc:
                raise _Unconvertible(
                    layer["config"].get("name", "?"),
                    layer["class_name"],
                    f"cannot be rebuilt ({_cause(layer_exc)})",
                    "replace it with an equivalent built-in layer configuration.",
                ) from None
        raise _Unconvertible(
            serialized["config"].get("name", "?"),
            serialized["class_name"],
            f"cannot be rebuilt ({_cause(exc)})",
            "report this model's structure to kfopt.",
        ) from None


def _tf_keras_layer_check(layer: dict) -> None:
    _tf.keras().layers.deserialize({key: layer[key] for key in ("module", "class_name", "config", "registered_name")})


def _keras3_layer_check(layer: dict) -> None:
    keras3().saving.deserialize_keras_object(
        {key: layer[key] for key in ("module", "class_name", "config", "registered_name")}
    )


def _copy_weights(source, target) -> None:
    """Copy weights layer by layer, matched by name, checking every shape."""
    by_name = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        origin = by_name.get(layer.name)
        if origin is None and not layer.weights:  # an operation: Keras 3 does not list it among the layers
            continue
        if origin is None:
            raise _Unconvertible(layer.name, type(layer).__name__, "is missing after the rebuild", "")
        if type(layer).__name__ in _MODEL_CLASSES:
            _copy_weights(origin, layer)
            continue
        weights = origin.get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(np.shape(w)) for w in weights]
        if expected != got:
            raise _Unconvertible(
                layer.name,
                type(layer).__name__,
                f"holds weights of shapes {got}, but the rebuilt layer expects {expected}",
                "report this layer's configuration to kfopt.",
            )
        if weights:
            layer.set_weights(weights)


def _inputs_of_keras3(model) -> list[tuple[tuple, str, int | None]]:
    """(shape without batch, dtype, token-id bound or None) of each input of a Keras 3 model."""
    specs = []
    consumers = _input_consumers(model)
    for tensor in model.inputs:
        name = tensor._keras_history[0].name
        bounds = [layer.input_dim for layer in consumers.get(name, []) if type(layer).__name__ == "Embedding"]
        specs.append((tuple(tensor.shape[1:]), str(tensor.dtype), min(bounds) if bounds else None))
    return specs


def _input_consumers(model) -> dict[str, list]:
    """Input layer name -> layers called directly on it (Embedding inputs must get token ids)."""
    consumers: dict[str, list] = {}
    input_names = {tensor._keras_history[0].name for tensor in model.inputs}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in getattr(node, "input_tensors", []):
                history = getattr(tensor, "_keras_history", None)
                if history is not None and history[0].name in input_names and history[0] is not layer:
                    consumers.setdefault(history[0].name, []).append(layer)
    return consumers


def _sample(sample, specs) -> tuple[list[np.ndarray], str]:
    """Up to 32 rows of ``sample`` (the user's test inputs) when they fit the model's inputs, else generated rows:
    data that does not fit is refused in one line once it is matched to the converted model, not here."""
    if sample is not None:
        arrays = [np.asarray(a)[:32] for a in (list(sample) if isinstance(sample, (list, tuple)) else [sample])]
        if _fits(arrays, specs):
            return arrays, "given"
    rng = np.random.default_rng(0)
    arrays = []
    for shape, dtype, bound in specs:
        dims = [d if d is not None else (32 if len(shape) >= 3 else 8) for d in shape]
        if bound is not None or "int" in dtype:
            arrays.append(rng.integers(0, bound or 10, size=(SAMPLE_ROWS, *dims)).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, size=(SAMPLE_ROWS, *dims)).astype(bool))
        else:
            arrays.append(rng.standard_normal((SAMPLE_ROWS, *dims)).astype(dtype))
    return arrays, "generated"


def _fits(arrays: list[np.ndarray], specs) -> bool:
    """Whether ``arrays`` have the shapes of the model's inputs and, where an Embedding reads one, ids it knows."""
    if len(arrays) != len(specs):
        return False
    for array, (shape, _, bound) in zip(arrays, specs):
        if len(array.shape) != len(shape) + 1 or any(d is not None and d != a for d, a in zip(shape, array.shape[1:])):
            return False
        if bound is not None and array.size and not (array.min() >= 0 and array.max() < bound):
            return False
    return True


def _outputs(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    result = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    if isinstance(result, dict):
        result = [result[key] for key in sorted(result)]
    elif not isinstance(result, (list, tuple)):
        result = [result]
    return [np.asarray(r, dtype=np.float64) for r in result]


def _prove(source, converted, sample, direction: str, label: str, specs) -> Proof:
    """Run both models on the same inputs; refuse the conversion unless their outputs agree.

    Each output may differ by at most TOLERANCE times max(1, its largest magnitude):
    absolute for probabilities and small logits, relative for large outputs.
    """
    inputs, origin = _sample(sample, specs)
    expected, got = _outputs(source, inputs), _outputs(converted, inputs)
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        raise KfoptError(
            f"Converting model {label} ({direction}) changed its outputs' shapes "
            f"({[e.shape for e in expected]} -> {[g.shape for g in got]}).",
            "report this model's structure to kfopt.",
        )
    if not all(np.isfinite(e).all() for e in expected):
        raise KfoptError(
            f"Model {label} outputs NaN or infinity on {origin} inputs, so its conversion ({direction}) "
            "cannot be proven.",
            "check that the model's weights are finite.",
        )
    worst, within = 0.0, True
    for e, g in zip(expected, got):
        diff = float(np.abs(e - g).max(initial=0.0)) if np.isfinite(g).all() else float("inf")
        worst = max(worst, diff)
        within = within and diff <= TOLERANCE * max(1.0, float(np.abs(e).max(initial=0.0)))
    if not within:
        blame = _first_differing_layer(source, converted, inputs)
        raise KfoptError(
            f"Converting model {label} ({direction}) does not compute the same outputs: max abs difference "
            f"{worst:.3g} > {TOLERANCE:g} on {len(inputs[0])} {origin} rows{blame}.",
            "report the model to kfopt; meanwhile pass the model saved with tf_keras if you can.",
        )
    return Proof(direction, worst, TOLERANCE, int(len(inputs[0])), origin)


def _first_differing_layer(source, converted, inputs) -> str:
    """ ", first at layer 'x' (Class)" naming the earliest layer whose output differs, or "" when unknown."""
    try:
        names = [
            layer.name
            for layer in converted.layers
            if type(layer).__name__ != "InputLayer" and len(getattr(layer, "_inbound_nodes", [])) == 1
        ]
        a = _outputs(_functional_probe(source, names), inputs)
        b = _outputs(_functional_probe(converted, names), inputs)
        for name, x, y in zip(names, a, b):
            if x.shape != y.shape or np.abs(x - y).max(initial=0.0) > TOLERANCE * max(1.0, np.abs(x).max(initial=0)):
                return f", first at layer '{name}' ({type(converted.get_layer(name)).__name__})"
    except Exception:  # a diagnosis only; the refusal stands without it
        return ""
    return ""


def _functional_probe(model, names: Sequence[str]):
    keras = keras3() if is_keras3_model(model) else _tf.keras()
    return keras.Model(model.inputs, [model.get_layer(name).output for name in names])


def _error(label: str, bad: _Unconvertible, other: str) -> KfoptError:
    fix = bad.fix or "report this layer's configuration to kfopt."
    return KfoptError(f"Model {label} cannot be converted to {other}: {bad}.", fix)


def _cause(exc: BaseException) -> str:
    """The innermost reason in an error Keras wrapped several times ("... Exception encountered: why")."""
    text = str(exc)
    if "Exception encountered:" in text:
        reason = text.rsplit("Exception encountered:", 1)[1].strip().splitlines()
        if reason:
            return reason[0][:200]
    return f"{type(exc).__name__}: {_first_line(exc)}"
