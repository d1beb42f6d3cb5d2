"""One evaluator for every format: accuracy, agreement, size, sparsity and latency.

Every candidate is measured the same way, in the format it will be deployed
in, on the held-out test split. Ratios are like for like: a TFLite candidate
is compared with the baseline converted to fp32 TFLite and run in the same
interpreter, a SavedModel with the baseline exported as a plain SavedModel.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _tf
from .data import Data
from .plugins.technique import ModelHandle
from .sparsity import weight_sparsity

#: Batch-1 invocations timed for latency (after WARMUP untimed ones).
LATENCY_RUNS = 200
WARMUP = 20
THROUGHPUT_BATCH = 32
THROUGHPUT_RUNS = 20


# -- running a model of any format --------------------------------------------
class Runner:
    """Runs one model on numpy batches and returns class scores as float32."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prepared(self, x: np.ndarray):
        """A zero-argument callable running the model once on ``x`` (input already fed), for timing."""
        return lambda: self(x)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension (for example inputs)."""
        raise NotImplementedError


class KerasRunner(Runner):
    def __init__(self, model):
        tf = _tf.tf()
        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self._model = model

    def __call__(self, x):
        return np.asarray(self._fn(np.asarray(x, np.float32)), np.float32)

    def prepared(self, x):
        tensor = _tf.tf().constant(np.asarray(x, np.float32))
        return lambda: self._fn(tensor)

    def input_shape(self):
        return tuple(self._model.input_shape[1:])


class TFLiteRunner(Runner):
    def __init__(self, content: bytes, threads: int = 1):
        tf = _tf.tf()
        with warnings.catch_warnings():  # tf.lite.Interpreter's notice about LiteRT
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=threads)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = None

    def _feed(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if len(x) != self._batch:
            shape = [len(x), *self._input["shape_signature"][1:]]
            self.interpreter.resize_tensor_input(self._input["index"], shape)
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._batch = len(x)
        dtype = self._input["dtype"]
        if dtype in (np.int8, np.uint8):  # full-integer model: quantize the input as a device would
            scale, zero = self._input["quantization"]
            limits = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), limits.min, limits.max).astype(dtype)
        self.interpreter.set_tensor(self._input["index"], x)

    def __call__(self, x):
        self._feed(x)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._output["index"])
        if out.dtype in (np.int8, np.uint8):
            scale, zero = self._output["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out.astype(np.float32)

    def prepared(self, x):
        # Time the interpreter alone: an integer device is fed int8 directly.
        self._feed(x)
        return self.interpreter.invoke

    def input_shape(self):
        return tuple(int(d) for d in self._input["shape"][1:])


class SavedModelRunner(Runner):
    def __init__(self, path: Path):
        tf = _tf.tf()
        self._loaded = tf.saved_model.load(str(path))
        self._fn = self._loaded.signatures["serving_default"]
        self._arg = next(iter(self._fn.structured_input_signature[1]))

    def __call__(self, x):
        outputs = self._fn(**{self._arg: np.asarray(x, np.float32)})
        return np.asarray(next(iter(outputs.values())), np.float32)

    def prepared(self, x):
        kwargs = {self._arg: _tf.tf().constant(np.asarray(x, np.float32))}
        return lambda: self._fn(**kwargs)

    def input_shape(self):
        return tuple(self._fn.structured_input_signature[1][self._arg].shape[1:])


def runner_for(handle: ModelHandle) -> Runner:
    """A runner for ``handle`` in its own format (TFLite with the threads it asks for)."""
    if handle.format == "keras":
        return KerasRunner(handle.keras())
    if handle.format == "tflite":
        return TFLiteRunner(handle.tflite(), threads=int(handle.info.get("threads", 1)))
    return SavedModelRunner(handle.saved_model_path())


# -- measurements ---------------------------------------------------------------
def artifact_sizes(path: Path) -> tuple[int, int]:
    """(size_bytes, gzip_bytes) of a model file, or of a folder packed as a deterministic tar."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        return len(data), len(gzip.compress(data, compresslevel=9, mtime=0))
    buffer = io.BytesIO()
    size = 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            size += file.stat().st_size
            info = tar.gettarinfo(str(file), arcname=str(file.relative_to(path)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(file, "rb") as f:
                tar.addfile(info, f)
    return size, len(gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0))


def tflite_sparsity(content: bytes) -> float | None:
    """Fraction of zeros in a TFLite model's constant weight tensors (ndim >= 2)."""
    interpreter = TFLiteRunner(content).interpreter
    io_indices = {d["index"] for d in interpreter.get_input_details() + interpreter.get_output_details()}
    zeros = total = 0
    for detail in interpreter.get_tensor_details():
        if detail["index"] in io_indices or len(detail["shape"]) < 2:
            continue
        try:
            value = interpreter.get_tensor(detail["index"])
        except ValueError:  # intermediate tensors hold no data
            continue
        name = detail["name"].lower()
        if value.size == 0 or not any(k in name for k in ("matmul", "conv", "kernel", "weights", "dense")):
            continue
        zero_point = detail["quantization"][1] if value.dtype in (np.int8, np.uint8) else 0
        zeros += int((value == zero_point).sum())
        total += value.size
    return zeros / total if total else None


def latency(runner: Runner, sample: np.ndarray, runs: int = LATENCY_RUNS, warmup: int = WARMUP) -> tuple[float, float]:
    """(p50, p95) milliseconds of batch-1 invocations after warm-up."""
    run = runner.prepared(sample)
    for _ in range(warmup):
        run()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run()
        times[i] = time.perf_counter() - start
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def throughput(runner: Runner, batch: np.ndarray, runs: int = THROUGHPUT_RUNS) -> float:
    """Inputs per second at batch size ``len(batch)``."""
    run = runner.prepared(batch)
    run()
    start = time.perf_counter()
    for _ in range(runs):
        run()
    return float(len(batch) * runs / (time.perf_counter() - start))


class _Scored(NamedTuple):
    """One model on one split: predicted labels (classifiers), the budgeted metric, exact accuracy."""

    predictions: np.ndarray | None
    metric: float | None
    accuracy: float | None


class Evaluator:
    """Measures the baseline and candidates on the same test split, side by side.

    ``workdir`` holds the baseline converted to each candidate format, so the
    ratios compare like with like. The task (:mod:`kfopt.task`) is read once
    from the baseline's output and the labels; it decides how outputs are
    scored and which metric is budgeted (``metric``: a name registered through
    ``kfopt_register_metrics``; None: the task's default). ``metrics`` is the
    registry's name -> Metric mapping (default: the installed plugins').
    """

    def __init__(
        self,
        data: Data,
        baseline: ModelHandle,
        workdir: str | os.PathLike,
        latency_runs: int = LATENCY_RUNS,
        *,
        metric: str | None = None,
        metrics: dict | None = None,
    ):
        from .data import is_one_hot, labels
        from .task import compiled_loss, infer_task

        self.data = data
        self.baseline = baseline
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.latency_runs = latency_runs
        self.x_test, y_test = data.test.arrays()
        # Validation accuracy is reported beside the test one so searches can choose on it
        # (kfopt.recipe_search) and keep the test split for the final budget check only.
        try:
            self.x_val, y_val = data.validation.arrays()
        except ValueError:  # an empty tf.data validation split: no val_accuracy
            self.x_val, y_val = np.zeros((0,)), np.zeros((0,))
        if metrics is None:
            from .plugins.manager import registry

            metrics = registry().metrics
        model = baseline.keras()
        # tf.data splits give labels as the dataset holds them: read them the way kfopt.data reads arrays.
        one_hot = is_one_hot(y_test, y_val, data.train.y)
        given = [labels(y, one_hot) for y in (y_test, y_val, data.train.y) if y is not None and len(y)]
        loss = baseline.info.get("loss") or compiled_loss(model, baseline.path)
        self.task = infer_task(model, given, metric=metric, metrics=metrics, loss=loss)
        self.metric = metrics[self.task.metric]
        self.y_test = self.task.targets(labels(y_test, one_hot))
        self.y_val = self.task.targets(labels(y_val, one_hot)) if len(y_val) else np.zeros((0,))
        self._baseline_scored: tuple[_Scored, _Scored | None] | None = None
        self._references: dict[str, dict] = {}

    # The baseline, as deployed in each format, is what ratios are taken against.
    def reference(self, format: str) -> dict:
        """Size and latency of the baseline in ``format`` (computed once)."""
        if format not in self._references:
            handle = self._baseline_as(format)
            path = handle.path or handle.save(self.workdir / format)
            size, gz = artifact_sizes(path)
            p50, p95 = latency(runner_for(handle), self.x_test[:1], self.latency_runs)
            self._references[format] = {
                "format": format,
                "size_bytes": size,
                "gzip_bytes": gz,
                "latency_p50_ms": p50,
                "latency_p95_ms": p95,
            }
        return self._references[format]

    def _baseline_as(self, format: str) -> ModelHandle:
        model = self.baseline.keras()
        if format == "keras":
            return self.baseline
        if format == "tflite":
            from .convert import to_tflite

            return ModelHandle.from_tflite(to_tflite(model, "fp32"))
        from .convert import to_saved_model

        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            handle = ModelHandle.from_saved_model(to_saved_model(model, Path(tmp) / "export"))
            handle.save(self.workdir / format)
        return handle

    @property
    def references(self) -> dict[str, dict]:
        """The baseline's size and latency in every format measured so far."""
        return dict(self._references)

    def baseline_metrics(self) -> dict:
        """The baseline's metrics in its Keras form (plus its like-for-like references)."""
        metrics = self.evaluate(self.baseline)
        metrics.pop("per_class_accuracy_change", None)
        return metrics

    # -- scoring: the task turns raw outputs into scores, labels and the metric ----------
    def _outputs(self, runner: Runner, x: np.ndarray) -> np.ndarray:
        batches = [runner(x[i : i + 256]) for i in range(0, len(x), 256)]
        return np.concatenate(batches)

    def _score(self, runner: Runner, x: np.ndarray, y: np.ndarray) -> _Scored | None:
        if not len(x):
            return None
        from .task import exact_accuracy

        scores = self.task.scores(self._outputs(runner, x))
        predictions = self.task.predict(scores)
        return _Scored(predictions, self.metric.score(y, scores), exact_accuracy(self.task, y, predictions))

    def _baseline(self) -> tuple[_Scored, _Scored | None]:
        if self._baseline_scored is None:
            runner = runner_for(self.baseline)
            self._baseline_scored = (
                self._score(runner, self.x_test, self.y_test),
                self._score(runner, self.x_val, self.y_val),
            )
        return self._baseline_scored

    def evaluate(self, handle: ModelHandle) -> dict:
        """All metrics of ``handle`` (saved first if it only lives in memory).

        ``metric``/``metric_drop`` (and ``val_``) are the task's budgeted metric
        (named in ``metric_name``) for every task; a drop is positive when the
        candidate is worse, whichever way the metric points. ``accuracy``,
        ``agreement`` and the per-class change are there for classifiers only.
        """
        if handle.path is None:
            handle.save(self.workdir / f"candidate-{handle.format}-{id(handle)}")
        base, base_val = self._baseline()
        runner = runner_for(handle)
        test = self._score(runner, self.x_test, self.y_test)
        val = self._score(runner, self.x_val, self.y_val)
        size, gz = artifact_sizes(handle.path)
        p50, p95 = latency(runner, self.x_test[:1], self.latency_runs)
        reference = self.reference(handle.format)
        classifier = self.task.classification
        metric_drop = self.metric.drop(base.metric, test.metric)
        val_metric_drop = self.metric.drop(base_val.metric, val.metric) if val and base_val else None
        return {
            "format": handle.format,
            "task": self.task.kind,
            "metric_name": self.metric.name,
            "metric": test.metric,
            "metric_drop": metric_drop,
            "metric_drop_relative": _relative(metric_drop, base.metric),
            "val_metric": val.metric if val else None,
            "val_metric_drop": val_metric_drop,
            "val_metric_drop_relative": _relative(val_metric_drop, base_val.metric if base_val else None),
            "accuracy": test.accuracy,
            "accuracy_drop": base.accuracy - test.accuracy if classifier else None,
            "agreement": _agreement(test.predictions, base.predictions) if classifier else None,
            "val_accuracy": val.accuracy if val else None,
            "val_accuracy_drop": base_val.accuracy - val.accuracy if classifier and val and base_val else None,
            "size_bytes": size,
            "gzip_bytes": gz,
            "compression_ratio": reference["gzip_bytes"] / gz,
            "sparsity": self._sparsity(handle),
            "params": self._params(handle),
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "throughput_per_s": throughput(runner, self._batch()),
            "speedup": reference["latency_p50_ms"] / p50,
            "per_class_accuracy_change": (
                self._per_class_change(test.predictions, base.predictions) if classifier else None
            ),
            "compared_with": reference,
        }

    def _batch(self) -> np.ndarray:
        x = self.x_test[:THROUGHPUT_BATCH]
        reps = -(-THROUGHPUT_BATCH // len(x))
        return np.concatenate([x] * reps)[:THROUGHPUT_BATCH]

    def _per_class_change(self, pred, base_pred) -> dict[str, float]:
        """Accuracy change per class (per label, for multilabel: how often that label's yes/no is right)."""
        change = {}
        if self.y_test.ndim == 2:
            for column in range(self.y_test.shape[1]):
                truth = self.y_test[:, column]
                change[str(column)] = float((pred[:, column] == truth).mean() - (base_pred[:, column] == truth).mean())
            return change
        for label in np.unique(self.y_test):
            mask = self.y_test == label
            change[str(int(label))] = float((pred[mask] == label).mean() - (base_pred[mask] == label).mean())
        return change

    @staticmethod
    def _sparsity(handle: ModelHandle) -> float | None:
        if handle.format == "keras":
            return weight_sparsity(handle.keras())
        if handle.format == "tflite":
            return tflite_sparsity(handle.tflite())
        return handle.info.get("sparsity")

    @staticmethod
    def _params(handle: ModelHandle) -> int | None:
        if handle.format == "keras":
            return int(handle.keras().count_params())
        return handle.info.get("params")


def _agreement(pred: np.ndarray, base_pred: np.ndarray) -> float:
    """Fraction of samples predicted exactly as the baseline predicts them (every label, for multilabel)."""
    same = pred == base_pred
    return float((same.all(axis=1) if same.ndim == 2 else same).mean())


def _relative(drop: float | None, baseline: float | None) -> float | None:
    """``drop`` as a fraction of the baseline's metric (what a ``%`` budget bounds); None when undefined."""
    if drop is None or baseline is None:
        return None
    if baseline == 0:
        return 0.0 if drop <= 0 else None
    return drop / abs(baseline)
