"""The run record: what a kfopt run measured and decided, as typed records.

:class:`RunResult` owns the shape of ``metrics.json`` (documented in the
README and DESIGN.md; the keys are public API). Every producer (``kfopt
optimize``, ``kfopt search``, the pipeline's select step, promotion) builds
one and every consumer (the CLI, tables, the HTML report, MLflow logging,
``promote --from``) reads one, so the shape, the winner lookup and the
tracking block are defined here only.

Records read like the JSON they serialise to: ``result.winner`` and
``result["winner"]`` are the same value, so code and notebooks written
against ``metrics.json`` keep working on the record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from . import rundir
from .errors import KfoptError

#: What a run measured and decided: observers add to a run record, never change these.
_DECIDED = {"model", "data", "seed", "splits", "baseline", "candidates", "winner", "pareto", "selection"}
#: Keys always written, even when None (readers test ``result["winner"] is None``).
_ALWAYS = {"recipe", "steps", "status", "reason", "winner", "pareto", "registered_model", "candidates", "baseline"}


class _Record(BaseModel):
    """Typed, and readable as the dict it is written as (``record["key"]``, ``record.get("key")``)."""

    # extra="allow": metrics added by evaluator plugins keep their own names.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str, default=None):
        value = getattr(self, key, None)
        return default if value is None else value

    def keys(self):
        """The keys of the JSON form, so ``{**record}`` and ``dict(record)`` work like on ``metrics.json``."""
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def to_dict(self) -> dict:
        """The JSON form: None-valued optional keys are left out."""
        out = {}
        for key, value in self.model_dump(mode="python").items():
            if value is None and key not in _ALWAYS:
                continue
            out[key] = value
        return out


class Measurement(_Record):
    """The metrics of one model, measured by :class:`kfopt.evaluate.Evaluator` (names from DESIGN.md)."""

    format: str | None = None
    #: The task read from the model and the labels (kfopt.task): multiclass, binary, multilabel, regression.
    task: str | None = None
    #: The budgeted metric (``--metric``; the task's default otherwise), its value on the test split, and
    #: its drop vs the baseline: positive when worse, whichever way the metric points (mae: candidate minus
    #: baseline); ``_relative`` is the drop as a fraction of the baseline's value (what a "1%" budget bounds).
    metric_name: str | None = None
    metric: float | None = None
    metric_drop: float | None = None
    metric_drop_relative: float | None = None
    val_metric: float | None = None
    val_metric_drop: float | None = None
    val_metric_drop_relative: float | None = None
    #: The smallest change of a counted metric (accuracy) the validation split can show: one of its values
    #: (1/n). A validation drop up to it is within the budget, since the split cannot tell it from noise;
    #: the test split's budget check stays exact.
    val_resolution: float | None = None
    #: Classifiers only (None for regression): exact accuracy, agreement with the baseline, per-class change.
    accuracy: float | None = None
    accuracy_drop: float | None = None
    agreement: float | None = None
    val_accuracy: float | None = None
    val_accuracy_drop: float | None = None
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    compression_ratio: float | None = None
    sparsity: float | None = None
    params: int | None = None
    #: Multiply-accumulates of one forward pass for one input (kfopt.flops).
    flops: int | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    throughput_per_s: float | None = None
    speedup: float | None = None
    #: The speedup's 95% interval: the candidate timed interleaved with its baseline (kfopt.evaluate.compare_latency).
    speedup_low: float | None = None
    speedup_high: float | None = None
    per_class_accuracy_change: dict[str, float] | None = None
    #: The baseline measured in this candidate's format: what the ratios divide by.
    compared_with: dict[str, Any] | None = None

    def record(self, metrics: dict[str, Any]) -> None:
        """Take the metrics an evaluator measured (names it adds beyond DESIGN.md's are kept as they are)."""
        for key, value in metrics.items():
            setattr(self, key, value)


class Baseline(Measurement):
    """The model the user gave (or the demo kfopt trained), measured in its Keras form."""

    artifact: str | None = None
    #: :func:`kfopt.rundir.digest` of the artifact: ``kfopt promote --from`` registers nothing that differs.
    artifact_sha256: str | None = None
    #: The baseline in every other format a candidate came in (fp32 TFLite, plain SavedModel).
    references: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Candidate(Measurement):
    """One recipe's outcome: ``status`` ok (measured), skipped (cannot run here) or failed (with the reason)."""

    recipe: str
    steps: list[dict[str, Any]] = Field(default_factory=list)
    #: ``stopped`` only marks the pipeline's no-op item of a search round that did not run.
    status: Literal["ok", "skipped", "failed", "stopped"] = "ok"
    reason: str | None = None
    traceback: str | None = None
    #: The model file (a directory for a SavedModel): in metrics.json relative to the run directory,
    #: in memory a path this process can open (see RunResult.load and RunResult.save).
    artifact: str | None = None
    #: :func:`kfopt.rundir.digest` of the artifact: ``kfopt promote --from`` registers nothing that differs.
    artifact_sha256: str | None = None
    seconds: float | None = None
    #: The search round that proposed it (1: the search space) and why.
    round: int | None = None
    why: str | None = None
    #: Its place in the search space (the pipeline's fan-in finishes in any order).
    position: int | None = None
    #: Pipeline only: False while a fine-tuning step saved it for the CPU pool to measure.
    measured: bool | None = None
    #: Facts the saved artifact cannot tell (ModelHandle.info), carried from optimize to evaluate.
    info: dict[str, Any] | None = None
    #: What the techniques left as it was and why, one line each (layers left dense, float under QAT, ...).
    notes: list[str] | None = None
    within_budget: bool | None = None
    not_selected_because: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, recipe: str, reason: str, **fields) -> Candidate:
        return cls(recipe=recipe, status="failed", reason=reason, **fields)


class Registration(_Record):
    """What promotion did with the winner in the MLflow Model Registry."""

    name: str
    version: int | None = None
    aliases: list[str] = Field(default_factory=list)
    promoted: bool = False
    reason: str | None = None
    previous_champion: str | None = None

    def to_dict(self) -> dict:
        return self.model_dump(mode="python")


class Tracking(_Record):
    """Where the run was logged in MLflow and how that went (``status`` ok, failed or skipped)."""

    status: str
    uri: str | None = None
    experiment: str | None = None
    error: str | None = None
    run_id: str | None = None
    registered_model: str | None = None
    objective: str | None = None
    max_accuracy_drop: float | str | None = None

    def to_dict(self) -> dict:
        return self.model_dump(mode="python")


class RunResult(_Record):
    """A run: the baseline, every candidate, the selection and what MLflow made of it (``metrics.json``)."""

    model: str
    data: str
    seed: int = 0
    #: Samples per split and where validation came from (kfopt.data.Splits): every number says its split.
    splits: dict[str, Any] | None = None
    baseline: Baseline
    candidates: list[Candidate] = Field(default_factory=list)
    winner: str | None = None
    pareto: list[str] = Field(default_factory=list)
    #: How the winner was chosen: objective, metric, budget, Pareto fronts (kfopt.select.Selection).
    selection: dict[str, Any] | None = None
    registered_model: Registration | None = None
    tracking: Tracking | None = None
    #: A search's bounds and outcome, its trace, and the baseline's layer sensitivity.
    search: dict[str, Any] | None = None
    search_trace: list[dict[str, Any]] | None = None
    layer_sensitivity: list[dict[str, Any]] | None = None
    #: A search's best candidate that keeps the user's architecture (no dense student), beside ``winner``.
    best_same_architecture: str | None = None
    #: What the user should know about the run as a whole, one line each (e.g. a baseline at chance level).
    warnings: list[str] = Field(default_factory=list)
    #: Set by ``kfopt run``: the HTML report, the self-contained results folder, the log, wall seconds.
    report: str | None = None
    results: str | None = None
    log: str | None = None
    seconds: float | None = None
    #: The run directory this record was saved to or loaded from (where relative artifact paths live).
    _directory: Path | None = PrivateAttr(default=None)

    @classmethod
    def of(cls, value: RunResult | dict) -> RunResult:
        """``value`` as a record: a RunResult as it is, a metrics.json dict validated into one."""
        return value if isinstance(value, cls) else cls.model_validate(value)

    # -- reading ----------------------------------------------------------------
    def candidate(self, recipe: str | None) -> Candidate | None:
        """The candidate called ``recipe``, or None."""
        return next((c for c in self.candidates if c.recipe == recipe), None) if recipe else None

    @property
    def winning_candidate(self) -> Candidate | None:
        """The winner's record (None when nothing was within the budget)."""
        return self.candidate(self.winner)

    def winner_model(self):
        """The winner, loaded: a Keras model (in the Keras the user gave: Keras 3 for a Keras 3 model),
        TFLite flatbuffer bytes, or a SavedModel's directory. None when there is no winner."""
        candidate = self.winning_candidate
        if candidate is None or not candidate.artifact:
            return None
        path = rundir.resolve_artifact(self._directory or Path.cwd(), candidate.artifact)
        if candidate.format == "tflite":
            return path.read_bytes()
        if candidate.format == "saved_model":
            return path
        from . import keras3
        from .models import load_keras

        return keras3.keras3().saving.load_model(path) if keras3.is_keras3_file(path) else load_keras(path)

    # -- showing ------------------------------------------------------------------
    def __rich__(self):
        """The candidates table, as ``kfopt optimize`` / ``kfopt search`` print it (rich renders it)."""
        from .report import results_table, search_table

        return search_table(self) if self.search else results_table(self)

    def _repr_html_(self) -> str:
        """The candidates table of the HTML report, for Jupyter."""
        from .html_report import candidates_table

        winner = f"winner: <b>{self.winner}</b>" if self.winner else "no candidate within the budget"
        return f"<p>kfopt: {self.model} on {self.data}: {winner}</p>" + candidates_table(self)

    def __repr__(self) -> str:
        return f"<RunResult {self.model} on {self.data}: {len(self.candidates)} candidates, winner {self.winner!r}>"

    # -- deciding -----------------------------------------------------------------
    def settle_baseline_latency(self) -> RunResult:
        """Show the baseline's latency in each format as it was timed beside the candidates (the median over
        them, :func:`kfopt.select.latency_baselines`), not a lone timing taken at another moment, which could
        contradict the speedups next to it. Formats no candidate was timed against keep their timing."""
        from .select import latency_baselines

        for key in ("latency_p50_ms", "latency_p95_ms"):
            for format, value in latency_baselines(self.candidates, key).items():
                if format in self.baseline.references:
                    self.baseline.references[format] = {**self.baseline.references[format], key: value}
                if format == (self.baseline.format or "keras"):
                    setattr(self.baseline, key, value)
        return self

    def apply(self, selection) -> RunResult:
        """Record a :class:`kfopt.select.Selection`: winner, Pareto front, and per candidate why it is out."""
        self.winner = selection.winner
        self.pareto = list(selection.pareto)
        self.selection = {k: v for k, v in selection.as_dict().items() if k not in ("winner", "pareto", "reasons")}
        for candidate in self.candidates:
            candidate.within_budget = candidate.recipe in selection.within_budget
            candidate.not_selected_because = selection.reasons.get(candidate.recipe)
        return self

    def update_from(self, fields: dict[str, Any] | None) -> None:
        """Take the fields observers returned from ``kfopt_run_finished`` (``tracking``, ``registered_model``,
        or new keys of their own); what the run measured and decided is not theirs to change."""
        for key, value in (fields or {}).items():
            if key in _DECIDED:
                import warnings

                warnings.warn(f"an observer tried to change '{key}' of the run record; ignored", stacklevel=2)
                continue
            if key == "tracking" and isinstance(value, dict):
                value = Tracking.model_validate(value)
            elif key == "registered_model" and isinstance(value, dict):
                value = Registration.model_validate(value)
            setattr(self, key, value)

    # -- files --------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = super().to_dict()
        out["baseline"] = self.baseline.to_dict()
        out["candidates"] = [c.to_dict() for c in self.candidates]
        for key in ("registered_model", "tracking"):
            record = getattr(self, key)
            if record is not None:
                out[key] = record.to_dict()
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``metrics.json`` into ``directory``, atomically.

        Every artifact is written relative to ``directory`` (it must be inside
        it) with its sha256, computed here the first time a record is saved.
        """
        directory = Path(directory)
        self._directory = directory
        data = self.to_dict()
        for record, written in zip([self.baseline, *self.candidates], [data["baseline"], *data["candidates"]]):
            if record.artifact:
                if record.artifact_sha256 is None:
                    record.artifact_sha256 = rundir.digest(record.artifact)
                written["artifact"] = rundir.stored_artifact(directory, record.artifact)
                written["artifact_sha256"] = record.artifact_sha256
        return rundir.write_json(directory / rundir.METRICS_FILE, data)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RunResult:
        """The ``metrics.json`` a kfopt run wrote into ``directory``."""
        path = Path(directory) / rundir.METRICS_FILE
        if not path.is_file():
            raise KfoptError(
                f"No {rundir.METRICS_FILE} in '{directory}'.",
                "pass the --out directory of a finished `kfopt optimize`, `kfopt search` or `kfopt run`.",
            )
        data = rundir.read_json(path, "run record")
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
            raise KfoptError(f"'{path}' has no list of candidates.", "pass the directory of a kfopt run.")
        try:
            result = cls.model_validate(data)
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            raise KfoptError(
                f"'{path}' is not a kfopt run record ({first}).", "pass the directory of a kfopt run."
            ) from None
        result._directory = Path(directory)
        # In memory an artifact is a path this process can open; rundir.resolve_artifact refuses
        # any that leads outside the directory when it is used.
        for record in [result.baseline, *result.candidates]:
            if record.artifact:
                record.artifact = str(Path(directory) / record.artifact)
        return result
