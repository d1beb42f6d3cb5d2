"""Which layers of a Keras model a built-in technique acts on, and how it says which it left alone.

Pruning, quantization-aware training and distillation rewrite a model layer by
layer through ``clone_model``; they share how layers are walked (nested models
included), which weights count as kernels, the refusal of a model without a
layer graph, and the one-line note that names the layers a technique left as
they were (``ModelHandle.info["notes"]``).
"""

from __future__ import annotations

from collections.abc import Iterator

from kfopt import _tf
from kfopt.errors import KfoptError

#: How many layer names a note lists per reason before "and N more".
NAMES_SHOWN = 3


def all_layers(model) -> Iterator:
    """``model``'s layers in order, nested models' layers included (not the nested models themselves)."""
    keras = _tf.keras()
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        else:
            yield layer


def kernels(layer) -> list:
    """The layer's kernels: trainable weights of ndim >= 2 (what pruning zeroes; biases and norms never)."""
    return [w for w in layer.trainable_weights if len(w.shape) >= 2]


def has_layer_graph(model) -> bool:
    """True for a Sequential or functional model, whose layers ``clone_model`` can rebuild one by one."""
    keras = _tf.keras()
    return isinstance(model, keras.Sequential) or bool(getattr(model, "_is_graph_network", False))


def require_layer_graph(model, what: str) -> None:
    """Refuse a subclassed model: ``what`` (e.g. ``prune(method=magnitude)``) rebuilds its layers one by one."""
    if not has_layer_graph(model):
        raise KfoptError(
            f"{what} rebuilds the model layer by layer, but '{model.name}' is a subclassed model "
            f"({type(model).__name__}) without a layer graph.",
            "pass the model as a Sequential or functional Keras model, or use quantize(mode=int8|dynamic|float16), "
            "which needs no layer graph.",
        )


def note(subject: str, left: dict[str, str], total: int, state: str, counted: str = "layers") -> str:
    """One line naming the layers ``subject`` left ``state`` (dense, float, full width), grouped by why.

    ``left`` maps layer name to the reason; ``total`` is how many ``counted``
    (e.g. "layers with weights") ``subject`` could have acted on. E.g.
    ``prune(method=magnitude) left 16 of 82 layers with weights dense: tfmot
    does not prune DepthwiseConv2D kernels (block1a_dwconv, block2a_dwconv,
    block2b_dwconv and 13 more)``.
    """
    by_reason: dict[str, list[str]] = {}
    for name, reason in left.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:NAMES_SHOWN])
        more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
        parts.append(f"{reason} ({shown}{more})")
    return f"{subject} left {len(left)} of {total} {counted} {state}: " + "; ".join(parts)


def with_note(info: dict, line: str | None) -> list[str]:
    """The notes of ``info`` (earlier steps' lines) followed by ``line``: what ``info["notes"]`` becomes."""
    notes = list(info.get("notes") or [])
    return [*notes, line] if line else notes


class WidthGroups:
    """Union-find over the tensors of a layer graph that must keep one width (or one channel set).

    Layers that join tensors value by value (Add, Multiply, ...) tie their operands together;
    a group that reaches something which cannot change (the model's input or output, a layer
    kfopt cannot follow) is fixed, with the first reason given. Width-scaled students and
    channel pruning both plan on it.
    """

    def __init__(self):
        self.parent: dict = {}
        self.fixed: dict = {}  # root -> why this group keeps its width

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.fixed:
            self.fixed.setdefault(ra, self.fixed.pop(rb))

    def fix(self, key, why: str) -> None:
        self.fixed.setdefault(self.find(key), why)

    def why_fixed(self, key) -> str | None:
        return self.fixed.get(self.find(key))
