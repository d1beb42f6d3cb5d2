"""Layer sensitivity: how much accuracy each layer costs when it alone is pruned, or alone rounded to int8.

The search reads these rows to keep the most sensitive layers dense (or float
under QAT), see :mod:`kfopt.recipe_search.proposals`. Everything is measured on the
validation split, so no search decision looks at the test split.
"""

from __future__ import annotations


def layer_sensitivity(keras_model, data, sparsity: float = 0.9) -> list[dict]:
    """Prune one layer at a time (its smallest ``sparsity`` of kernel weights, no fine-tuning), then int8 it.

    Returns one row per layer with kernels: ``layer``, ``params`` (kernel
    weights), ``sparsity``, ``val_accuracy`` and ``val_accuracy_drop`` against
    the unpruned model, and ``int8_val_accuracy_drop`` when only that layer's
    kernels are rounded to int8 (symmetric, per output channel, as the TFLite
    converter stores them), all on the validation split. The caller's model is
    not changed (a copy is changed). Most prune-sensitive layer first.
    """
    import numpy as np

    from ..models import copy_model
    from ..plugins.prune import layer_kernels

    x, y = data.validation.arrays()
    if not len(x):
        return []
    model = copy_model(keras_model)

    def val_accuracy() -> float:
        pred = np.concatenate([np.asarray(model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)])
        return float((pred.argmax(axis=1) == y).mean())

    def accuracy_with(variables, values) -> float:
        original = [v.numpy() for v in variables]
        try:
            for variable, value in zip(variables, values):
                variable.assign(value)
            return val_accuracy()
        finally:
            for variable, value in zip(variables, original):
                variable.assign(value)

    base = val_accuracy()
    rows = []
    for layer in layer_kernels(model):
        original = layer.values()
        accuracy = accuracy_with(layer.variables, layer.pruned(sparsity))
        int8 = accuracy_with(layer.variables, [_int8_weights(v) for v in original])
        rows.append(
            {
                "layer": layer.name,
                "params": int(sum(v.size for v in original)),
                "sparsity": sparsity,
                "val_accuracy": accuracy,
                "val_accuracy_drop": base - accuracy,
                "int8_val_accuracy_drop": base - int8,
            }
        )
    rows.sort(key=lambda r: (-r["val_accuracy_drop"], r["layer"]))
    return rows


def _int8_weights(kernel):
    """``kernel`` rounded to int8 and back: symmetric, one scale per output channel (the last axis)."""
    import numpy as np

    scale = np.abs(kernel).max(axis=tuple(range(kernel.ndim - 1)), keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1)
    return (np.round(kernel / scale) * scale).astype(kernel.dtype)
