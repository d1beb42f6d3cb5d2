"""What goes into a model and what comes out: its inputs, outputs and layers, in any format.

:class:`ModelInfo` is what kfopt checks before any work (the data's dtypes and
shapes against the model's inputs, each technique's :meth:`Technique.check
<kfopt.plugins.Technique.check>` against the model's structure) and how the
output a metric is computed on is picked (``--output NAME|INDEX``).

Names are the user's: a Keras model's input and output names
(``model.input_names`` / ``model.output_names``); a SavedModel's serving
signature keys. kfopt keeps them across formats: its TFLite conversions and
SavedModel exports are keyed by the Keras names, so ``--output`` means the
same output in every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import KfoptError

#: Keras layer classes that loop over a sequence (TFLite needs them fused or unrolled).
RECURRENT_LAYERS = frozenset({"LSTM", "GRU", "SimpleRNN", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"})


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: its name, its shape without the batch axis (None: any size), its dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    #: For an input read by an Embedding: its number of ids (valid ids are 0 to vocabulary - 1); else None.
    vocabulary: int | None = None

    @property
    def integer(self) -> bool:
        """True for integer inputs (token ids, category ids): kept as integers from data to interpreter."""
        return self.dtype.startswith(("int", "uint"))

    def describe(self) -> str:
        """``name (8,) int32``."""
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{self.name} ({dims}{',' if len(self.shape) == 1 else ''}) {self.dtype}"


@dataclass(frozen=True)
class ModelInfo:
    """A model's inputs, outputs and (for Keras) layers: what techniques check before any work.

    ``layers`` lists the class name of every layer, nested models and
    wrappers included (empty for a SavedModel or a TFLite model, which have
    no Keras layers); ``recurrent`` the names of its recurrent layers.
    ``keras()`` gives the tf_keras model itself for deeper checks.
    """

    format: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layers: tuple[str, ...] = ()
    recurrent: tuple[str, ...] = ()
    #: What the model is, in the user's words, for messages ("a SavedModel without Keras layers").
    kind: str = ""
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def has_keras_layers(self) -> bool:
        """True when techniques that rewrite or fine-tune layers (prune, QAT, distill) can work on it."""
        return self.format == "keras"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def keras(self):
        """The tf_keras model (a TypeError for a SavedModel or TFLite model)."""
        return self.handle.keras()

    def describe(self) -> str:
        """``2 inputs: a (4,) float32, b (3,) float32; 1 output: dense (2,) float32``."""

        def listed(what: str, tensors) -> str:
            return f"{len(tensors)} {what}{'s' if len(tensors) != 1 else ''}: " + ", ".join(
                t.describe() for t in tensors
            )

        return f"{listed('input', self.inputs)}; {listed('output', self.outputs)}"


def model_info(handle) -> ModelInfo:
    """The :class:`ModelInfo` of a :class:`~kfopt.plugins.ModelHandle` in any format."""
    if handle.format == "keras":
        return keras_info(handle.keras(), handle)
    if handle.format == "saved_model":
        return saved_model_info(handle.saved_model_path(), handle)
    return tflite_info(handle.tflite(), handle)


def keras_info(model, handle=None) -> ModelInfo:
    """Inputs, outputs and layers of a tf_keras model."""
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    input_names = list(getattr(model, "input_names", None) or [f"input_{i}" for i in range(len(inputs))])
    output_names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(outputs))])
    layers = list(_walk_layers(model))
    vocabularies = _vocabularies(model)
    return ModelInfo(
        format="keras",
        inputs=tuple(_tensor(name, t, vocabularies.get(id(t))) for name, t in zip(input_names, inputs)),
        outputs=tuple(_tensor(name, t) for name, t in zip(output_names, outputs)),
        layers=tuple(type(layer).__name__ for layer in layers),
        recurrent=tuple(layer.name for layer in layers if type(layer).__name__ in RECURRENT_LAYERS),
        kind="a Keras model",
        handle=handle,
    )


def saved_model_info(path, handle=None) -> ModelInfo:
    """Inputs and outputs of a SavedModel's ``serving_default`` signature (a SavedModel has no Keras layers)."""
    from . import _tf

    tf = _tf.tf()
    try:
        function = tf.saved_model.load(str(path)).signatures["serving_default"]
    except (KeyError, OSError, ValueError) as exc:
        raise KfoptError(
            f"SavedModel '{path}' has no usable serving_default signature ({type(exc).__name__}: {exc}).",
            "export it with model.export(path) or tf.saved_model.save(model, path, signatures=...).",
        ) from None
    specs = function.structured_input_signature[1]
    return ModelInfo(
        format="saved_model",
        inputs=tuple(_spec(name, spec) for name, spec in specs.items()),
        outputs=tuple(_spec(name, spec) for name, spec in function.structured_outputs.items()),
        kind="a SavedModel without Keras layers (served through its signature)",
        handle=handle,
    )


def tflite_info(content: bytes, handle=None) -> ModelInfo:
    """Inputs and outputs of a TFLite model, named by its signature when it has one."""
    from .evaluate import TFLiteRunner

    runner = TFLiteRunner(content)
    return ModelInfo(
        format="tflite",
        inputs=tuple(
            TensorInfo(name, tuple(_dim(d) for d in detail["shape_signature"][1:]), detail["dtype"].__name__)
            for name, detail in zip(runner.input_names, runner.input_details)
        ),
        outputs=tuple(
            TensorInfo(name, tuple(_dim(d) for d in detail["shape_signature"][1:]), detail["dtype"].__name__)
            for name, detail in zip(runner.output_names, runner.output_details)
        ),
        kind="a TFLite model",
        handle=handle,
    )


def output_position(names: list[str], output: str | int | None) -> int:
    """Where ``output`` (a name, an index, or None for the first) is among ``names``; a KfoptError if nowhere."""
    if output is None:
        return 0
    if isinstance(output, str) and output.lstrip("-").isdigit() and output not in names:
        output = int(output)
    if isinstance(output, int):
        if -len(names) <= output < len(names):
            return output % len(names)
    elif output in names:
        return names.index(output)
    else:
        # tfmot renames the layers it wraps (QAT's quant_dense): the output is still the user's.
        unwrapped = [_unwrapped(name) for name in names]
        if unwrapped.count(output) == 1:
            return unwrapped.index(output)
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
    raise KfoptError(
        f"The model has no output {output!r}; its outputs are {listed}.",
        "pass --output with one of those names or indexes (default: the first output).",
    )


#: Prefixes tfmot gives the layers it wraps, which a converted model's outputs are named after.
WRAPPER_PREFIXES = ("quant_", "prune_low_magnitude_")


def _unwrapped(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def resolve_output(names: list[str], output: str | int | None) -> str:
    """The name of ``output`` among ``names`` (the baseline's): how ``--output INDEX`` becomes a name.

    Names hold across formats (kfopt keys its conversions by them); an index
    is the baseline's order, which a SavedModel signature (keys sorted) may not keep.
    """
    return names[output_position(names, output)]


def _walk_layers(model):
    """Every layer: nested models and wrappers (Bidirectional, TimeDistributed, tfmot wrappers) opened."""
    for layer in getattr(model, "layers", None) or []:
        yield from _layer_and_inner(layer)


def _layer_and_inner(layer):
    yield layer
    if getattr(layer, "forward_layer", None) is not None:  # Bidirectional: the two directions it runs
        inner = [layer.forward_layer, layer.backward_layer]
    else:
        inner = [getattr(layer, "layer", None)]  # TimeDistributed, tfmot wrappers
    inner += list(getattr(layer, "layers", None) or [])  # a nested model
    for each in inner:
        if each is not None:
            yield from _layer_and_inner(each)


def _dim(value) -> int | None:
    value = int(value) if value is not None else -1
    return None if value < 0 else value


def _tensor(name: str, tensor, vocabulary: int | None = None) -> TensorInfo:
    shape = tuple(tensor.shape)[1:]
    return TensorInfo(str(name), tuple(_dim(d) for d in shape), _dtype_name(tensor.dtype), vocabulary)


def _vocabularies(model) -> dict[int, int]:
    """id() of each model input read directly by Embedding layers -> the smallest of their ``input_dim``."""
    inputs = {id(t) for t in getattr(model, "inputs", None) or []}
    found: dict[int, int] = {}
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ != "Embedding":
            continue
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in getattr(node, "keras_inputs", []):
                if id(tensor) in inputs:
                    found[id(tensor)] = min(found.get(id(tensor), layer.input_dim), layer.input_dim)
    return found


def _spec(name: str, spec) -> TensorInfo:
    shape = tuple(spec.shape)[1:] if spec.shape.rank else ()
    return TensorInfo(str(name), tuple(_dim(d) for d in shape), _dtype_name(spec.dtype))


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def output_view(handle, output: str, x):
    """What the task is read from (:func:`kfopt.task.infer_task`): a Keras model whose first output is ``output``.

    A Keras model with one output is itself; with several, a view of the same
    layers ending at ``output``. A model without Keras layers (a SavedModel, a
    TFLite model) gets a stand-in of that output's shape whose activation is
    read from its values on ``x`` (probabilities summing to 1: softmax; in
    [0, 1]: sigmoid; else linear), since its last layer cannot be inspected.
    """
    info = model_info(handle)
    if handle.format == "keras":
        model = handle.keras()
        if len(info.outputs) == 1:
            return model
        from . import _tf

        position = info.output_names.index(output)
        return _tf.keras().Model(model.inputs, model.outputs[position], name=f"{model.name}_{output}")
    from .evaluate import runner_for

    values = runner_for(handle, output)(x[:64])
    spec = info.outputs[info.output_names.index(output)] if output in info.output_names else info.outputs[0]
    return _OutputStandIn(spec.shape, _activation_of(values))


def _activation_of(values) -> str:
    import numpy as np

    if values.size and values.min() >= 0 and values.max() <= 1:
        rows = values.reshape(len(values), -1)
        return "softmax" if rows.shape[1] > 1 and np.allclose(rows.sum(axis=1), 1, atol=1e-3) else "sigmoid"
    return "linear"


class _OutputStandIn:
    """Looks, to kfopt.task, like a Keras model whose last layer has ``activation``: shape and name only."""

    outputs = None

    def __init__(self, shape: tuple, activation: str):
        self.output_shape = (None, *shape)
        self.name = "signature"
        last = type("OutputLayer", (), {})()
        last.activation = type(activation, (), {"__name__": activation})
        self.layers = [last]
