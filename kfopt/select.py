"""Choosing the winner: the budget, the objective, and the Pareto front.

Works on candidate records as :func:`kfopt.engine.run_recipe` returns them
(``recipe``, ``status``, metrics), so the same logic serves ``kfopt run``, the
KFP ``select`` component and anything reading a ``metrics.json``.

The budget bounds the drop of the task's budgeted metric (``metric_drop``, see
:mod:`kfopt.task`; accuracy for a multi-class model, so ``metric_drop`` is
``accuracy_drop`` there): an absolute drop (``0.01``) or a relative one
(``"1%"`` of the baseline's value). A drop is positive when the candidate is
worse, for metrics where higher is better and for errors alike. Records
without metric fields (written before they existed) are budgeted on
``accuracy_drop``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import KfoptError, did_you_mean

#: Objective name -> the metric it minimises. Both are measured on the same
#: host for every candidate, so they compare across formats.
OBJECTIVES = {"size": "gzip_bytes", "latency": "latency_p50_ms"}
#: The weighted mix of both: ``mix`` (half and half) or ``mix:W`` (W on size); see :func:`objective_value`.
MIX = "mix"

#: Slack for comparing an accuracy drop with the budget: drops are differences
#: of fractions of the test set, so 0.01 may come out as 0.010000000000000009.
#: The one tolerance of every budget check (select, search, promotion gate).
TOLERANCE = 1e-9
#: The finest difference a speedup claims (its interval is at least this wide either side): two runners of
#: the very same model, interleaved, differ by a steady 1-2% in TFLite and up to 4% in Keras (where their
#: buffers and graphs landed in memory), which no number of repetitions averages away. Latencies closer
#: than this are ties (:func:`within_noise`). Here, not in :mod:`kfopt.evaluate`, so choosing needs no TensorFlow.
LATENCY_RESOLUTION = 0.05


@dataclass(frozen=True)
class Budget:
    """The largest drop of the budgeted metric a winner may have.

    ``drop`` is an absolute drop in the metric's units (0.01: one point of
    accuracy, 0.5 of mae), or with ``relative`` a fraction of the baseline's
    value (``"1%"`` -> ``drop=0.01, relative=True``).
    """

    drop: float
    relative: bool = False

    @classmethod
    def parse(cls, value: float | str | Budget) -> Budget:
        """``0.01``, ``"0.01"`` or ``"1%"`` as a Budget; a KfoptError naming the forms otherwise."""
        if isinstance(value, Budget):
            return value
        text = str(value).strip()
        relative = text.endswith("%")
        try:
            number = float(text[:-1] if relative else text)
        except ValueError:
            number = math.nan
        if relative:
            number /= 100
        if not math.isfinite(number) or number < 0 or (relative and number > 1):
            raise KfoptError(
                f"max_accuracy_drop={value!r} is not a budget: give a drop of at least 0 in the metric's units, "
                "or a percentage of the baseline's metric between 0% and 100%.",
                "pass e.g. --max-accuracy-drop 0.01 (one point of accuracy) or --max-accuracy-drop 1% "
                "(1% of the baseline's metric).",
            )
        return cls(number, relative)

    @property
    def value(self) -> float | str:
        """As the user writes it: a float, or ``"N%"``."""
        return f"{self.drop * 100:g}%" if self.relative else self.drop

    def __str__(self) -> str:
        return str(self.value) if self.relative else f"{self.drop:g}"

    def over(self, drop: float | None, relative_drop: float | None, resolution: float | None = None) -> bool:
        """Whether a candidate with these drops is over the budget (a relative budget with no relative drop: yes,
        unless the candidate is not worse at all). A drop no larger than ``resolution`` (the smallest change
        the split can show, e.g. one sample of a small validation split) is within any budget."""
        if resolution and drop is not None and drop <= resolution + TOLERANCE:
            return False
        if self.relative:
            if relative_drop is None:
                return (drop or 0.0) > TOLERANCE
            return relative_drop > self.drop + TOLERANCE
        return (drop or 0.0) > self.drop + TOLERANCE


def absolute_budget(max_accuracy_drop: float | str | Budget, records: Iterable[dict]) -> float:
    """The budget as a drop in the metric's units on the validation split (a relative budget times the
    baseline's validation value, read from the records; the budget itself when absolute)."""
    budget = Budget.parse(max_accuracy_drop)
    if not budget.relative:
        return budget.drop
    for record in records:
        q = quality(record)
        if q.val_drop is None:
            continue
        if q.val_relative_drop:  # drop / |baseline|
            return budget.drop * abs(q.val_drop / q.val_relative_drop)
        if q.val_drop == 0 and record.get("val_metric", record.get("val_accuracy")) is not None:
            return budget.drop * abs(record.get("val_metric", record.get("val_accuracy")))  # equal to the baseline
    return 0.0


def worse_than_champion(
    ours: float, theirs: float, *, max_accuracy_drop: float | str | Budget, higher_is_better: bool = True
) -> bool:
    """Whether a metric value ``ours`` is worse than the champion's ``theirs`` by more than the budget
    (a relative budget is taken of the champion's value)."""
    budget = Budget.parse(max_accuracy_drop)
    loss = theirs - ours if higher_is_better else ours - theirs
    limit = budget.drop * abs(theirs) if budget.relative else budget.drop
    return loss > limit + TOLERANCE


def check_budget(max_accuracy_drop, metric) -> None:
    """Refuse (exit 2) an absolute budget of at least all that ``metric`` (:class:`kfopt.task.Metric`) can
    lose: under it every candidate passes and no champion is safe (``5`` meant as 5 points is 500 points)."""
    budget = Budget.parse(max_accuracy_drop)
    if budget.relative or metric.at_most is None or budget.drop < metric.at_most:
        return
    raise KfoptError(
        f"A budget of {budget.drop:g} allows a drop of {metric.name} larger than all it can lose (it is at most "
        f"{metric.at_most:g}), so every candidate would pass.",
        f"give it in the metric's units ({budget.drop / 100:g} for {budget.drop:g} points) or relative to the "
        f"baseline ('{budget.drop:g}%').",
    )


def budget_value(max_accuracy_drop: float | str | Budget) -> float | str:
    """A budget as settings and records keep it: a float (absolute) or ``"N%"`` (relative)."""
    return Budget.parse(max_accuracy_drop).value


@dataclass(frozen=True)
class Quality:
    """What the budget reads from a candidate: the metric, its drops (test and validation), their relative forms."""

    name: str
    value: float | None
    drop: float | None
    relative_drop: float | None
    val_drop: float | None
    val_relative_drop: float | None
    #: The smallest drop the validation split can show (one of its samples, for accuracy); None: exact.
    val_resolution: float | None = None

    def over_on_validation(self, budget: Budget) -> bool:
        """Whether the validation drop is over ``budget``; a split too small to show the budget (one sample
        is worth more than it) counts a drop of one sample as within it, and the test split decides."""
        return budget.over(self.val_drop, self.val_relative_drop, self.val_resolution)


def quality(candidate) -> Quality:
    """The budgeted metric of ``candidate``: its ``metric`` fields, or accuracy for records that have none."""
    get = candidate.get
    if get("metric_drop") is not None or get("metric_name") is not None:
        return Quality(
            get("metric_name") or "metric",
            get("metric"),
            get("metric_drop"),
            get("metric_drop_relative"),
            get("val_metric_drop"),
            get("val_metric_drop_relative"),
            get("val_resolution"),
        )
    accuracy, drop, val_drop = get("accuracy"), get("accuracy_drop"), get("val_accuracy_drop")
    base = accuracy + drop if accuracy is not None and drop is not None else None
    val_accuracy = get("val_accuracy")
    val_base = val_accuracy + val_drop if val_accuracy is not None and val_drop is not None else None
    return Quality(
        "accuracy",
        accuracy,
        drop,
        drop / base if base else None,
        val_drop,
        val_drop / val_base if val_base else None,
        get("val_resolution"),
    )


def _rank(candidate) -> float:
    """Higher is better: minus the metric drop (for accuracy: the same order as accuracy itself)."""
    q = quality(candidate)
    if candidate.get("metric_drop") is not None:
        return -q.drop
    return q.value


def _val_drop(candidate) -> float:
    """The validation drop of the budgeted metric, for choosing (infinity when not measured)."""
    drop = quality(candidate).val_drop
    return math.inf if drop is None else drop


def _describe_drop(q: Quality, drop: float | None, relative: float | None, budget: Budget) -> str:
    if budget.relative:
        shown = f"{relative * 100:.2f}% of the baseline" if relative is not None else f"{drop or 0:.4f} (baseline 0)"
        return f"{q.name} drop {shown}"
    return f"{q.name} drop {drop or 0:.4f}"


@dataclass
class Selection:
    """The outcome of :func:`select`.

    ``winner`` is the recipe label of the best candidate within the budget (or
    None), ``pareto`` the labels of the candidates no other candidate beats on
    both accuracy and the objective metric (best metric first), ``within_budget``
    the labels of eligible candidates, and ``reasons`` says for every other
    candidate why it was not eligible. ``ties`` lists the candidates a latency
    or mix objective could not tell from the best one within the resolution of
    the measurement (the winner among them has the smallest metric drop, then size).
    """

    objective: str
    metric: str
    max_accuracy_drop: float | str
    winner: str | None = None
    pareto: list[str] = field(default_factory=list)
    within_budget: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    fronts: dict[str, list[str]] = field(default_factory=dict)
    #: The metric the budget bounds (``metric_name`` of the candidates); None for records without one.
    budget_metric: str | None = None
    ties: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {
            "objective": self.objective,
            "metric": self.metric,
            "max_accuracy_drop": self.max_accuracy_drop,
            "winner": self.winner,
            "pareto": list(self.pareto),
            "within_budget": list(self.within_budget),
            "reasons": dict(self.reasons),
            "pareto_fronts": dict(self.fronts),
        }
        if self.budget_metric:
            out["budget_metric"] = self.budget_metric
        if self.ties:
            out["ties_within_noise"] = list(self.ties)
        return out


def check_goal(max_accuracy_drop: float | str | Budget, objective: str) -> str:
    """Validate a budget (:meth:`Budget.parse`) and an objective the user gave; return the objective's metric."""
    Budget.parse(max_accuracy_drop)
    return objective_metric(objective)


def objective_metric(objective: str) -> str:
    """What an objective minimises: a metric name, or for a mix the formula; a KfoptError naming the choices otherwise."""
    if objective in OBJECTIVES:
        return OBJECTIVES[objective]
    weight = mix_weight(objective)
    if weight is None:
        raise KfoptError(
            f"Unknown objective '{objective}'.{did_you_mean(str(objective), [*OBJECTIVES, MIX])} "
            f"Valid objectives: {', '.join(OBJECTIVES)}, {MIX} or {MIX}:W.",
            "pass --objective size (smallest gzip_bytes), latency (lowest latency_p50_ms), or mix:0.7 "
            "(a weighted mix: 70% size, 30% latency).",
        ) from None
    return f"gzip_bytes^{weight:g} * latency_p50_ms^{1 - weight:g}"


def mix_weight(objective: str) -> float | None:
    """The weight on size of a ``mix`` / ``mix:W`` objective (0.5 for plain ``mix``); None for other objectives."""
    text = str(objective)
    if text == MIX:
        return 0.5
    if not text.startswith(MIX + ":"):
        return None
    try:
        weight = float(text[len(MIX) + 1 :])
    except ValueError:
        weight = -1.0
    if not 0 < weight < 1:
        raise KfoptError(
            f"Objective '{objective}': the weight after '{MIX}:' must be a number between 0 and 1.",
            "pass e.g. --objective mix:0.7 for 70% size and 30% latency, or plain mix for half and half.",
        )
    return weight


def objective_value(record: dict, objective: str, baselines: dict[str, float] | None = None) -> float | None:
    """What ``objective`` minimises for one candidate, or None when it was not measured.

    ``size`` is ``gzip_bytes`` and ``latency`` is ``latency_p50_ms`` (raw, as
    displayed), or with ``baselines`` (:func:`latency_baselines`) the steady
    latency a choice ranks by (see :func:`steady_objective`, which every choice
    calls). ``mix:W`` is ``gzip_bytes^W * latency^(1-W)``: a weighted geometric
    mean, so halving the size is worth as much as halving the latency (at
    W = 0.5) whatever the units.
    """
    latency = record.get("latency_p50_ms") if baselines is None else _steady_latency(record, baselines)
    if objective == "latency":
        return latency
    if objective in OBJECTIVES:
        return record.get(OBJECTIVES[objective])
    weight = mix_weight(objective)
    if weight is None:
        objective_metric(objective)  # raises, naming the choices
    size = record.get("gzip_bytes")
    if not size or not latency or size <= 0 or latency <= 0:
        return None
    return size**weight * latency ** (1 - weight)


def objective_ratio(record: dict, objective: str) -> tuple[str, float | None]:
    """(name, value) of the like-for-like ratio a target is compared with: ``compression_ratio`` for size,
    ``speedup`` for latency, ``compression_ratio^W * speedup^(1-W)`` for ``mix:W`` (higher is better)."""
    if objective == "size":
        return "compression_ratio", record.get("compression_ratio")
    if objective == "latency":
        return "speedup", record.get("speedup")
    weight = mix_weight(objective)
    if weight is None:
        objective_metric(objective)  # raises, naming the choices
    ratio, speedup = record.get("compression_ratio"), record.get("speedup")
    value = ratio**weight * speedup ** (1 - weight) if ratio and speedup and ratio > 0 and speedup > 0 else None
    return f"compression_ratio^{weight:g} * speedup^{1 - weight:g}", value


def latency_baselines(records: Iterable[dict], key: str = "latency_p50_ms") -> dict[str, float]:
    """One baseline p50 (ms) per format for a whole set of candidates: the median of their
    ``compared_with.latency_p50_ms`` (the baseline as timed interleaved with each of them); ``key`` another
    of its latencies (``latency_p95_ms``).

    Read from the records themselves, so ``kfopt run``, the search and the pipeline's select step (which
    only has the records) all get the same value for the same candidates.
    """
    by_format: dict[str, list[float]] = {}
    for record in records:
        reference = record.get("compared_with") or {}
        p50 = reference.get(key)
        if record.get("status", "ok") == "ok" and p50 and p50 > 0:
            by_format.setdefault(record.get("format") or reference.get("format"), []).append(p50)
    return {fmt: statistics.median(values) for fmt, values in by_format.items()}


def steady_objective(records: Iterable[dict], objective: str) -> Callable[[dict], float | None]:
    """The value every choice of kfopt ranks candidates by on ``objective`` (lower is better): one function
    for :func:`select`, its ties, the Pareto fronts and the search (best candidate, round gain, target).

    Size is ``gzip_bytes``. Latency is the *steady* latency: the format's one baseline p50 for all of
    ``records`` (:func:`latency_baselines`) over the candidate's ``speedup``, which was measured interleaved
    with that baseline, so the machine's load during each candidate's own timing window (or on the node of
    its pipeline step) cancels out; a raw ``latency_p50_ms`` (each in its own window) does not. A record
    without a speedup or a baseline falls back to its raw p50. ``mix:W`` combines both as in
    :func:`objective_value`. The records keep their raw ``latency_p50_ms`` for display.
    """
    baselines = latency_baselines(records) if objective != "size" else {}
    return lambda record: objective_value(record, objective, baselines)


def _steady_latency(record: dict, baselines: dict[str, float]) -> float | None:
    fmt = record.get("format") or (record.get("compared_with") or {}).get("format")
    baseline, speedup = baselines.get(fmt), record.get("speedup")
    if baseline and speedup and speedup > 0:
        return baseline / speedup
    return record.get("latency_p50_ms")


#: The widest tie band: a candidate timed so noisily that its interval is wider than this ties no more
#: than this (otherwise a noisy measurement would tie with, and win against, a clearly faster candidate).
MAX_TIE_WIDTH = 2 * LATENCY_RESOLUTION


def latency_half_width(record: dict) -> float | None:
    """The relative half width of the candidate's speedup interval (at least ``LATENCY_RESOLUTION``, at most
    ``MAX_TIE_WIDTH``), or None for a record without a spread (measured before spreads were)."""
    speedup, low, high = record.get("speedup"), record.get("speedup_low"), record.get("speedup_high")
    if not (speedup and low and high and 0 < low <= speedup <= high):
        return None
    return min(MAX_TIE_WIDTH, max(LATENCY_RESOLUTION, high / speedup - 1, speedup / low - 1))


def within_noise(record: dict, best: dict, objective: str, value: Callable[[dict], float | None]) -> bool:
    """Whether ``record`` and ``best`` are too close on ``objective`` for their latency measurements to tell
    apart: their ``value`` (:func:`steady_objective`) differ by no more than the resolution counted once, the
    wider of their relative half widths (:func:`latency_half_width`, at least ``LATENCY_RESOLUTION``), to the
    power 1 - W for ``mix:W``. Size is exact, and so are two records without a spread: never a tie."""
    if objective == "size":
        return False
    widths = [w for w in (latency_half_width(record), latency_half_width(best)) if w is not None]
    ours, theirs = value(record), value(best)
    if not widths or not ours or not theirs or ours <= 0 or theirs <= 0:
        return False
    weight = 0.0 if objective == "latency" else mix_weight(objective)
    allowed = (1 + max(widths)) ** (1 - weight)
    return max(ours, theirs) / min(ours, theirs) <= allowed * (1 + TOLERANCE)


def _scorer(candidates: list[dict], key: str) -> Callable[[dict], float | None]:
    """``key`` is an objective (size, latency, mix:W), one of their metrics (ranked as that objective), or a
    plain metric name."""
    objective = {metric: name for name, metric in OBJECTIVES.items()}.get(key, key)
    if objective in OBJECTIVES or mix_weight(objective) is not None:
        return steady_objective(candidates, objective)
    return lambda record: record.get(key)


def _value(record: dict, key: str):
    """``key`` is an objective (size, latency, mix:W) or a plain metric name."""
    if key in OBJECTIVES or mix_weight(key) is not None:
        return objective_value(record, key)
    return record.get(key)


def measured(candidate: dict, key: str) -> bool:
    """True when the candidate finished and has both its budgeted metric and ``key`` (a metric or an objective)."""
    return (
        candidate.get("status") == "ok" and quality(candidate).value is not None and _value(candidate, key) is not None
    )


def pareto_front(candidates: Iterable[dict], key: str) -> list[str]:
    """Labels of measured candidates not dominated on (smaller metric drop, lower ``key``).

    The metric drop orders candidates like accuracy does for accuracy, and the
    right way round for errors (a lower mae is better). ``key`` is a metric
    (``gzip_bytes``) or an objective (``size``, ``mix:0.7``). A candidate is
    dominated when another is at least as good on both and strictly better on
    one; equal candidates do not dominate each other, so ties all stay on the
    front. Sorted by ``key``, then quality (best first). Latency (the objective
    or its metric ``latency_p50_ms``) is ranked steady (:func:`steady_objective`).
    """
    candidates = list(candidates)
    value = _scorer(candidates, key)
    points = [(c, value(c), _rank(c)) for c in candidates if measured(c, key)]
    front = [
        (c, v, r) for c, v, r in points if not any(_dominates(or_, ov, r, v) for o, ov, or_ in points if o is not c)
    ]
    front.sort(key=lambda cvr: (cvr[1], -cvr[2], cvr[0]["recipe"]))
    return [c["recipe"] for c, _, _ in front]


def _dominates(a_rank: float, a_value: float, b_rank: float, b_value: float) -> bool:
    return a_rank >= b_rank and a_value <= b_value and (a_rank > b_rank or a_value < b_value)


def why_not_eligible(candidate, *, max_accuracy_drop: float | str | Budget, objective: str) -> str | None:
    """Why ``candidate`` cannot win under this budget and objective, or None when it can.

    The one budget check of kfopt: :func:`select`, the search and the promotion gate use it.
    Eligible: status ``ok``, measured on its metric and on the objective, its
    ``metric_drop`` within the budget (test split; ``accuracy_drop`` for
    records without metric fields) and, when measured, its ``val_metric_drop``
    too (the split the search decides on). A relative budget (``"1%"``)
    bounds the drops relative to the baseline's value.
    """
    budget = Budget.parse(max_accuracy_drop)
    status = candidate.get("status")
    if status != "ok":
        return f"{status}: {candidate.get('reason') or 'no reason given'}"
    q = quality(candidate)
    if not measured(candidate, objective):
        return f"not measured: has no {q.name if q.value is None else objective_metric(objective)}"
    if budget.over(q.drop, q.relative_drop):
        return f"{_describe_drop(q, q.drop, q.relative_drop, budget)} is over the budget {_shown(budget)}"
    if q.over_on_validation(budget):
        # Chosen on validation, confirmed on test: a candidate the search would not have kept
        # is not made the winner because it happened to do well on the test split.
        return (
            f"{_describe_drop(q, q.val_drop, q.val_relative_drop, budget)} on the validation split is over the "
            f"budget {_shown(budget)} (test split: {_describe_drop(q, q.drop, q.relative_drop, budget)})"
        )
    return None


def _shown(budget: Budget) -> str:
    return str(budget) if budget.relative else f"{budget.drop:.4f}"


def select(
    candidates: Iterable[dict],
    *,
    max_accuracy_drop: float | str | Budget = 0.01,
    objective: str = "size",
    among: Callable[[dict], bool] | None = None,
) -> Selection:
    """Pick the candidate with the best objective metric among those within the budget.

    Eligible (:func:`why_not_eligible`): status ``ok``, ``metric_drop`` within
    ``max_accuracy_drop`` (an absolute drop, or ``"N%"`` of the baseline's
    metric) on the test split and, when measured, on the validation split (the
    split the search decides on: a winner is within the budget on both). Ties
    on the objective go to the smaller metric drop (the higher accuracy), then
    to the recipe label (so the choice never depends on the order candidates
    finished in). Latency is ranked steady (:func:`steady_objective`: one
    baseline per format over each candidate's paired speedup), so the load
    during each candidate's timing window does not pick the winner. With
    ``latency`` or ``mix``, a difference within the resolution of the latency
    measurement is a tie too (:func:`within_noise` of the best candidate):
    among those, the smaller metric drop wins, then the smaller ``gzip_bytes``,
    then the steady value and the label. Failed and skipped
    candidates are never eligible; if nothing is eligible the winner is None
    and ``reasons`` says why for each candidate. ``among`` limits the winner to
    the candidates it accepts (e.g. those keeping the architecture) while every
    candidate still sets the per-format latency baselines.
    """
    metric = objective_metric(objective)
    budget = Budget.parse(max_accuracy_drop)
    candidates = list(candidates)
    names = {c.get("metric_name") for c in candidates if c.get("metric_name")}
    selection = Selection(
        objective=objective,
        metric=metric,
        max_accuracy_drop=budget.value,
        budget_metric=names.pop() if len(names) == 1 else None,
    )
    eligible = []
    for candidate in candidates:
        reason = why_not_eligible(candidate, max_accuracy_drop=budget, objective=objective)
        if reason:
            selection.reasons[candidate["recipe"]] = reason
        elif among is None or among(candidate):
            eligible.append(candidate)
    selection.within_budget = [c["recipe"] for c in eligible]
    if eligible:
        value = steady_objective(candidates, objective)
        best = min(eligible, key=lambda c: (value(c), -_rank(c), c["recipe"]))
        tied = [c for c in eligible if c is not best and within_noise(c, best, objective, value)]
        if tied:
            tied.append(best)
            # Noise cannot tell them apart on the objective: what can be told apart decides, the validation
            # split first (the test split is for the budget check, not for choosing), then the size.
            best = min(
                tied,
                key=lambda c: (_val_drop(c), -_rank(c), c.get("gzip_bytes") or math.inf, value(c), c["recipe"]),
            )
            selection.ties = sorted(c["recipe"] for c in tied)
        selection.winner = best["recipe"]
    selection.pareto = pareto_front(candidates, objective)
    selection.fronts = {metric: pareto_front(candidates, metric) for metric in OBJECTIVES.values()}
    return selection
