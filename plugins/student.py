"""A narrower student of a teacher's own architecture (``distill(architecture=same, width=W)``).

Scaling every layer's width by ``W`` breaks modern graphs: a residual ``Add``
needs both operands equally wide, a squeeze-excite ``Multiply`` needs its gate
as wide as the feature map it scales, a ``Reshape`` names the channel count it
produces, and the model's inputs and outputs must keep their shapes. So the
widths are planned on the layer graph first (:func:`plan_widths`):

- every tensor's last axis (its channels, units or features) belongs to a
  *group*; a layer that sets a width (Dense ``units``, Conv ``filters``,
  Embedding ``output_dim``, recurrent ``units``) starts a new group, layers
  that keep the width (normalisation, activations, pooling, dropout,
  depthwise convs, padding, ...) pass it on, and layers that join tensors
  (Add, Multiply, Subtract, Average, Maximum, Minimum, Concatenate) merge
  their operands' groups, so layers joined by them share one width;
- a group that reaches a model input or output keeps its width, and so does
  a group that passes through a layer whose behaviour on widths is unknown
  (a custom layer with weights, a reshape that moves the channels);
- every other group is scaled: each layer that sets its width gets
  ``max(1, round(width * W))``, a ``Reshape`` that names the channel count
  follows it, and MultiHeadAttention's own ``key_dim``/``value_dim`` scale too.

The plan is then applied by ``clone_model`` (fresh weights) and the student is
checked to give the teacher's outputs' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kfopt import _tf
from kfopt.errors import KfoptError

from .layers import WidthGroups, all_layers, has_layer_graph

#: Layer config keys that set the width of a layer's output (Dense/RNN, Conv, Embedding).
WIDTH_KEYS = ("units", "filters", "output_dim")
#: Layers whose output has the width of their (first) input: they pass a group on.
KEEP_WIDTH = frozenset(
    {
        "BatchNormalization",
        "SyncBatchNormalization",
        "LayerNormalization",
        "UnitNormalization",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "ThresholdedReLU",
        "Softmax",
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianDropout",
        "GaussianNoise",
        "AlphaDropout",
        "ActivityRegularization",
        "Masking",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "ZeroPadding3D",
        "Cropping1D",
        "Cropping2D",
        "Cropping3D",
        "UpSampling1D",
        "UpSampling2D",
        "UpSampling3D",
        "RepeatVector",
        # The width follows the input (a scaled Flatten is just shorter; the Dense after it adapts).
        "Flatten",
    }
)
#: Layers that combine several tensors: their operands (and output) share one width.
JOINS = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"})
#: Why a group keeps its width when it reaches the model's inputs or outputs.
INPUT, OUTPUT = "the model's input", "the model's output"
#: Normalisation/rescaling layers that carry per-channel constants in their config when they have any.
PER_CHANNEL_CONSTANTS = {"Rescaling": ("scale", "offset"), "Normalization": ("mean", "variance")}


@dataclass
class WidthPlan:
    """Which layers a width-``W`` student resizes, and which keep the teacher's width and why."""

    #: Layer ids whose width config (units/filters/output_dim, a wrapped layer's) is scaled.
    scaled: set[int] = field(default_factory=set)
    #: Layer ids of Reshape layers whose channel count follows a scaled group.
    reshapes: set[int] = field(default_factory=set)
    #: MultiHeadAttention layer ids whose key_dim/value_dim are scaled.
    attention: set[int] = field(default_factory=set)
    #: Nested model id -> for each of its inputs, whether that input's width is scaled.
    nested_inputs: dict[int, list[bool]] = field(default_factory=dict)
    #: Layers that set a width but keep the teacher's, other than those setting the outputs': name -> why.
    kept: dict[str, str] = field(default_factory=dict)
    #: Names of the layers whose width is the model's output width (they keep it, as the outputs must).
    outputs: list[str] = field(default_factory=list)


def width_key(layer) -> str | None:
    """The config key that sets ``layer``'s output width (``units``, ``filters``, ``output_dim``), if any."""
    try:
        config = layer.get_config()
    except NotImplementedError:  # a custom layer without a config cannot be resized
        return None
    return next((k for k in WIDTH_KEYS if isinstance(config.get(k), int)), None)


def _wrapped_width_key(layer) -> str | None:
    """For a wrapper (Bidirectional, TimeDistributed): the width key of the layer it wraps."""
    inner = getattr(layer, "layer", None) or getattr(layer, "forward_layer", None)
    return width_key(inner) if inner is not None else None


def _last_dim(tensor):
    shape = getattr(tensor, "shape", None)
    return shape[-1] if shape is not None and len(shape) else None


def plan_widths(model) -> WidthPlan:
    """The widths of a width-scaled student of ``model`` (a built Sequential or functional model).

    Raises a KfoptError for a model without a layer graph.
    """
    if not has_layer_graph(model) or not model.outputs:
        raise KfoptError(
            f"A width-scaled student is built from the teacher's layer graph, but '{model.name}' has none "
            "(a subclassed model, or a Sequential model never built on an input shape).",
            "pass the teacher as a functional or Sequential model built on keras.Input, or a student model file "
            "with student=PATH.",
        )
    groups = WidthGroups()
    width_layers: dict[int, tuple] = {}  # layer id -> (layer, group key of its output)
    reshapes: dict[int, tuple] = {}
    attention: set[int] = set()
    seen_models: set[int] = set()
    nested: dict[int, object] = {}

    def key(tensor):
        return ("tensor", id(tensor))

    def opaque(inputs, outputs, why: str) -> None:
        for tensor in [*inputs, *outputs]:
            groups.fix(key(tensor), why)

    def visit_model(graph) -> None:
        if id(graph) in seen_models:
            return
        seen_models.add(id(graph))
        for depth in sorted(graph._nodes_by_depth, reverse=True):  # inputs first
            for node in graph._nodes_by_depth[depth]:
                visit(node)

    def visit(node) -> None:
        keras = _tf.keras()
        layer = node.layer
        kind = type(layer).__name__
        inputs = list(node.keras_inputs)
        outputs = _tf.tf().nest.flatten(node.outputs)
        if kind == "InputLayer":
            return
        if isinstance(layer, keras.Model):
            if not has_layer_graph(layer):
                opaque(inputs, outputs, f"it meets the subclassed model '{layer.name}'")
                return
            for inner, outer in zip(layer.inputs, inputs):
                groups.union(key(inner), key(outer))
            nested[id(layer)] = layer
            for inner, outer in zip(layer.outputs, outputs):
                groups.union(key(inner), key(outer))
            visit_model(layer)
            return
        layer_group = ("layer", id(layer))  # a shared layer has one width at every call
        if kind == "MultiHeadAttention":
            attention.add(id(layer))
            if layer.get_config().get("output_shape"):  # it sets its own output width: leave that as it is
                opaque(outputs, [], f"it meets '{layer.name}' (MultiHeadAttention), whose output_shape is set")
                return
            query = node.call_args[0] if node.call_args else node.call_kwargs.get("query")
            for tensor in outputs:  # attention output has the query's width
                groups.union(key(query), key(tensor))
            return
        if kind in ("Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D") and (
            layer.get_config().get("groups", 1) != 1
        ):
            opaque(
                inputs,
                outputs,
                f"it meets the grouped convolution '{layer.name}', whose widths must divide by its groups",
            )
            return
        if width_key(layer) or _wrapped_width_key(layer):
            width_layers[id(layer)] = (layer, layer_group)
            for tensor in outputs:
                groups.union(layer_group, key(tensor))
            return
        if kind in PER_CHANNEL_CONSTANTS and any(
            isinstance(layer.get_config().get(k), (list, tuple)) for k in PER_CHANNEL_CONSTANTS[kind]
        ):
            opaque(inputs, outputs, f"it meets '{layer.name}' ({kind}), which holds one constant per channel")
            return
        if kind in JOINS:
            width = _last_dim(outputs[0])
            for tensor in inputs:
                if kind == "Concatenate" or _last_dim(tensor) == width:  # a width-1 operand broadcasts
                    groups.union(key(tensor), key(outputs[0]))
            return
        if kind in KEEP_WIDTH:
            for tensor in outputs:
                groups.union(key(inputs[0]), key(tensor))
            return
        if kind == "Reshape":
            target = list(layer.get_config()["target_shape"])
            if target and target[-1] == _last_dim(inputs[0]):
                groups.union(key(inputs[0]), key(outputs[0]))
                reshapes[id(layer)] = (layer, key(outputs[0]))
            elif -1 in target and _last_dim(inputs[0]) not in target:
                groups.union(key(inputs[0]), key(outputs[0]))  # the -1 takes up the scaled size
            else:
                opaque(
                    layer,
                    inputs,
                    outputs,
                    f"it meets the Reshape '{layer.name}' to {tuple(target)}, which moves the channels",
                )
            return
        # Anything else (TFOpLambda such as x[:, 0] or tf.reduce_mean, a custom layer): without weights and
        # keeping its input's width it is taken to act per channel; otherwise its widths are left alone.
        width = _last_dim(outputs[0]) if outputs else None
        matching = [t for t in inputs if width is not None and _last_dim(t) == width]
        if layer.weights or not matching or _holds_constant(node, width):
            opaque(inputs, outputs, f"it meets '{layer.name}' ({kind}), whose widths kfopt cannot change")
            return
        for tensor in matching:
            for out in outputs:
                groups.union(key(tensor), key(out))

    for tensor in model.inputs:
        groups.fix(key(tensor), INPUT)
    for tensor in model.outputs:
        groups.fix(key(tensor), OUTPUT)
    visit_model(model)

    plan = WidthPlan(attention=attention)
    for layer_id, (layer, group) in width_layers.items():
        why = groups.why_fixed(group)
        if why == OUTPUT:
            plan.outputs.append(layer.name)
        elif why:
            plan.kept[layer.name] = f"its width is tied to {why}" if why == INPUT else why
        else:
            plan.scaled.add(layer_id)
    plan.reshapes = {layer_id for layer_id, (_, group) in reshapes.items() if not groups.why_fixed(group)}
    plan.nested_inputs = {
        model_id: [not groups.why_fixed(key(tensor)) for tensor in inner.inputs] for model_id, inner in nested.items()
    }
    return plan


def _holds_constant(node, width) -> bool:
    """True when a call argument of ``node`` is a constant (not a layer's output) ``width`` wide: it cannot scale."""
    keras_inputs = {id(t) for t in node.keras_inputs}
    arguments = _tf.tf().nest.flatten([node.call_args, node.call_kwargs])
    return any(
        id(arg) not in keras_inputs and _last_dim(arg) == width
        for arg in arguments
        if getattr(arg, "shape", None) is not None
    )


def _scale(value: int, width: float) -> int:
    return max(1, int(round(value * width)))


def build_student(teacher, width: float, plan: WidthPlan | None = None):
    """The teacher's architecture with its free widths scaled by ``width`` (see :func:`plan_widths`),
    freshly initialised; a model that takes the teacher's inputs and gives outputs of the teacher's shapes.

    Raises a KfoptError saying why and what to do when no such student can be built.
    """
    keras = _tf.keras()
    plan = plan or plan_widths(teacher)

    def scaled(layer):
        if isinstance(layer, keras.Model):  # a nested Sequential/functional model, on inputs of the new widths
            resized = plan.nested_inputs.get(id(layer), [])
            inputs = None
            if any(resized):
                inputs = [
                    keras.Input(
                        batch_shape=(*t.shape[:-1], _scale(t.shape[-1], width) if scale else t.shape[-1]),
                        dtype=t.dtype,
                    )
                    for t, scale in zip(layer.inputs, resized)
                ]
            return keras.models.clone_model(layer, input_tensors=inputs, clone_function=scaled)
        config = layer.get_config()
        if id(layer) in plan.scaled:
            if (key := width_key(layer)) is not None:
                config[key] = _scale(config[key], width)
            else:  # a wrapper (Bidirectional, TimeDistributed): resize the layer(s) it wraps
                for wrapped in ("layer", "backward_layer"):
                    inner = (config.get(wrapped) or {}).get("config", {})
                    if key := next((k for k in WIDTH_KEYS if isinstance(inner.get(k), int)), None):
                        inner[key] = _scale(inner[key], width)
        if id(layer) in plan.attention:
            config["key_dim"] = _scale(config["key_dim"], width)
            if config.get("value_dim"):
                config["value_dim"] = _scale(config["value_dim"], width)
            # from_config would build the projections for the teacher's query/key/value widths; built on
            # its first call instead, they take the student's.
            for remembered in ("query_shape", "key_shape", "value_shape"):
                config.pop(remembered, None)
            return layer.__class__(**config)
        if id(layer) in plan.reshapes:
            target = list(config["target_shape"])
            # Keras works the channel count out from the scaled input; a -1 elsewhere leaves it to us.
            target[-1] = -1 if -1 not in target else _scale(target[-1], width)
            config["target_shape"] = tuple(target)
        return layer.__class__.from_config(config)

    try:
        student = keras.models.clone_model(teacher, clone_function=scaled)
    except Exception as exc:  # a layer that did not take its new widths
        raise KfoptError(
            f"Cannot build a width-{width} student from the teacher's architecture ({_first_cause(exc)}).",
            "use architecture=dense, width=1, or pass a student model file with student=PATH.",
        ) from None
    got, want = _output_shapes(student), _output_shapes(teacher)
    if got != want:
        raise KfoptError(
            f"A width-{width} student of '{teacher.name}' gives outputs of shapes {got}, not the teacher's {want}.",
            "use architecture=dense, or pass a student model file with student=PATH.",
        )
    _fix_reshape_widths(teacher, student, plan)
    _copy_preprocessing_state(teacher, student)
    return student


def _fix_reshape_widths(teacher, student, plan: WidthPlan) -> None:
    """Give each resized Reshape its channel count as a number, not the ``-1`` it was built with.

    Keras worked the count out from the built input, but a traced graph does not: with the batch size unknown
    a ``-1`` leaves the channels unknown, and the TFLite converter cannot take a Conv2D on an input of unknown
    channels (a squeeze-excite block's reshape in front of its 1x1 convs).
    """
    resized = {layer.name for layer in all_layers(teacher) if id(layer) in plan.reshapes}
    for layer in all_layers(student):
        if layer.name in resized and -1 in layer.target_shape:
            shape = tuple(layer.output_shape[1:])
            if all(isinstance(d, int) for d in shape):
                layer.target_shape = shape


def _copy_preprocessing_state(teacher, student) -> None:
    """Give the student the teacher's preprocessing state (an adapted Normalization's mean and variance).

    The student is freshly initialised, but a layer with only non-trainable weights holds what the data
    looks like, not something to learn: without it the student would see differently scaled inputs.
    """
    students = {layer.name: layer for layer in all_layers(student)}
    for layer in all_layers(teacher):
        twin = students.get(layer.name)
        if twin is None or layer.trainable_weights or not layer.weights:
            continue
        values = layer.get_weights()
        if [w.shape for w in values] == [tuple(w.shape) for w in twin.weights]:
            twin.set_weights(values)


def _first_cause(exc: BaseException) -> str:
    """The telling line of a Keras build error (its first line often only names the layer being called)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "shape" in line.lower() or "dimension" in line.lower()]
    return f"{type(exc).__name__}: {' '.join((lines[:1] + telling[:1]) if telling[:1] != lines[:1] else lines[:1])}"


def _output_shapes(model) -> list[tuple]:
    return [tuple(t.shape[1:]) for t in model.outputs]
