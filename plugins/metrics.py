"""The built-in quality metrics, registered through ``kfopt_register_metrics`` like any plugin's.

Each takes ``(y_true, y_score)`` as :mod:`kfopt.task` describes them: class
ids, a 0/1 matrix or float targets, against probabilities (classifiers) or
predictions (regression). A plugin adds its own the same way::

    from kfopt.plugins import Metric, hookimpl

    @hookimpl
    def kfopt_register_metrics(register):
        register(Metric("max_error", max_error, tasks={"regression"}, higher_is_better=False))
"""

from __future__ import annotations

import numpy as np

from kfopt.task import THRESHOLD, Metric

from .spec import hookimpl

#: k of ``top_k_accuracy``.
TOP_K = 5


def _labels_from(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Predicted labels in the form of ``y_true``: class ids (argmax, or a threshold on one unit) or a 0/1 matrix."""
    y_score = np.asarray(y_score).reshape(len(y_score), -1)
    if np.asarray(y_true).ndim == 2:  # multilabel: one yes/no per column
        return (y_score > THRESHOLD).astype(np.int64)
    if y_score.shape[1] == 1:  # binary: the probability of class 1
        return (y_score[:, 0] > THRESHOLD).astype(np.int64)
    return y_score.argmax(axis=1)


def accuracy(y_true, y_score) -> float:
    """Fraction of samples whose predicted class is right (every label right, for multilabel)."""
    hits = _labels_from(y_true, y_score) == np.asarray(y_true)
    return float((hits.all(axis=1) if hits.ndim == 2 else hits).mean())


def binary_accuracy(y_true, y_score) -> float:
    """Fraction of yes/no answers that are right: one per sample (binary), one per label (multilabel)."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score).reshape(y_true.shape)
    return float(((y_score > THRESHOLD).astype(np.int64) == y_true).mean())


def top_k_accuracy(y_true, y_score, k: int = TOP_K) -> float:
    """Fraction of samples whose class is among the ``k`` highest scores."""
    y_score = np.asarray(y_score)
    k = min(k, y_score.shape[1])
    top = np.argpartition(-y_score, k - 1, axis=1)[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def macro_f1(y_true, y_score) -> float:
    """F1 averaged over classes (or labels) with equal weight, so rare classes count as much as common ones."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y_true), _labels_from(y_true, y_score), average="macro", zero_division=0))


def auc(y_true, y_score) -> float:
    """Area under the ROC curve of the positive probability (macro over labels for multilabel); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score).reshape(len(y_score), -1)
    if y_true.ndim == 1:
        y_score = y_score[:, 0]
    try:
        return float(roc_auc_score(y_true, y_score, average="macro"))
    except ValueError:  # only one class present: AUC is undefined, and None is reported, never a number
        return float("nan")


def _errors(y_true, y_score) -> np.ndarray:
    y_true = np.asarray(y_true, np.float64)
    return np.asarray(y_score, np.float64).reshape(y_true.shape) - y_true


def mae(y_true, y_score) -> float:
    """Mean absolute error, in the target's units."""
    return float(np.abs(_errors(y_true, y_score)).mean())


def rmse(y_true, y_score) -> float:
    """Root mean squared error, in the target's units (large errors weigh more than in mae)."""
    return float(np.sqrt(np.square(_errors(y_true, y_score)).mean()))


BUILT_IN = (
    Metric(
        "accuracy",
        accuracy,
        at_most=1.0,
        counted="samples",
        tasks={"multiclass", "binary", "multilabel"},
        description="fraction of samples predicted right (all labels right, for multilabel)",
    ),
    Metric(
        "binary_accuracy",
        binary_accuracy,
        at_most=1.0,
        counted="labels",
        tasks={"binary", "multilabel"},
        description="fraction of yes/no answers right (per label, for multilabel)",
    ),
    Metric(
        "top_k_accuracy",
        top_k_accuracy,
        at_most=1.0,
        counted="samples",
        tasks={"multiclass"},
        description=f"fraction of samples whose class is in the top {TOP_K} scores",
    ),
    Metric(
        "macro_f1",
        macro_f1,
        at_most=1.0,
        tasks={"multiclass", "binary", "multilabel"},
        description="F1 averaged over classes (labels) with equal weight",
    ),
    Metric("auc", auc, tasks={"binary", "multilabel"}, at_most=1.0, description="area under the ROC curve"),
    Metric("mae", mae, tasks={"regression"}, higher_is_better=False, description="mean absolute error"),
    Metric("rmse", rmse, tasks={"regression"}, higher_is_better=False, description="root mean squared error"),
)


@hookimpl
def kfopt_register_metrics(register):
    for metric in BUILT_IN:
        register(metric)
