"""Layer sensitivity: how much the task's metric loses when one layer alone is pruned, or alone rounded to int8.

The search reads these rows to keep the most sensitive layers dense (or float
under QAT), see :mod:`kfopt.recipe_search.proposals`. Everything is measured on the
validation split, so no search decision looks at the test split. The metric is
the run's budgeted metric (:mod:`kfopt.task`): accuracy for a multi-class model,
binary accuracy for a binary one, mae for regression, or the user's ``--metric``;
a drop is positive when the changed model is worse, whichever way the metric points.
"""

from __future__ import annotations


def layer_sensitivity(
    keras_model, data, sparsity: float = 0.9, *, task=None, metric=None, output: str | int | None = None
) -> list[dict]:
    """Prune one layer at a time (its smallest ``sparsity`` of kernel weights, no fine-tuning), then int8 it.

    Returns one row per layer with kernels: ``layer``, ``type`` (its Keras
    class, e.g. ``Conv2D``), ``params`` (kernel weights), ``sparsity``,
    ``metric`` (the metric's name), ``val_metric`` and ``val_metric_drop``
    against the unpruned model, and ``int8_val_metric_drop`` when only that
    layer's kernels are rounded to int8 (symmetric, per output channel, as the
    TFLite converter stores them), all on the validation split. When the metric
    is accuracy the same three numbers are also written as ``val_accuracy``,
    ``val_accuracy_drop`` and ``int8_val_accuracy_drop``, the names readers of
    earlier records know (never for another metric: an mae is not an accuracy). The caller's model is not changed (a
    copy is changed). Most prune-sensitive layer first.

    ``task`` (:class:`kfopt.task.Task`) and ``metric`` (:class:`kfopt.task.Metric`)
    are the run's (the search passes its Evaluator's); None: inferred from the
    model and the validation labels with the task's default metric, as the
    Evaluator does. ``output`` picks the scored output of a multi-output model.
    """

    from ..evaluate import KerasRunner, predict
    from ..models import copy_model
    from ..plugins.prune import layer_kernels

    x, y = data.validation.arrays()
    if not len(x):
        return []
    model = copy_model(keras_model)
    task, metric = _task_and_metric(model, y, task, metric)
    y_true = task.targets(y)
    position = _output_position(model, output)

    runner = KerasRunner(model).choose(position)  # reads the variables as they are at each call

    def val_metric() -> float | None:
        return metric.score(y_true, task.scores(predict(runner, x)))

    def metric_with(variables, values) -> float | None:
        original = [v.numpy() for v in variables]
        try:
            for variable, value in zip(variables, values):
                variable.assign(value)
            return val_metric()
        finally:
            for variable, value in zip(variables, original):
                variable.assign(value)

    base = val_metric()
    rows = []
    for layer in layer_kernels(model):
        original = layer.values()
        pruned = metric_with(layer.variables, layer.pruned(sparsity))
        int8 = metric_with(layer.variables, [_int8_weights(v) for v in original])
        drop, int8_drop = metric.drop(base, pruned), metric.drop(base, int8)
        rows.append(
            {
                "layer": layer.name,
                "type": type(model.get_layer(layer.name)).__name__ if _has_layer(model, layer.name) else None,
                "params": int(sum(v.size for v in original)),
                "sparsity": sparsity,
                "metric": metric.name,
                "val_metric": pruned,
                "val_metric_drop": drop,
                "int8_val_metric_drop": int8_drop,
            }
        )
        if metric.name == "accuracy":  # the names readers of earlier records know, for accuracy only
            rows[-1].update(val_accuracy=pruned, val_accuracy_drop=drop, int8_val_accuracy_drop=int8_drop)
    rows.sort(key=lambda r: (-(r["val_metric_drop"] or 0), r["layer"]))
    return rows


def sensitivity_drop(row: dict, int8: bool = False) -> float:
    """A row's validation drop of the budgeted metric (pruned alone, or ``int8`` weights alone); rows written
    before the metric was named carry it as ``val_accuracy_drop``."""
    keys = ("int8_val_metric_drop", "int8_val_accuracy_drop") if int8 else ("val_metric_drop", "val_accuracy_drop")
    value = next((row[k] for k in keys if row.get(k) is not None), None)
    return float(value or 0)


def _task_and_metric(model, y, task, metric):
    """The run's task and metric, or the ones the Evaluator would infer (default metric of the task)."""
    if task is not None and metric is not None:
        return task, metric
    from ..plugins.manager import registry
    from ..task import compiled_loss, infer_task

    metrics = registry().metrics
    task = task or infer_task(
        model, [y], metric=metric.name if metric else None, metrics=metrics, loss=compiled_loss(model)
    )
    return task, metric or metrics[task.metric]


def _output_position(model, output) -> int:
    names = list(getattr(model, "output_names", None) or ["output"])
    if len(names) < 2:
        return 0
    from ..signature import output_position

    return output_position(names, output)


def _has_layer(model, name: str) -> bool:
    try:
        model.get_layer(name)
    except ValueError:
        return False
    return True


def _int8_weights(kernel):
    """``kernel`` rounded to int8 and back: symmetric, one scale per output channel (the last axis)."""
    import numpy as np

    scale = np.abs(kernel).max(axis=tuple(range(kernel.ndim - 1)), keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1)
    return (np.round(kernel / scale) * scale).astype(kernel.dtype)
