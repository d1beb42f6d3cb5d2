"""Channel pruning (``prune(method=channels)``): remove whole filters, channels and units, and rebuild a smaller
dense model of the same architecture.

Magnitude and m:n pruning leave the zeros inside dense kernels, so a runtime
still multiplies by them; removing a Conv2D filter removes its output channel,
and with it the matching input slice of every layer that reads that channel.
Which layers read it is a question about the functional graph, answered
before any weight is touched (:func:`plan_channels`):

- every tensor's last axis (its channels) is a *layout*: a list of segments,
  each a slice of one channel *group*; a layer that sets a width (Conv ``filters``,
  Dense ``units``, Embedding ``output_dim``) starts a new group, and its
  filters are what removing a channel of that group removes;
- layers that act on each channel on its own (BatchNormalization, a
  DepthwiseConv2D with depth multiplier 1, activations, pooling, padding,
  dropout) pass the layout on and lose the same channels;
- layers that join tensors element by element (Add, Multiply such as a
  squeeze-excite gate, Subtract, Average, Maximum, Minimum) tie their
  operands' groups into one (union-find), so every layer feeding a residual
  sum loses the same channels; a Concatenate on the channel axis lays its
  operands' segments side by side (its readers slice each at its offset);
- Flatten (and a Reshape to one axis) keeps the layout once per spatial
  position, so the Dense that reads it loses the rows of removed channels;
  flattened tensors concatenated side by side (two flattened conv branches,
  or one next to a Dense side input) each keep their block at its offset;
- every layout's width is checked against its tensor's width as the graph is
  followed: a layer whose output kfopt would describe wrongly is treated as
  one it cannot see through (its groups keep their widths), never rewritten;
- a group that reaches the model's input or output keeps every channel (the
  model keeps its shapes), and so does every group that meets a layer kfopt
  cannot see through (LayerNormalization and Softmax mix channels, a
  custom layer, a nested model, a grouped convolution, attention, ...): those
  layers are left as they are, never rewritten wrongly.

Each free group then keeps its most important channels: the L1 (or L2) norm
of each producing layer's filter, times ``|gamma|`` of a BatchNormalization
right after it, summed over the group's producers (each normalised to mean 1,
so a wide and a narrow layer count alike). :func:`remove_channels` rebuilds
the model with ``clone_model`` at the new widths and copies the kept slices
of every weight.

How many channels a group keeps (``round(size * (1 - fraction))``, at least one):

- uniform: every free group removes ``target_sparsity`` of its channels;
- by sensitivity (:func:`measure_sensitivity`, :func:`allocate`): each free
  group alone loses its ``target_sparsity`` least important channels, and the
  task's metric is scored on the validation split (one forward pass per group,
  no rebuild, no training: removing a channel is zeroing the kernel rows that
  read it, :func:`masked`). A drop is counted in whole units of the metric's
  resolution, at least one (accuracy: validation samples), so drops within one
  sample are alike and a split that cannot tell the groups apart gives the
  uniform plan. Each group's *gain* is the MACs its removal saves per unit of
  metric lost; a group keeps ``clip(1 - level * gain / mean gain, k/2,
  min(1, 2k))`` of its channels (``k = 1 - target_sparsity``, what uniform
  removal keeps), and ``level`` is the smallest for which the model's MACs are
  no more than uniform removal's. So both allocations compare at the same
  flops (within one channel's rounding), groups that cost the metric little
  for what they save lose more, the others fewer, and none is pruned to less
  than half the width uniform pruning would leave it. MACs rather than channel
  counts make ``target_sparsity`` mean the same cost either way; where no
  changed layer multiplies (embeddings only), channel counts are matched.

Uniform is the default (``Prune.Config.allocation``) because it was the more
accurate after fine-tuning on ``bench/channels.py`` (demo:cnn, a small ResNet,
MobileNetV2 0.35 on digits; 10 epochs): at the same MACs, sensitivity lost
11.8 points on the ResNet at 0.5 (uniform 0.35) and 10.4 on MobileNetV2 at
0.75 (uniform 8.0), and no better with BatchNorm statistics re-estimated on
training inputs before each group is scored. What a group alone costs before
fine-tuning ranks the late, wide layers as cheap, and fine-tuning needs them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kfopt import _tf
from kfopt.errors import KfoptError

from .layers import WidthGroups, has_layer_graph
from .student import KEEP_WIDTH

#: Layers that set the width of their output: the config key, and the kernel axis of their inputs (None: none).
PRODUCERS = {
    "Conv1D": ("filters", -2),
    "Conv2D": ("filters", -2),
    "Conv3D": ("filters", -2),
    "Dense": ("units", -2),
    "Embedding": ("output_dim", None),
}
#: Layers without weights that act on each channel on its own: removing a channel before them removes it after.
#: The layers a student's width passes through, less those with per-channel weights (handled on their own),
#: those that mix channels (normalizing over them, a softmax, a mask) and those that change the layout.
ELEMENTWISE = KEEP_WIDTH - {
    "BatchNormalization",
    "SyncBatchNormalization",
    "PReLU",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "LayerNormalization",
    "UnitNormalization",
    "Softmax",
    "Activation",
    "Masking",
    "Flatten",
}
#: Activations that mix channels (a softmax over the channel axis): the others act on each value alone.
MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax"})
#: Layers joining same-shaped tensors value by value: their operands share one channel set.
JOINS = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"})
#: Why a group keeps every channel when it reaches the model's input or output.
INPUT, OUTPUT = "it is the model's input", "it is the model's output"
#: Sensitivity allocation: every group keeps between these multiples of the fraction uniform removal keeps (and
#: at most all of its channels): no group becomes a bottleneck far narrower than uniform pruning would make it.
KEEP_RANGE = (0.5, 2.0)
#: Validation samples the sensitivity pass scores: one forward pass over them per free group.
SENSITIVITY_SAMPLES = 2048


@dataclass(frozen=True)
class Flat:
    """A flattened block of a layout: ``inner`` (a layout, the channels) repeated at each of ``positions`` positions.

    A layout is a tuple of items, each a segment ``(group key, size)`` or a ``Flat`` block, side by side.
    """

    positions: int
    inner: tuple


class _Groups(WidthGroups):
    """Channel groups that also remember each group's width (its number of channels)."""

    def __init__(self):
        super().__init__()
        self.size: dict = {}

    def new(self, key, size: int):
        self.parent.setdefault(key, key)
        self.size.setdefault(key, size)
        return key


def _segments(layout) -> tuple:
    """Every ``(group key, size)`` segment of ``layout``, flattened blocks' channels once each."""
    return tuple(seg for item in layout for seg in (_segments(item.inner) if isinstance(item, Flat) else (item,)))


def _width(layout) -> int:
    return sum(item.positions * _width(item.inner) if isinstance(item, Flat) else item[1] for item in layout)


def _shape_of(layout) -> tuple:
    """What must match for two layouts to be tied segment by segment."""
    return tuple(
        ("flat", item.positions, _shape_of(item.inner)) if isinstance(item, Flat) else item[1] for item in layout
    )


@dataclass
class _Use:
    """How one layer is rewritten: the layout it reads, the group it writes (producers), its kind."""

    layer: object
    kind: str
    reads: object = None
    writes: object = None
    role: str = "keep"  # producer | per_channel | reshape | keep


@dataclass
class ChannelPlan:
    """Which channels of which layers a ``target_sparsity`` channel pruning keeps, and which layers it leaves."""

    groups: _Groups
    uses: dict[str, _Use]
    #: Group root -> indices of the channels kept (groups not listed keep all).
    keep: dict = field(default_factory=dict)
    #: Layers that set a width, by name: (width before, width after); equal when left full width.
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Layers that set a width but keep it, other than the output's: name -> why.
    left: dict[str, str] = field(default_factory=dict)
    #: Group root -> importance of each of its channels (larger: kept first); every group with a producer.
    scores: dict = field(default_factory=dict)
    #: Layer name -> its multiply-accumulates for one input at full width (layers whose cost the plan changes).
    macs: dict[str, int] = field(default_factory=dict)
    #: Roots of the groups that reach the model's output.
    outputs: frozenset = frozenset()
    #: Free group root -> the fraction of its channels asked removed (before rounding to whole channels).
    sparsity: dict = field(default_factory=dict)

    @property
    def free(self) -> list:
        """Roots of the groups that can lose a channel (not tied to the input, output or a layer kfopt cannot
        follow, and wider than one channel), in the graph's order."""
        return [r for r in self.scores if not self.groups.why_fixed(r) and self.groups.size[r] > 1]

    def removing(self, sparsity) -> ChannelPlan:
        """This plan's graph with ``sparsity`` removed: one fraction for every free group, or a mapping of group
        root -> fraction (groups not in it keep every channel). Each group keeps its ``round(size * (1 -
        fraction))`` most important channels, at least one. A new plan; this one is unchanged."""
        fractions = {r: sparsity for r in self.free} if isinstance(sparsity, (int, float)) else dict(sparsity)
        plan = ChannelPlan(self.groups, self.uses, scores=self.scores, macs=self.macs, outputs=self.outputs)
        for root, fraction in fractions.items():
            size = self.groups.size[root]
            count = max(1, int(round(size * (1 - fraction))))
            plan.sparsity[root] = float(fraction)
            if count < size:
                plan.keep[root] = np.sort(np.argsort(-self.scores[root], kind="stable")[:count])
        for name, use in self.uses.items():
            if use.role != "producer":
                continue
            (key, width), *_ = use.writes
            plan.widths[name] = (width, len(plan.kept(use.writes)))
            why = self.groups.why_fixed(key)
            if why and self.groups.find(key) not in self.outputs:  # the output's width is the model's, not a choice
                plan.left[name] = why
        return plan

    def cost(self) -> float:
        """The multiply-accumulates, for one input, of the layers whose widths the plan sets (what removing
        channels saves): each layer's full-width count times the fractions of its inputs and outputs kept."""
        total = 0.0
        for name, macs in self.macs.items():
            use = self.uses[name]
            kept = len(self.kept(use.reads)) / _width(use.reads) if use.reads is not None else 1.0
            if use.role == "producer":
                kept *= len(self.kept(use.writes)) / _width(use.writes)
            total += macs * kept
        return total

    def removed_fraction(self) -> float:
        """The fraction of the free groups' channels the plan removes (channel-count weighted)."""
        sizes = {root: self.groups.size[root] for root in self.free}
        kept = sum(len(self.keep.get(root, range(size))) for root, size in sizes.items())
        return 1 - kept / max(1, sum(sizes.values()))

    def kept(self, layout) -> np.ndarray:
        """Indices, along a tensor's last axis, of the values kept in a tensor of ``layout``."""
        parts, offset = [], 0
        for item in layout:
            if isinstance(item, Flat):  # position p, channel c of the block is at offset + p * width + c
                width = _width(item.inner)
                inner = self.kept(item.inner)
                parts.append(offset + (np.arange(item.positions)[:, None] * width + inner[None, :]).ravel())
                offset += item.positions * width
            else:
                key, size = item
                parts.append(offset + self.keep.get(self.groups.find(key), np.arange(size)))
                offset += size
        return np.concatenate(parts) if parts else np.zeros(0, dtype=int)

    @property
    def shrunk(self) -> dict[str, tuple[int, int]]:
        """The layers whose width shrank: name -> (before, after)."""
        return {name: w for name, w in self.widths.items() if w[1] < w[0]}


def _last_dim(tensor):
    shape = getattr(tensor, "shape", None)
    return shape[-1] if shape is not None and len(shape) else None


def _channels_last_axis(layer, rank: int) -> bool:
    """True when ``layer`` works on the last axis as channels (data_format channels_last, BN axis -1)."""
    config = layer.get_config()
    if config.get("data_format", "channels_last") != "channels_last":
        return False
    axis = config.get("axis", -1)
    if type(layer).__name__ == "BatchNormalization":
        axis = axis if isinstance(axis, int) else (axis[0] if len(axis) == 1 else None)
        return axis in (-1, rank - 1)
    return True


def plan_channels(model, target_sparsity: float, keep_dense=(), norm: str = "l1") -> ChannelPlan:
    """Which channels of ``model`` (a built Sequential or functional tf_keras model) to keep: see the module doc.

    ``keep_dense`` names layers that keep all their filters (layers reading a
    pruned layer's output still lose the matching input slice).
    """
    if not has_layer_graph(model) or not model.outputs:
        raise KfoptError(
            f"prune(method=channels) follows the layer graph, but '{model.name}' has none "
            "(a subclassed model, or a Sequential model never built on an input shape).",
            "pass a functional or Sequential model built on keras.Input.",
        )
    keras = _tf.keras()
    groups = _Groups()
    uses: dict[str, _Use] = {}
    layouts: dict[int, object] = {}
    followers: dict[str, str] = {}  # producer name -> the BatchNormalization reading its output

    def fresh(key, width) -> tuple:
        return ((groups.new(key, int(width)), int(width)),)

    def layout(tensor):
        if id(tensor) not in layouts:  # a tensor kfopt did not see made (a constant): leave its channels alone
            width = _last_dim(tensor) or 1
            layouts[id(tensor)] = fresh(("const", id(tensor)), width)
            fix(layouts[id(tensor)], "it meets a tensor kfopt did not see made")
        return layouts[id(tensor)]

    def fix(lay, why: str) -> None:
        for key, _ in _segments(lay):
            groups.fix(key, why)

    def tie(a, b, why: str) -> None:
        if _shape_of(a) == _shape_of(b):
            for (ka, _), (kb, _) in zip(_segments(a), _segments(b)):
                groups.union(ka, kb)
        else:  # differently split channels: tying them would need finer groups; keep both whole instead
            fix(a, why)
            fix(b, why)

    def opaque(layer, inputs, outputs, why: str | None = None) -> None:
        why = why or f"it meets '{layer.name}' ({type(layer).__name__}), which kfopt cannot remove channels through"
        for tensor in inputs:
            fix(layout(tensor), why)
        for index, tensor in enumerate(outputs):
            layouts[id(tensor)] = fresh(("opaque", layer.name, index), _last_dim(tensor) or 1)
            fix(layouts[id(tensor)], why)

    def reads(layer, tensor, kind: str, role: str) -> _Use:
        """Record that ``layer`` reads ``tensor``; a layer called several times reads one channel set."""
        use = uses.get(layer.name)
        if use is None:
            use = uses[layer.name] = _Use(layer, kind, reads=layout(tensor), role=role)
        else:
            tie(use.reads, layout(tensor), f"'{layer.name}' is called on tensors split differently")
        return use

    def visit(node) -> None:
        layer = node.layer
        kind = type(layer).__name__
        inputs = list(node.keras_inputs)
        outputs = _tf.tf().nest.flatten(node.outputs)
        if kind == "InputLayer":
            return
        if isinstance(layer, keras.Model) or not inputs:
            opaque(layer, inputs, outputs, f"it meets the nested model '{layer.name}'" if inputs else None)
            return
        rank = len(inputs[0].shape)
        try:
            config = layer.get_config()
        except NotImplementedError:  # a custom layer without a config cannot be rebuilt at another width
            opaque(layer, inputs, outputs)
            return
        first = layout(inputs[0])
        if kind in PRODUCERS and config.get("groups", 1) == 1 and _channels_last_axis(layer, rank):
            use = reads(layer, inputs[0], kind, "producer") if PRODUCERS[kind][1] is not None else None
            if use is None:
                use = uses.setdefault(layer.name, _Use(layer, kind, role="producer"))
                fix(first, "it is read by an Embedding")  # token ids: not channels
            use.writes = fresh(("out", layer.name), config[PRODUCERS[kind][0]])
            layouts[id(outputs[0])] = use.writes
            if layer.name in keep_dense:
                fix(use.writes, "kept full width by keep_dense")
            if config.get("activation") in MIXING_ACTIVATIONS:  # removing a unit changes the others' softmax
                fix(use.writes, f"'{layer.name}' ends in a {config['activation']} over its units")
            return
        if kind == "BatchNormalization" and _channels_last_axis(layer, rank):
            reads(layer, inputs[0], kind, "per_channel")
            layouts[id(outputs[0])] = uses[layer.name].reads
            producer = getattr(inputs[0], "_keras_history", None)
            if producer is not None and type(producer.layer).__name__ in PRODUCERS:
                followers.setdefault(producer.layer.name, layer.name)
            return
        if kind == "DepthwiseConv2D" and config.get("depth_multiplier", 1) == 1 and _channels_last_axis(layer, rank):
            reads(layer, inputs[0], kind, "per_channel")
            layouts[id(outputs[0])] = uses[layer.name].reads
            return
        if kind == "PReLU" and not layer.get_config().get("shared_axes"):
            reads(layer, inputs[0], kind, "per_channel")
            layouts[id(outputs[0])] = uses[layer.name].reads
            return
        if kind == "Activation" and config.get("activation") not in MIXING_ACTIVATIONS:
            layouts[id(outputs[0])] = first
            return
        if kind == "Rescaling" and not any(isinstance(config.get(k), (list, tuple)) for k in ("scale", "offset")):
            layouts[id(outputs[0])] = first
            return
        if kind in ELEMENTWISE and not layer.weights and _channels_last_axis(layer, rank):  # channels_first pools rows
            layouts[id(outputs[0])] = first
            return
        if kind in JOINS:
            width = _last_dim(outputs[0])
            full = [t for t in inputs if _last_dim(t) == width]
            for tensor in inputs:
                if _last_dim(tensor) != width and _last_dim(tensor) != 1:
                    fix(layout(tensor), f"'{layer.name}' ({kind}) joins tensors of different widths")
            for tensor in full[1:]:
                tie(layout(full[0]), layout(tensor), f"'{layer.name}' ({kind}) joins differently split channels")
            layouts[id(outputs[0])] = layout(full[0]) if full else fresh(("join", layer.name), width or 1)
            return
        if kind == "Concatenate":
            axis = config.get("axis", -1)
            if axis in (-1, rank - 1):  # each operand's layout (flattened blocks too) at its offset
                layouts[id(outputs[0])] = tuple(item for t in inputs for item in layout(t))
            else:  # joined along another axis: every operand has the same channels
                for tensor in inputs[1:]:
                    tie(first, layout(tensor), f"'{layer.name}' concatenates differently split channels")
                layouts[id(outputs[0])] = first
            return
        shape = tuple(inputs[0].shape[1:])
        static = all(isinstance(d, int) for d in shape)
        if kind == "Flatten" and static:
            layouts[id(outputs[0])] = first if rank == 2 else (Flat(int(np.prod(shape[:-1])), first),)
            return
        if kind == "Reshape" and static:
            target = tuple(config["target_shape"])
            if len(target) == 1 and target[0] in (-1, int(np.prod(shape))):  # a Flatten by another name
                layouts[id(outputs[0])] = first if rank == 2 else (Flat(int(np.prod(shape[:-1])), first),)
                return
            if target and target[-1] == shape[-1] and int(np.prod(target[:-1])) == int(np.prod(shape[:-1])):
                uses[layer.name] = _Use(layer, kind, reads=first, role="reshape")
                layouts[id(outputs[0])] = first
                return
        opaque(layer, inputs, outputs)

    for index, tensor in enumerate(model.inputs):
        layouts[id(tensor)] = fresh(("input", index), _last_dim(tensor) or 1)
        fix(layouts[id(tensor)], INPUT)

    def check_widths(node) -> None:
        """Treat the layer as opaque when a layout it made does not add up to its tensor's width.

        A safety net: a layout that disagrees with its tensor would slice the layers reading it wrongly.
        """
        outputs = _tf.tf().nest.flatten(node.outputs)
        wrong = [
            t
            for t in outputs
            if id(t) in layouts and _last_dim(t) is not None and _width(layouts[id(t)]) != _last_dim(t)
        ]
        if not wrong:
            return
        layer = node.layer
        use = uses.pop(layer.name, None)
        for lay in (use.reads, use.writes) if use is not None else ():
            if lay is not None:
                fix(lay, f"kfopt cannot follow the channels of '{layer.name}' ({type(layer).__name__})")
        opaque(layer, list(node.keras_inputs), outputs)

    for depth in sorted(model._nodes_by_depth, reverse=True):  # inputs first
        for node in model._nodes_by_depth[depth]:
            visit(node)
            if type(node.layer).__name__ != "InputLayer":
                check_widths(node)
    outputs = set()
    for tensor in model.outputs:
        fix(layout(tensor), OUTPUT)
        outputs |= {groups.find(key) for key, _ in _segments(layout(tensor))}

    plan = ChannelPlan(groups, uses, outputs=frozenset(outputs))
    plan.scores = _importance(plan, followers, norm)
    plan.macs = _macs(model, plan)
    return plan.removing(target_sparsity)


def _importance(plan: ChannelPlan, followers: dict[str, str], norm: str) -> dict:
    """Group root -> importance of each of its channels (larger: kept first)."""
    totals: dict = {}
    for name, use in plan.uses.items():
        if use.role != "producer":
            continue
        kernel = np.asarray(use.layer.get_weights()[0], dtype=np.float64)
        flat = np.abs(kernel.reshape(-1, kernel.shape[-1]))
        score = flat.sum(axis=0) if norm == "l1" else np.sqrt((flat**2).sum(axis=0))
        bn = plan.uses.get(followers.get(name, ""))
        if bn is not None and bn.layer.scale:
            score = score * np.abs(np.asarray(bn.layer.gamma.numpy(), dtype=np.float64))
        # Each producer counts alike, however wide its filters (a 3x3x256 and a 1x1x16 conv in one residual group).
        score = score / (score.mean() or 1.0)
        root = plan.groups.find(use.writes[0][0])
        totals[root] = totals.get(root, 0) + score
    return totals


def _macs(model, plan: ChannelPlan) -> dict[str, int]:
    """Layer name -> multiply-accumulates for one input (every call) of the producers and depthwise convs of
    ``plan``: what removing channels changes. When a count is unknown (a spatial size known only at run time),
    every layer counts its kernel's size instead, so the layers still weigh alike against each other."""
    from kfopt.flops import layer_macs

    costed = {name for name, use in plan.uses.items() if use.role == "producer" or use.kind == "DepthwiseConv2D"}
    macs: dict[str, int] = {}
    try:
        for depth in model._nodes_by_depth:
            for node in model._nodes_by_depth[depth]:
                layer = node.layer
                if layer.name in costed:
                    shapes = [tuple(t.shape) for t in node.keras_inputs]
                    outputs = [tuple(t.shape) for t in _tf.tf().nest.flatten(node.outputs)]
                    macs[layer.name] = macs.get(layer.name, 0) + layer_macs(layer, shapes, outputs)
    except Exception:  # flops's _Unknown: a dimension not known before run time
        macs = {name: int(np.prod(plan.uses[name].layer.weights[0].shape)) for name in costed}
    return macs


def rebuild(model, plan: ChannelPlan):
    """``model``'s structure rebuilt at the widths of ``plan``, with fresh weights (none copied): a new model.

    Raises a KfoptError when the rebuilt model does not give the original
    outputs' shapes, or when a layer of it is not built for the kept slices of
    the original's weights (either would be a bug in the plan): cheap enough to
    run before any work, so an impossible model is refused in one line.
    """
    keras = _tf.keras()
    new_width = {name: after for name, (_, after) in plan.widths.items()}

    def rebuilt(layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer)
        config = layer.get_config()
        use = plan.uses.get(layer.name)
        if use is not None and use.role == "producer":
            config[PRODUCERS[use.kind][0]] = new_width[layer.name]
        elif use is not None and use.role == "reshape":
            config["target_shape"] = (*tuple(config["target_shape"])[:-1], len(plan.kept(use.reads)))
        return layer.__class__.from_config(config)

    fix = "report this model to kfopt; meanwhile use keep_dense=NAME for the layers named, or prune(method=l1)."
    smaller = keras.models.clone_model(model, clone_function=rebuilt)
    got = [tuple(t.shape[1:]) for t in smaller.outputs]
    want = [tuple(t.shape[1:]) for t in model.outputs]
    if got != want:
        raise KfoptError(
            f"prune(method=channels) rebuilt '{model.name}' with outputs of shapes {got}, not {want}.", fix
        )
    old_layers = {layer.name: layer for layer in model.layers}
    for layer in smaller.layers:
        old = [tuple(w.shape) for w in old_layers[layer.name].weights]
        use = plan.uses.get(layer.name)
        planned = [_planned_shape(shape, take) for shape, take in zip(old, _takes(use, old, plan))] if use else old
        built = [tuple(w.shape) for w in layer.weights]
        if planned != built:
            raise KfoptError(
                f"prune(method=channels) would give layer '{layer.name}' of '{model.name}' weights of shapes "
                f"{planned}, but rebuilt at the planned widths it takes {built}.",
                fix,
            )
    return smaller


def remove_channels(model, plan: ChannelPlan):
    """``model`` rebuilt at the widths of ``plan``, with the kept slices of its weights: a new, smaller model.

    The input model is not changed. Raises a KfoptError (see :func:`rebuild`) when the plan cannot be built.
    """
    smaller = rebuild(model, plan)
    old_layers = {layer.name: layer for layer in model.layers}
    for layer in smaller.layers:
        weights = old_layers[layer.name].get_weights()
        use = plan.uses.get(layer.name)
        if use is not None and weights:
            weights = _sliced(use, weights, plan)
        layer.set_weights(weights)
    return smaller


def _takes(use: _Use, shapes: list[tuple], plan: ChannelPlan) -> list[dict[int, np.ndarray]]:
    """For each of a layer's weights (given by shape): axis -> the indices it keeps along that axis.

    A producer's kernel loses its removed filters (last axis) and the rows of the removed input channels; its
    bias, the removed filters. A per-channel layer's vectors (and a depthwise kernel's channel axis) lose the
    removed channels.
    """
    if use.role == "producer":
        out = plan.kept(use.writes)
        in_axis = PRODUCERS[use.kind][1]
        kernel = {len(shapes[0]) - 1: out}
        if in_axis is not None:
            kernel[len(shapes[0]) + in_axis] = plan.kept(use.reads)
        return [kernel, *({len(shape) - 1: out} for shape in shapes[1:])]
    if use.role == "per_channel":
        kept = plan.kept(use.reads)
        width = _width(use.reads)
        if use.kind == "DepthwiseConv2D":  # kernel (h, w, channels, 1), bias (channels,)
            return [{2: kept}, *({len(shape) - 1: kept} for shape in shapes[1:])]
        return [{len(shape) - 1: kept} if shape and shape[-1] == width else {} for shape in shapes]
    return [{} for _ in shapes]


def _planned_shape(shape: tuple, take: dict[int, np.ndarray]) -> tuple:
    return tuple(len(take[axis]) if axis in take else size for axis, size in enumerate(shape))


def _sliced(use: _Use, weights: list[np.ndarray], plan: ChannelPlan) -> list[np.ndarray]:
    """The kept slices of one layer's weights (see :func:`_takes`)."""
    sliced = []
    for weight, take in zip(weights, _takes(use, [w.shape for w in weights], plan)):
        for axis, kept in take.items():
            weight = weight.take(kept, axis=axis)
        sliced.append(weight)
    return sliced


@contextmanager
def masked(model, plan: ChannelPlan):
    """Within the block, ``model`` computes what ``remove_channels(model, plan)`` computes, without a rebuild.

    A removed channel is one no layer reads any more, so zeroing the kernel rows through which every producer
    reads it gives the smaller model's outputs (the removed channels are still computed, then multiplied by 0).
    ``model`` is the planned model or a copy of it (its layers are found by name); its kernels are assigned in
    place and restored when the block ends, however it ends.
    """
    saved = []
    try:
        for name, use in plan.uses.items():
            if use.role != "producer" or PRODUCERS[use.kind][1] is None:
                continue
            rows, width = plan.kept(use.reads), _width(use.reads)
            if len(rows) == width:
                continue
            kernel = model.get_layer(name).kernel
            value = kernel.numpy()
            saved.append((kernel, value))
            axis = value.ndim + PRODUCERS[use.kind][1]
            mask = np.zeros(width, dtype=value.dtype)
            mask[rows] = 1
            kernel.assign(value * mask.reshape([-1 if a == axis else 1 for a in range(value.ndim)]))
        yield model
    finally:
        for kernel, value in reversed(saved):
            kernel.assign(value)


@dataclass
class Sensitivity:
    """What removing each free group's channels alone (no fine-tuning) costs the task's metric on validation."""

    #: The metric's name (the run's budgeted metric).
    metric: str
    #: Group root -> the metric's drop (positive: worse) with only that group pruned; None when not finite.
    drops: dict
    #: One validation value's worth of a counted metric (accuracy: 1/samples); None for other metrics.
    resolution: float | None
    #: Validation samples scored.
    samples: int


def measure_sensitivity(model, plan: ChannelPlan, sparsity: float, x, y_true, task, metric, position: int = 0):
    """Each free group of ``plan`` pruned alone at ``sparsity`` (through :func:`masked`, on ``model`` or a copy):
    the drop of ``metric`` (:class:`kfopt.task.Metric`) on ``x``/``y_true`` (``task.targets`` of the labels).

    One forward pass over ``x`` per free group, plus one for the unpruned model; ``position`` picks the scored
    output of a model with several. Returns a :class:`Sensitivity`.
    """
    from kfopt.evaluate import KerasRunner, predict

    runner = KerasRunner(model).choose(position)  # reads the kernels as masked() leaves them at each call

    def score() -> float | None:
        return metric.score(y_true, task.scores(predict(runner, x)))

    base = score()
    drops = {}
    for root in plan.free:
        with masked(model, plan.removing({root: sparsity})):
            drops[root] = metric.drop(base, score())
    counted = {"samples": len(y_true), "labels": np.asarray(y_true).size}.get(metric.counted or "", 0)
    return Sensitivity(metric.name, drops, 1 / counted if counted else None, len(y_true))


def counted_drops(sensitivity: Sensitivity) -> dict:
    """Group root -> its drop in whole units of the metric's resolution, at least one (accuracy: validation
    samples, so drops within one sample of each other are alike and a drop of 0 or 1 sample counts as 1); for a
    metric without a resolution the drop itself, at least 1e-6. A drop that could not be scored is infinite."""
    unit = sensitivity.resolution
    counted = {}
    for root, drop in sensitivity.drops.items():
        if drop is None or not np.isfinite(drop):
            counted[root] = np.inf
        elif unit:
            counted[root] = max(1, round(drop / unit)) * unit
        else:
            counted[root] = max(drop, 1e-6)
    return counted


def allocate(plan: ChannelPlan, target_sparsity: float, sensitivity: Sensitivity) -> ChannelPlan:
    """A plan that removes fewer channels from groups whose removal costs the metric much for the MACs it saves,
    and more from the others, at the MACs of removing ``target_sparsity`` of every free group: see the module doc
    for the rule. The uniform plan when the groups' drops cannot be told apart."""
    drops = counted_drops(sensitivity)
    if len(set(drops.values())) < 2:  # no group tells apart from the others: nothing to move
        return plan.removing(target_sparsity)
    if any(plan.macs.values()):
        cost = ChannelPlan.cost
    else:  # no layer the plan changes multiplies (embeddings only): count channels instead

        def cost(p: ChannelPlan) -> float:
            return 1 - p.removed_fraction()

    full = cost(plan.removing(0.0))
    # MACs saved per unit of metric lost, when the group alone loses target_sparsity of its channels
    gain = {root: (full - cost(plan.removing({root: target_sparsity}))) / drops[root] for root in plan.free}
    mean = float(np.mean(list(gain.values()))) or 1.0
    kept = 1 - target_sparsity
    low, high = kept * KEEP_RANGE[0], min(1.0, kept * KEEP_RANGE[1])

    def at(level: float) -> ChannelPlan:
        return plan.removing({root: 1 - float(np.clip(1 - level * gain[root] / mean, low, high)) for root in plan.free})

    budget = cost(plan.removing(target_sparsity))
    small, large = 0.0, 1.0
    while cost(at(large)) > budget and large < 1e6:  # at a large enough level every group keeps ``low``
        small, large = large, large * 2
    for _ in range(40):  # the smallest level that costs no more than the budget
        middle = (small + large) / 2
        small, large = (small, middle) if cost(at(middle)) <= budget else (middle, large)
    return at(large)


def group_fractions(plan: ChannelPlan) -> dict:
    """Free group root -> the fraction of its channels ``plan`` removes (after rounding to whole channels)."""
    return {
        root: 1 - len(plan.keep.get(root, range(plan.groups.size[root]))) / plan.groups.size[root] for root in plan.free
    }


def note_line(plan: ChannelPlan, target_sparsity: float, by: str | None = None, shown: int = 6) -> str | None:
    """One line naming the layers that shrank and by how much, e.g. ``... conv2d 32->16, dense 64->32``.

    ``by``: what per-group fractions were allocated by (e.g. ``validation accuracy``); None: uniform.
    """
    shrunk = plan.shrunk
    if not shrunk:
        return None
    parts = [f"{name} {before}->{after}" for name, (before, after) in list(shrunk.items())[:shown]]
    more = f" and {len(shrunk) - shown} more" if len(shrunk) > shown else ""
    removed, extra = f"{target_sparsity:.0%}", ""
    if by is not None:
        fractions = group_fractions(plan).values()
        removed = f"{plan.removed_fraction():.0%}"
        extra = (
            f", per layer {min(fractions):.0%}-{max(fractions):.0%} by {by} sensitivity "
            f"(the MACs of {target_sparsity:.0%} everywhere)"
        )
    return (
        f"prune(method=channels) removed {removed} of the channels of {len(shrunk)} of {len(plan.widths)} layers "
        f"that set a width{extra}: " + ", ".join(parts) + more
    )
