"""The user's task, read from the model's output and the labels, and the metrics that score it.

Four tasks (:data:`TASKS`):

- ``multiclass``: one class per sample; the model ends in a softmax over N > 1
  units, or in N linear units (logits); labels are class ids in ``[0, N)``.
- ``binary``: one unit, sigmoid (or linear: a logit); labels are 0 and 1.
- ``multilabel``: N > 1 sigmoid (or linear) units, one yes/no per label;
  labels are an ``(n, N)`` matrix of 0 and 1.
- ``regression``: a linear (or any other non-probability) output and float
  targets, one column per output unit.

What the model and the data say must agree: labels out of range for the
outputs, float targets for a classifier, class ids for a multi-label model,
or a metric that does not fit the task are a :class:`~kfopt.errors.KfoptError`
naming the fix, raised before anything is measured.

A :class:`Metric` is a plugin (hook ``kfopt_register_metrics``): a name,
whether higher is better, the tasks it fits, and ``compute(y_true, y_score)``.
``y_score`` is what :meth:`Task.scores` makes of the model's raw output:
probabilities for a classifier (a softmax or sigmoid is applied to logits
first), the predictions themselves for regression. ``y_true`` is what
:meth:`Task.targets` makes of the labels: class ids for multiclass and binary,
an integer 0/1 matrix for multilabel, float targets (``(n,)`` for one output,
``(n, outputs)`` for several) for regression.

Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import KfoptError, did_you_mean

TaskKind = Literal["multiclass", "binary", "multilabel", "regression"]
TASKS: tuple[str, ...] = ("multiclass", "binary", "multilabel", "regression")
CLASSIFICATION = frozenset({"multiclass", "binary", "multilabel"})

#: The metric budgeted when the user names none. Regression defaults to MAE rather than RMSE:
#: it is in the target's own units, a relative budget ("1%") of it reads plainly, and one
#: outlier sample cannot make or break a candidate the way it can under a squared error.
DEFAULT_METRICS: dict[str, str] = {
    "multiclass": "accuracy",
    "binary": "binary_accuracy",
    "multilabel": "binary_accuracy",
    "regression": "mae",
}

#: Probability threshold of a positive answer (binary, multilabel).
THRESHOLD = 0.5

#: Built-in Keras losses kfopt fine-tunes with when the model was compiled with one, by the tasks they fit.
#: Categorical cross-entropy becomes its sparse twin: kfopt feeds class ids, never one-hot rows.
LOSSES: dict[str, frozenset[str]] = {
    "sparse_categorical_crossentropy": frozenset({"multiclass"}),
    "categorical_crossentropy": frozenset({"multiclass"}),
    "binary_crossentropy": frozenset({"binary", "multilabel"}),
    "binary_focal_crossentropy": frozenset({"binary", "multilabel"}),
    "mean_squared_error": frozenset({"regression"}),
    "mean_absolute_error": frozenset({"regression"}),
    "mean_absolute_percentage_error": frozenset({"regression"}),
    "mean_squared_logarithmic_error": frozenset({"regression"}),
    "huber": frozenset({"regression"}),
    "log_cosh": frozenset({"regression"}),
}
_LOSS_ALIASES = {
    "mse": "mean_squared_error",
    "mae": "mean_absolute_error",
    "mape": "mean_absolute_percentage_error",
    "msle": "mean_squared_logarithmic_error",
    "huber_loss": "huber",
    "logcosh": "log_cosh",
    "bce": "binary_crossentropy",
}


# -- metrics ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """A quality metric: what ``--metric NAME`` budgets.

    ``compute(y_true, y_score) -> float`` (see the module docstring for what
    the two arrays hold per task). ``higher_is_better`` decides what a drop
    is: the baseline minus the candidate for accuracy-like metrics, the
    candidate minus the baseline for errors (mae, rmse), so a positive drop
    always means the candidate is worse. ``tasks`` are the tasks it fits.
    """

    name: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    tasks: frozenset[str]
    higher_is_better: bool = True
    description: str = ""
    #: What the metric counts when it is the fraction of them that are right: "samples" (accuracy: a split of
    #: n samples cannot show a change finer than 1/n) or "labels" (binary accuracy: one per label of each
    #: sample); None for other metrics (see ``val_resolution``).
    counted: str | None = None
    #: The largest value the metric takes (1.0 for a fraction: accuracy, F1, AUC), None when unbounded (errors).
    #: An absolute budget of at least this much lets every candidate through, so it is refused.
    at_most: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", frozenset(self.tasks))
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.name or not callable(self.compute) or unknown or not self.tasks:
            raise TypeError(
                f"metric {self.name!r}: needs a name, a callable compute and tasks among {', '.join(TASKS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )

    def drop(self, baseline: float | None, candidate: float | None) -> float | None:
        """How much worse ``candidate`` is than ``baseline`` (positive: worse), or None when either is missing."""
        if baseline is None or candidate is None:
            return None
        return baseline - candidate if self.higher_is_better else candidate - baseline

    def score(self, y_true: np.ndarray, y_score: np.ndarray) -> float | None:
        """``compute`` as a plain float; None when it is not finite (e.g. AUC on a split with one class)."""
        if not len(y_true):
            return None
        value = float(self.compute(y_true, y_score))
        return value if np.isfinite(value) else None


# -- the task ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What the model predicts and how it is scored (see the module docstring).

    ``outputs`` is the width of the model's output; ``from_logits`` says a
    classifier's output is logits (no softmax/sigmoid at the end); ``metric``
    is the budgeted metric's name; ``loss`` the built-in Keras loss the model
    was compiled with (canonical name, e.g. ``binary_crossentropy``) when it
    fits the task, which fine-tuning then uses; ``activation`` the output's
    activation as read from the model.
    """

    kind: TaskKind
    outputs: int
    from_logits: bool = False
    metric: str = ""
    loss: str | None = None
    activation: str = "linear"

    @property
    def classification(self) -> bool:
        return self.kind in CLASSIFICATION

    @property
    def num_classes(self) -> int | None:
        """Classes (multiclass: the outputs, binary: 2), labels (multilabel), or None (regression)."""
        return {"binary": 2, "regression": None}.get(self.kind, self.outputs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Task:
        return cls(**{k: v for k, v in value.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        """One phrase for messages and tables, e.g. ``binary (1 sigmoid unit), metric binary_accuracy``."""
        unit = "unit" if self.outputs == 1 else "units"
        return f"{self.kind} ({self.outputs} {self.activation} {unit}), metric {self.metric}"

    # -- arrays ------------------------------------------------------------------------------
    def scores(self, raw: np.ndarray) -> np.ndarray:
        """The model's raw outputs as metrics take them: probabilities for a classifier, as they are for regression."""
        raw = np.asarray(raw, np.float64).reshape(len(raw), -1)
        if not self.classification or not self.from_logits:
            return raw
        if self.kind == "multiclass":
            shifted = raw - raw.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            return exp / exp.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-raw))

    def predict(self, scores: np.ndarray) -> np.ndarray | None:
        """Predicted labels from :meth:`scores`: class ids, or a 0/1 matrix (multilabel); None for regression."""
        if self.kind == "multiclass":
            return scores.argmax(axis=1)
        if self.kind == "binary":
            return (scores[:, 0] > THRESHOLD).astype(np.int64)
        if self.kind == "multilabel":
            return (scores > THRESHOLD).astype(np.int64)
        return None

    def targets(self, y: np.ndarray) -> np.ndarray:
        """The labels as metrics take them (class ids, a 0/1 matrix, or float targets)."""
        y = np.asarray(y)
        if self.kind == "regression":
            y = y.astype(np.float64)
            return y.reshape(len(y)) if self.outputs == 1 else y.reshape(len(y), -1)
        if self.kind == "multilabel":
            return y.reshape(len(y), -1).astype(np.int64)
        return y.reshape(len(y)).astype(np.int64)


# -- reading the model -------------------------------------------------------------------
def output_activation(model) -> str:
    """The activation of the model's (first) output: ``softmax``, ``sigmoid``, ``linear`` or another name.

    Looks through tfmot wrappers, nested models and a separate ``Softmax`` /
    ``Activation`` layer at the end.
    """
    layer = _output_layer(model)
    while True:
        while hasattr(layer, "layer"):  # tfmot prune/quantize wrappers hide the wrapped layer
            layer = layer.layer
        if hasattr(layer, "layers") and layer.layers:  # a nested model: its own output decides
            layer = _output_layer(layer)
            continue
        break
    if type(layer).__name__ == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None) or str(activation)
    # tf_keras names some activations after their module functions (e.g. 'sigmoid_v2' never; keep it plain).
    return name.lower()


def _output_layer(model):
    outputs = getattr(model, "outputs", None)
    if outputs:
        history = getattr(outputs[0], "_keras_history", None)
        if history is not None:
            return history[0]
    return model.layers[-1]


def output_units(model) -> int:
    """The width of the model's (first) output; a KfoptError when it is not one vector per sample."""
    shape = model.output_shape
    if isinstance(shape, list):
        shape = shape[0]
    shape = tuple(shape)
    if len(shape) == 1:  # one number per sample, without a feature axis
        return 1
    if len(shape) != 2 or shape[-1] is None:
        raise KfoptError(
            f"The model's output has shape {shape}; kfopt scores one vector of predictions per sample, (batch, N).",
            "end the model in a Dense layer (or Flatten/pool before it) so it outputs (batch, N).",
        )
    return int(shape[-1])


def compiled_loss(model=None, path: str | Path | None = None) -> str | None:
    """The built-in Keras loss ``model`` was compiled with (canonical name), from the model or its file.

    kfopt loads models without compiling them, so the file's compile
    configuration is read when the model object has none. Custom losses,
    losses of several outputs and anything unreadable give None (fine-tuning
    then uses the task's loss).
    """
    loss = getattr(model, "loss", None) if model is not None else None
    if loss is None and path is not None:
        loss = _file_loss(Path(path))
    return canonical_loss(loss)


def compiled_loss_info(spec: str | Path) -> dict[str, str]:
    """``{"loss": name}`` for a model file compiled with a built-in loss (for ``ModelHandle.info``), else ``{}``."""
    path = Path(str(spec))
    loss = compiled_loss(path=path) if path.exists() else None
    return {"loss": loss} if loss else {}


def canonical_loss(loss: Any) -> str | None:
    """A loss (string, function, Keras loss object or serialized config) as a name in :data:`LOSSES`, or None."""
    if loss is None or isinstance(loss, (list, tuple)):
        return None
    if isinstance(loss, dict):
        if "class_name" not in loss:  # a dict of losses per output
            return None
        name = loss.get("class_name")
        if isinstance(loss.get("config"), dict) and isinstance(loss["config"].get("fn"), str):
            name = loss["config"]["fn"]  # Keras 3's LossFunctionWrapper
    elif isinstance(loss, str):
        name = loss
    else:
        name = getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__
        fn = getattr(loss, "fn", None)  # a Keras LossFunctionWrapper keeps the function
        if getattr(fn, "__name__", None):
            name = fn.__name__
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", str(name)).lower()  # BinaryCrossentropy -> binary_crossentropy
    name = _LOSS_ALIASES.get(name, name)
    return name if name in LOSSES else None


def _file_loss(path: Path) -> Any:
    try:
        if path.is_file() and path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
            return (config.get("compile_config") or {}).get("loss")
        if path.is_file() and path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                training = f.attrs.get("training_config")
            if training is None:
                return None
            training = json.loads(training.decode() if isinstance(training, bytes) else training)
            return training.get("loss")
    except Exception:  # an unreadable compile configuration only means: no compiled loss to reuse
        return None
    return None


# -- reading the labels ------------------------------------------------------------------
@dataclass(frozen=True)
class _Labels:
    """What the labels look like: ``ids`` (integers), ``matrix`` (0/1, several columns) or ``floats``."""

    form: Literal["ids", "matrix", "floats"]
    columns: int
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, y: np.ndarray) -> _Labels:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        columns = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
        if not y.size:
            return cls("ids", columns, 0, 0, 0)
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise KfoptError(
                "The labels contain NaN or infinite values.", "remove or fix those samples before optimizing."
            )
        low, high = float(y.min()), float(y.max())
        whole = y.dtype.kind in "biu" or bool((y == np.round(y)).all())
        if y.ndim == 1:
            return cls("ids" if whole else "floats", 1, low, high, len(y))
        binary = whole and low >= 0 and high <= 1
        return cls("matrix" if binary else "floats", columns, low, high, len(y))

    def describe(self) -> str:
        span = f"{self.low:g}..{self.high:g}"
        if self.form == "ids":
            return f"integer labels {span}"
        if self.form == "matrix":
            return f"a 0/1 label matrix with {self.columns} columns"
        return f"float targets {span}" + (f" in {self.columns} columns" if self.columns > 1 else "")


def infer_task(
    model,
    labels: np.ndarray | Iterable[np.ndarray],
    *,
    metric: str | None = None,
    metrics: dict[str, Metric] | None = None,
    loss: str | None = None,
) -> Task:
    """The task of ``model`` on ``labels`` (one array, or several splits' arrays), with the budgeted metric.

    ``metric`` is the user's choice (default: :data:`DEFAULT_METRICS` by
    task), checked against ``metrics`` (name -> Metric, the registry's). ``loss``
    is the model's compiled loss (:func:`compiled_loss`); it settles the one
    ambiguous case (one linear unit and 0/1 labels: a logit, unless the model
    was compiled with a regression loss) and is kept when it fits the task.
    Raises a KfoptError when the model and the labels disagree.
    """
    arrays = [labels] if isinstance(labels, np.ndarray) else [np.asarray(y) for y in labels]
    arrays = [y for y in arrays if y is not None and len(y)]
    if not arrays:
        raise KfoptError("The data has no labels to score the model with.", "give labelled test data.")
    if any(y.ndim != arrays[0].ndim for y in arrays):
        raise KfoptError(
            "The splits' labels have different shapes: " + ", ".join(str(y.shape[1:]) for y in arrays) + ".",
            "give every split its labels in the same form (all class ids, or all 0/1 matrices).",
        )
    seen = _Labels.of(np.concatenate(arrays))
    units = output_units(model)
    activation = output_activation(model)
    loss = canonical_loss(loss)
    task = _decide(units, activation, seen, loss)
    if loss is not None and task.kind not in LOSSES[loss]:
        loss = None  # compiled for something else (or for one-hot labels kfopt no longer feeds): use the task's loss
    return replace(task, loss=loss, metric=choose_metric(task.kind, metric, metrics))


def _decide(units: int, activation: str, labels: _Labels, loss: str | None) -> Task:
    said = f"The model outputs {units} {activation} unit{'s' if units != 1 else ''}"
    regression_loss = loss is not None and LOSSES[loss] == {"regression"}
    if activation == "softmax":
        if units == 1:
            raise KfoptError(
                f"{said}: a softmax over one unit is always 1, so it predicts nothing.",
                "end a binary classifier in Dense(1, activation='sigmoid'), or use 2 softmax units.",
            )
        _need_class_ids(labels, units, said, "multiclass")
        return Task("multiclass", units, from_logits=False, activation=activation)
    if activation == "sigmoid":
        if units == 1:
            _need_class_ids(labels, 2, said, "binary")
            return Task("binary", 1, from_logits=False, activation=activation)
        _need_matrix(labels, units, said)
        return Task("multilabel", units, from_logits=False, activation=activation)
    # linear (or another non-probability activation): logits of a classifier, or a regression
    scores = activation == "linear"
    if labels.form == "floats" or regression_loss or not scores:
        if labels.columns != units:
            raise KfoptError(
                f"{said}, but the data has {labels.describe()}: "
                f"{'one target' if labels.columns == 1 else f'{labels.columns} targets'} per sample.",
                f"give {units} target column{'s' if units != 1 else ''} per sample, or the model made for this data.",
            )
        return Task("regression", units, from_logits=False, activation=activation)
    if units == 1:
        if labels.form == "ids" and labels.low >= 0 and labels.high <= 1:
            return Task("binary", 1, from_logits=True, activation=activation)
        return Task("regression", 1, from_logits=False, activation=activation)  # integer targets (counts, ...)
    if labels.form == "matrix":
        _need_matrix(labels, units, said)
        return Task("multilabel", units, from_logits=True, activation=activation)
    _need_class_ids(labels, units, said, "multiclass")
    return Task("multiclass", units, from_logits=True, activation=activation)


def _need_class_ids(labels: _Labels, classes: int, said: str, kind: str) -> None:
    if labels.form == "floats":
        raise KfoptError(
            f"{said} (a {kind} classifier), but the data has {labels.describe()}, not class ids.",
            "give integer class labels (0, 1, ...), or a regression model with a linear output for float targets.",
        )
    if labels.form == "matrix":
        raise KfoptError(
            f"{said} (one class per sample), but the data has {labels.describe()} with several 1s in a row "
            "(multi-label).",
            f"end the model in {labels.columns} sigmoid units for multi-label data, or give one class id per sample.",
        )
    if labels.low < 0 or labels.high >= classes:
        valid = "0 or 1" if classes == 2 else f"0..{classes - 1}"
        raise KfoptError(
            f"{said} ({classes} classes), but the data has labels {labels.low:g}..{labels.high:g}, "
            f"outside the valid range {valid}.",
            "give labels that match the model's outputs, or the model made for this data.",
        )


def _need_matrix(labels: _Labels, units: int, said: str) -> None:
    if labels.form != "matrix":
        raise KfoptError(
            f"{said} (multi-label: one yes/no per unit), but the data has {labels.describe()}"
            + (" (a one-hot row is read as a class id)" if labels.form == "ids" else "")
            + ".",
            f"give a 0/1 label matrix of shape (n, {units}), or end the model in softmax for one class per sample.",
        )
    if labels.columns != units:
        raise KfoptError(
            f"{said}, but the label matrix has {labels.columns} columns.",
            f"give {units} label columns, or the model made for this data.",
        )


def choose_metric(kind: str, metric: str | None, metrics: dict[str, Metric] | None) -> str:
    """The budgeted metric for a ``kind`` task: ``metric`` if it fits, else a KfoptError; the default when None."""
    if metric is None:
        return DEFAULT_METRICS[kind]
    found = find_metric(metric, metrics)
    if kind not in found.tasks:
        fitting = sorted(name for name, m in (metrics or {}).items() if kind in m.tasks)
        raise KfoptError(
            f"Metric '{metric}' does not fit a {kind} model (it scores {', '.join(sorted(found.tasks))}).",
            f"pass --metric {' or '.join(fitting) or DEFAULT_METRICS[kind]} for {kind}, "
            f"or leave --metric out ({DEFAULT_METRICS[kind]}).",
        )
    return metric


def find_metric(name: str, metrics: dict[str, Metric] | None) -> Metric:
    """The metric called ``name``; a KfoptError listing the valid names otherwise."""
    metrics = metrics or {}
    if name not in metrics:
        raise KfoptError(
            f"Unknown metric '{name}'.{did_you_mean(name, metrics)} Valid metrics: {', '.join(sorted(metrics))}.",
            "pass one of those to --metric, or install the plugin that provides it.",
        )
    return metrics[name]


def exact_accuracy(task: Task, y_true: np.ndarray, predictions: np.ndarray | None) -> float | None:
    """The fraction of samples predicted exactly right (every label, for multilabel); None for regression."""
    if predictions is None or not len(y_true):
        return None
    hits = predictions == y_true
    return float((hits.all(axis=1) if hits.ndim == 2 else hits).mean())
