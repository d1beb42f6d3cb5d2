"""One evaluator for every format: accuracy, agreement, size, sparsity and latency.

Every candidate is measured the same way, in the format it will be deployed
in, on the held-out test split. Ratios are like for like: a TFLite candidate
is compared with the baseline converted to fp32 TFLite and run in the same
interpreter, a SavedModel with the baseline exported as a plain SavedModel.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import tarfile
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _tf
from .data import Data
from .flops import model_flops
from .plugins.technique import ModelHandle
from .select import LATENCY_RESOLUTION  # the finest difference a speedup claims; defined where choices use it
from .serving_loader import from_output, tensor_names, to_input  # one conversion: what serves is what was measured
from .sparsity import weight_sparsity

#: Batch-1 invocations timed for latency (after WARMUP untimed ones): at least this many of each model.
LATENCY_RUNS = 200
WARMUP = 20
#: A candidate is timed against its baseline in alternating blocks (see :func:`compare_latency`) until the
#: speedup's interval is within LATENCY_PRECISION of it (relative half width), or LATENCY_SECONDS have passed.
LATENCY_SECONDS = 2.0
LATENCY_PRECISION = 0.03
#: Confidence of the speedup's interval; six block pairs are the fewest that give it distribution-free.
CONFIDENCE = 0.95
MIN_PAIRS = 6
#: A block is about this long (and at least MIN_BLOCK invocations): long enough that a block's median shrugs
#: off a preemption, short enough that a change in the machine's load hits both models of a pair alike.
BLOCK_SECONDS = 0.005
MIN_BLOCK = 3
MAX_PAIRS = 2000
#: Interpreters of each TFLite model timed in turn: a model of a microsecond or so runs up to 30% faster or
#: slower depending on where its interpreter's buffers landed, so one interpreter is one draw of that.
TFLITE_INSTANCES = 3
THROUGHPUT_BATCH = 32
THROUGHPUT_RUNS = 20


# -- running a model of any format --------------------------------------------
class Runner:
    """Runs one model on numpy batches; returns its outputs as float32.

    ``x`` is one array, or :class:`kfopt.data.Inputs` for a model with several
    inputs (matched by name when the names are the model's, else by position).
    Inputs keep their dtype: integer ids go in as the integers the model takes.
    ``outputs(x)`` gives every output, in ``output_names`` order; calling the
    runner gives the chosen one (``output``: a name or an index; default the first).
    """

    input_names: list[str]
    output_names: list[str]
    _output = 0

    def outputs(self, x) -> list[np.ndarray]:
        """Every output of the model on ``x``, as float32 arrays."""
        raise NotImplementedError

    def __call__(self, x) -> np.ndarray:
        return self.outputs(x)[self._output]

    def choose(self, output: str | int | None) -> Runner:
        """Make ``output`` (a name, an index, None: the first) what calling the runner returns; a KfoptError if unknown."""
        from .signature import output_position

        # One output is the one whatever it is called (kfopt's SavedModel exports call it "output").
        self._output = output_position(self.output_names, output) if len(self.output_names) > 1 else 0
        return self

    def prepared(self, x):
        """A zero-argument callable running the model once on ``x`` (input already fed), for timing."""
        return lambda: self.outputs(x)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the (first) input, without the batch dimension (for example inputs)."""
        raise NotImplementedError

    def _ordered(self, x) -> list[np.ndarray]:
        """The arrays of ``x`` in this model's input order."""
        from .data import Inputs, input_list

        arrays = input_list(x)
        if isinstance(x, Inputs) and set(x.names) == set(self.input_names):
            arrays = [arrays[x.names.index(name)] for name in self.input_names]
        if len(arrays) != len(self.input_names):
            raise ValueError(f"the model takes {len(self.input_names)} inputs, got {len(arrays)} arrays")
        return arrays


def predict(runner: Runner, x, batch: int = 256) -> np.ndarray:
    """What calling ``runner`` gives (its chosen output) for every row of ``x``, ``batch`` rows at a time."""
    return np.concatenate([runner(x[i : i + batch]) for i in range(0, len(x), batch)])


def _as_float(value) -> np.ndarray:
    return np.asarray(value, np.float32)


class KerasRunner(Runner):
    def __init__(self, model):
        tf = _tf.tf()
        self._model = model
        self.input_names = list(getattr(model, "input_names", None) or ["input"])
        self.output_names = list(getattr(model, "output_names", None) or ["output"])
        self._dtypes = [np.dtype(t.dtype.as_numpy_dtype) for t in (model.inputs or [])] or [np.dtype(np.float32)]
        self._fn = tf.function(
            lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False), reduce_retracing=True
        )

    def _args(self, x) -> list[np.ndarray]:
        return [np.asarray(a, dtype) for a, dtype in zip(self._ordered(x), self._dtypes)]

    def outputs(self, x):
        out = self._fn(*self._args(x))
        if isinstance(out, dict):
            out = [out[name] for name in self.output_names]
        return [_as_float(o) for o in out] if isinstance(out, (list, tuple)) else [_as_float(out)]

    def prepared(self, x):
        tensors = [_tf.tf().constant(a) for a in self._args(x)]
        return lambda: self._fn(*tensors)

    def input_shape(self):
        shape = self._model.input_shape
        return tuple((shape[0] if isinstance(shape, list) else shape)[1:])


class TFLiteRunner(Runner):
    """Runs a TFLite model in the interpreter, inputs and outputs named by its signature.

    A full-integer model's int8 inputs are quantized from float data as a
    device would; integer inputs (token ids) pass through in their own type. A
    model converted with a fixed batch of 1 (fused LSTM) runs a batch row by
    row, its state variables reset before each call (as a device serving
    independent requests does).
    """

    def __init__(self, content: bytes, threads: int = 1):
        tf = _tf.tf()
        with warnings.catch_warnings():  # tf.lite.Interpreter's notice about LiteRT
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input_details = self.interpreter.get_input_details()
        self.output_details = self.interpreter.get_output_details()
        # The interpreter lists inputs and outputs in the model's order; the signature names them.
        self.input_names, self.output_names = tensor_names(self.interpreter)
        first = self.input_details[0]["shape_signature"]
        #: The batch size the model was converted for (1 for a fused LSTM), or None when it takes any.
        self.fixed_batch = int(first[0]) if len(first) and first[0] > 0 else None
        self._batch = None

    def _feed(self, x) -> None:
        arrays = self._ordered(x)
        if len(arrays[0]) != self._batch:
            for detail, array in zip(self.input_details, arrays):
                self.interpreter.resize_tensor_input(detail["index"], [len(array), *detail["shape_signature"][1:]])
            self.interpreter.allocate_tensors()
            self.input_details = self.interpreter.get_input_details()
            self.output_details = self.interpreter.get_output_details()
            self._batch = len(arrays[0])
        for detail, array in zip(self.input_details, arrays):
            self.interpreter.set_tensor(detail["index"], to_input(array, detail))

    def _run(self, x) -> list[np.ndarray]:
        self._feed(x)
        # A fused LSTM keeps its state in variable tensors between calls: every batch starts from zeros.
        self.interpreter.reset_all_variables()
        self.interpreter.invoke()
        return [from_output(self.interpreter.get_tensor(d["index"]), d) for d in self.output_details]

    def outputs(self, x):
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self._run(x)
        parts = [self._run(x[i : i + self.fixed_batch]) for i in range(0, len(x), self.fixed_batch)]
        return [np.concatenate(column) for column in zip(*parts)]

    def prepared(self, x):
        if self.fixed_batch is not None and len(x) != self.fixed_batch:
            return lambda: self.outputs(x)  # row by row, as such a model serves a batch
        # Time the interpreter alone: an integer device is fed int8 directly.
        self._feed(x)
        return self.interpreter.invoke

    def input_shape(self):
        return tuple(int(d) for d in self.input_details[0]["shape"][1:])


class SavedModelRunner(Runner):
    """Runs a SavedModel's ``serving_default`` signature (inputs and outputs by its keys)."""

    def __init__(self, path: Path):
        tf = _tf.tf()
        self._loaded = tf.saved_model.load(str(path))
        self._fn = self._loaded.signatures["serving_default"]
        self._specs = self._fn.structured_input_signature[1]
        self.input_names = list(self._specs)
        self.output_names = list(self._fn.structured_outputs)

    def _kwargs(self, x) -> dict:
        tf = _tf.tf()
        return {
            name: tf.constant(np.asarray(array, self._specs[name].dtype.as_numpy_dtype))
            for name, array in zip(self.input_names, self._ordered(x))
        }

    def outputs(self, x):
        out = self._fn(**self._kwargs(x))
        return [_as_float(out[name]) for name in self.output_names]

    def prepared(self, x):
        kwargs = self._kwargs(x)
        return lambda: self._fn(**kwargs)

    def input_shape(self):
        return tuple(self._specs[self.input_names[0]].shape[1:])


def runner_for(handle: ModelHandle, output: str | int | None = None) -> Runner:
    """A runner for ``handle`` in its own format (TFLite with the threads it asks for).

    Calling it returns ``output`` (a name or index among ``runner.output_names``; None: the
    first); ``runner.outputs(x)`` returns them all. Use names across formats: kfopt keys its
    TFLite and SavedModel conversions by the Keras output names
    (:func:`kfopt.signature.resolve_output` turns an index of the baseline into its name).
    """
    if handle.format == "keras":
        runner = KerasRunner(handle.keras())
    elif handle.format == "tflite":
        runner = TFLiteRunner(handle.tflite(), threads=int(handle.info.get("threads", 1)))
    else:
        runner = SavedModelRunner(handle.saved_model_path())
    return runner.choose(output)


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


#: The inputs of stateful TFLite operators that hold their state (variables reset between requests), by position.
STATE_INPUTS = {"UNIDIRECTIONAL_SEQUENCE_LSTM": (18, 19), "UNIDIRECTIONAL_SEQUENCE_RNN": (4,), "SVDF": (4,)}
#: The types a TFLite weight is stored in.
WEIGHT_DTYPES = (np.float32, np.float16, np.int8, np.uint8)


def tflite_sparsity(content: bytes) -> float | None:
    """Fraction of zeros in a TFLite model's weights: its constant tensors of two or more axes in a weight type
    (float or 8-bit: not shapes, paddings or int32 biases), as the Keras side counts every weight of ndim >= 2.

    A constant is an operator input no operator makes and the model is not fed (an embedding table read by a
    GATHER counts, as its Keras weight does); a fused LSTM's or RNN's state inputs are variables, not weights.
    An 8-bit weight's zero is its zero point.
    """
    interpreter = TFLiteRunner(content).interpreter
    ops = interpreter._get_ops_details()  # tf.lite has no public per-operator listing
    fed = {d["index"] for d in interpreter.get_input_details()}
    made = {index for op in ops for index in op["outputs"]}
    state = {op["inputs"][i] for op in ops for i in STATE_INPUTS.get(op["op_name"], ()) if i < len(op["inputs"])}
    state |= {op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE" and op["outputs"][0] in state}
    constants = {i for op in ops for i in op["inputs"] if i >= 0} - made - fed - state
    zeros = total = 0
    for detail in interpreter.get_tensor_details():
        if detail["index"] not in constants or len(detail["shape"]) < 2 or detail["dtype"] not in WEIGHT_DTYPES:
            continue
        value = interpreter.get_tensor(detail["index"])
        zero_point = detail["quantization"][1] if value.dtype in (np.int8, np.uint8) else 0
        zeros += int((value == zero_point).sum())
        total += value.size
    return zeros / total if total else None


def latency(runner: Runner, sample: np.ndarray, runs: int = LATENCY_RUNS, warmup: int = WARMUP) -> tuple[float, float]:
    """(p50, p95) milliseconds of batch-1 invocations after warm-up (one model alone: no speedup from this)."""
    run = runner.prepared(sample)
    for _ in range(warmup):
        run()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run()
        times[i] = time.perf_counter() - start
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


@dataclass(frozen=True)
class LatencyComparison:
    """A model timed interleaved with its baseline (:func:`compare_latency`), batch 1, in milliseconds.

    ``speedup`` is the median over block pairs of the baseline's typical time over the candidate's, and
    ``speedup_low``/``speedup_high`` its distribution-free ``CONFIDENCE`` interval, widened to at least
    ``LATENCY_RESOLUTION`` either side: a pair's two blocks run back to back, so a change in the machine's
    load moves both and cancels in their ratio.
    """

    p50_ms: float
    p95_ms: float
    baseline_p50_ms: float
    baseline_p95_ms: float
    speedup: float
    speedup_low: float
    speedup_high: float
    #: Block pairs timed, and invocations of each model per block.
    pairs: int
    block: int
    seconds: float

    @property
    def runs(self) -> int:
        """Timed invocations of each model."""
        return self.pairs * self.block


def median_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: order statistics ``[x_(k), x_(n+1-k)]``.

    ``k`` is the largest count with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2, so the interval holds the
    true median with at least ``confidence`` whatever the distribution (fewer than six values: their range).
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    if not n:
        raise ValueError("no values")
    tail, below, k = (1 - confidence) / 2, 0.0, 0
    log_half = n * math.log(0.5)
    for j in range(n // 2):
        below += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + log_half)
        if below > tail:
            break
        k = j + 1
    k = max(k, 1)
    return float(x[k - 1]), float(x[n - k])


def _typical(times: np.ndarray) -> float:
    """A block's typical invocation time: the mean of its middle half. Robust to a preempted invocation like the
    median, but not stuck to the timer's steps: a sub-microsecond model's times come in a few discrete values."""
    ordered = np.sort(times)
    cut = len(ordered) // 4
    return float(ordered[cut : len(ordered) - cut].mean())


def compare_latency(
    runner: Runner | Sequence[Runner],
    baseline: Runner | Sequence[Runner],
    sample,
    *,
    min_runs: int = LATENCY_RUNS,
    max_seconds: float = LATENCY_SECONDS,
    precision: float = LATENCY_PRECISION,
    warmup: int = WARMUP,
) -> LatencyComparison:
    """Time ``runner`` against ``baseline`` on ``sample`` (batch 1) in one process, in alternating blocks.

    Blocks of batch-1 invocations alternate (candidate, baseline, baseline, candidate, ...: who goes first
    alternates too, so neither always runs on the caches the other warmed). Both keep the thread counts
    they were built with for the whole comparison. Either side may be several runners of one model
    (separate interpreters): pairs go through every combination, so how much an instance's memory placement
    moves its speed is part of the interval, not hidden in one draw. After ``MIN_PAIRS`` pairs it stops once
    ``min_runs`` invocations of each model are timed, every combination ran and the speedup's interval is
    within ``precision`` of it (relative half width), or when ``max_seconds`` have passed (then the interval
    is as wide as the noise made it: it says so). The same model on both sides gives an interval around 1.0.
    """
    clock = time.perf_counter
    runs_c = [r.prepared(sample) for r in (runner if isinstance(runner, (list, tuple)) else [runner])]
    runs_b = [r.prepared(sample) for r in (baseline if isinstance(baseline, (list, tuple)) else [baseline])]
    started = clock()
    slowest = 0.0
    for run in (*runs_c, *runs_b):
        warm = np.empty(max(warmup, 2))
        for i in range(len(warm)):
            tick = clock()
            run()
            warm[i] = clock() - tick
        slowest = max(slowest, float(np.median(warm[len(warm) // 2 :])))  # warmed up, and robust to a hiccup
    block = max(MIN_BLOCK, min(10_000, int(BLOCK_SECONDS / max(slowest, 1e-7))))
    enough_pairs = max(-(-min_runs // block), len(runs_c) * len(runs_b))
    times_c: list[np.ndarray] = []
    times_b: list[np.ndarray] = []
    ratios: list[float] = []
    while True:
        pairs = len(ratios)
        run_c, run_b = runs_c[pairs % len(runs_c)], runs_b[(pairs // len(runs_c)) % len(runs_b)]
        order = ((run_c, times_c), (run_b, times_b)) if pairs % 2 == 0 else ((run_b, times_b), (run_c, times_c))
        for run, times in order:
            row = np.empty(block)
            for i in range(block):
                tick = clock()
                run()
                row[i] = clock() - tick
            times.append(row)
        ratios.append(_typical(times_b[-1]) / _typical(times_c[-1]))
        pairs += 1
        if pairs < MIN_PAIRS:
            continue
        speedup = float(np.median(ratios))
        low, high = median_interval(ratios)
        narrow = pairs >= enough_pairs and (high - low) / 2 <= precision * speedup
        if narrow or clock() - started >= max_seconds or pairs >= MAX_PAIRS:
            break
    c, b = np.concatenate(times_c) * 1e3, np.concatenate(times_b) * 1e3
    low, high = min(low, speedup / (1 + LATENCY_RESOLUTION)), max(high, speedup * (1 + LATENCY_RESOLUTION))
    return LatencyComparison(
        p50_ms=float(np.percentile(c, 50)),
        p95_ms=float(np.percentile(c, 95)),
        baseline_p50_ms=float(np.percentile(b, 50)),
        baseline_p95_ms=float(np.percentile(b, 95)),
        speedup=speedup,
        speedup_low=low,
        speedup_high=high,
        pairs=pairs,
        block=block,
        seconds=clock() - started,
    )


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

    Latency: each candidate is timed interleaved with the baseline in its format
    (:func:`compare_latency`), for at least ``latency_runs`` batch-1 invocations
    of each and until its speedup's interval is narrow or ``latency_seconds``
    have passed (None: ``LATENCY_SECONDS``, shortened in proportion when
    ``latency_runs`` asks for fewer runs than the default, as quick test and
    smoke runs do).
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
        output: str | int | None = None,
        latency_seconds: float | None = None,
    ):
        from .data import is_one_hot, labels
        from .signature import model_info, output_view, resolve_output
        from .task import compiled_loss, infer_task

        self.data = data
        self.baseline = baseline
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.latency_runs = latency_runs
        self.latency_seconds = (
            latency_seconds if latency_seconds is not None else LATENCY_SECONDS * min(1.0, latency_runs / LATENCY_RUNS)
        )
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
        #: The output scored (``--output``: a name or an index of the baseline's; None: its first), by name,
        #: which kfopt keeps across formats (a TFLite model orders its outputs its own way).
        self.output = resolve_output(model_info(baseline).output_names, output)
        model = output_view(baseline, self.output, self.x_test)
        # tf.data splits give labels as the dataset holds them: read them the way kfopt.data reads arrays.
        one_hot = is_one_hot(y_test, y_val, data.train.y)
        given = [labels(y, one_hot) for y in (y_test, y_val, data.train.y) if y is not None and len(y)]
        loss = baseline.info.get("loss") or (
            compiled_loss(model, baseline.path) if baseline.format == "keras" else None
        )
        self.task = infer_task(model, given, metric=metric, metrics=metrics, loss=loss)
        self.metric = metrics[self.task.metric]
        self.y_test = self.task.targets(labels(y_test, one_hot))
        self.y_val = self.task.targets(labels(y_val, one_hot)) if len(y_val) else np.zeros((0,))
        #: One validation value's worth of a counted metric (accuracy: 1/n); None for other metrics.
        counted = {"samples": len(self.y_val), "labels": self.y_val.size}.get(self.metric.counted or "", 0)
        self.val_resolution = 1 / counted if counted else None
        self._baseline_scored: tuple[_Scored, _Scored | None] | None = None
        self._references: dict[str, dict] = {}
        self._reference_handles: dict[str, ModelHandle] = {}
        self._reference_runners: dict[str, list[Runner]] = {}
        self._reference_size: dict[str, dict] = {}

    # The baseline, as deployed in each format, is what ratios are taken against.
    def _reference_handle(self, format: str) -> ModelHandle:
        if format not in self._reference_handles:
            handle = self._baseline_as(format)
            if handle.path is None:
                handle.save(self.workdir / format)
            self._reference_handles[format] = handle
        return self._reference_handles[format]

    def _reference_sizes(self, format: str) -> dict:
        if format not in self._reference_size:
            size, gz = artifact_sizes(self._reference_handle(format).path)
            self._reference_size[format] = {"format": format, "size_bytes": size, "gzip_bytes": gz}
        return dict(self._reference_size[format])

    def _reference_instances(self, format: str) -> list[Runner]:
        """The baseline in ``format`` as the runners every candidate of that format is timed against, made once
        per run: ``TFLITE_INSTANCES`` interpreters for TFLite (on one thread, the interpreter's deployment
        default every candidate's thread count is measured against), one runner for the other formats."""
        if format not in self._reference_runners:
            count = TFLITE_INSTANCES if format == "tflite" else 1
            handle = self._reference_handle(format)
            self._reference_runners[format] = [runner_for(handle, self.output) for _ in range(count)]
        return self._reference_runners[format]

    def _baseline_as(self, format: str) -> ModelHandle:
        if format == self.baseline.format:
            return self.baseline
        # A SavedModel baseline (no Keras layers) converts through its signature.
        model = self.baseline.keras() if self.baseline.format == "keras" else self.baseline.saved_model_path()
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

    def majority_rate(self) -> float | None:
        """Test accuracy of always predicting the most frequent test label: what a model that learned nothing
        scores (single-label classification; None for other tasks)."""
        if self.task.kind not in ("multiclass", "binary") or not len(self.y_test):
            return None
        y = np.asarray(self.y_test)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            return None
        _, counts = np.unique(np.round(y).astype(np.int64), return_counts=True)
        return float(counts.max() / len(y))

    def baseline_metrics(self) -> dict:
        """The baseline's metrics in its Keras form (plus its like-for-like references)."""
        metrics = self.evaluate(self.baseline)
        metrics.pop("per_class_accuracy_change", None)
        return metrics

    # -- scoring: the task turns raw outputs into scores, labels and the metric ----------

    def _score(self, runner: Runner, x: np.ndarray, y: np.ndarray) -> _Scored | None:
        if not len(x):
            return None
        from .task import exact_accuracy

        scores = self.task.scores(predict(runner, x))
        predictions = self.task.predict(scores)
        return _Scored(predictions, self.metric.score(y, scores), exact_accuracy(self.task, y, predictions))

    def _baseline(self) -> tuple[_Scored, _Scored | None]:
        if self._baseline_scored is None:
            runner = runner_for(self.baseline, self.output)
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
        runner = runner_for(handle, self.output)
        test = self._score(runner, self.x_test, self.y_test)
        val = self._score(runner, self.x_val, self.y_val)
        size, gz = artifact_sizes(handle.path)
        timing = self._latency(handle, runner)
        reference = {
            **self._reference_sizes(handle.format),
            "latency_p50_ms": timing.baseline_p50_ms,
            "latency_p95_ms": timing.baseline_p95_ms,
        }
        self._references.setdefault(handle.format, dict(reference))
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
            "val_resolution": self.val_resolution,
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
            "flops": model_flops(handle),
            "latency_p50_ms": timing.p50_ms,
            "latency_p95_ms": timing.p95_ms,
            "throughput_per_s": throughput(runner, self._batch()),
            "speedup": timing.speedup,
            "speedup_low": timing.speedup_low,
            "speedup_high": timing.speedup_high,
            "per_class_accuracy_change": (
                self._per_class_change(test.predictions, base.predictions) if classifier else None
            ),
            "compared_with": reference,
        }

    def _latency(self, handle: ModelHandle, runner: Runner) -> LatencyComparison:
        """``handle`` timed interleaved with the baseline in its format; the baseline itself: 1.0 by definition."""
        if handle is self.baseline:
            known = self._references.get(handle.format)
            p50, p95 = (
                (known["latency_p50_ms"], known["latency_p95_ms"])
                if known
                else latency(runner, self.x_test[:1], self.latency_runs)
            )
            return LatencyComparison(p50, p95, p50, p95, 1.0, 1.0, 1.0, pairs=0, block=0, seconds=0.0)
        runners = [runner]
        if handle.format == "tflite":  # cheap to open again: each interpreter lands elsewhere in memory
            runners += [runner_for(handle, self.output) for _ in range(TFLITE_INSTANCES - 1)]
        return compare_latency(
            runners,
            self._reference_instances(handle.format),
            self.x_test[:1],
            min_runs=self.latency_runs,
            max_seconds=self.latency_seconds,
        )

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
