"""Choosing the winner: the accuracy budget, the objective, and the Pareto front.

Works on candidate records as :func:`kfopt.engine.run_recipe` returns them
(``recipe``, ``status``, metrics), so the same logic serves ``kfopt run``, the
KFP ``select`` component and anything reading a ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
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


@dataclass
class Selection:
    """The outcome of :func:`select`.

    ``winner`` is the recipe label of the best candidate within the budget (or
    None), ``pareto`` the labels of the candidates no other candidate beats on
    both accuracy and the objective metric (best metric first), ``within_budget``
    the labels of eligible candidates, and ``reasons`` says for every other
    candidate why it was not eligible.
    """

    objective: str
    metric: str
    max_accuracy_drop: float
    winner: str | None = None
    pareto: list[str] = field(default_factory=list)
    within_budget: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    fronts: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "objective": self.objective,
            "metric": self.metric,
            "max_accuracy_drop": self.max_accuracy_drop,
            "winner": self.winner,
            "pareto": list(self.pareto),
            "within_budget": list(self.within_budget),
            "reasons": dict(self.reasons),
            "pareto_fronts": dict(self.fronts),
        }


def check_goal(max_accuracy_drop: float, objective: str) -> str:
    """Validate a budget and an objective the user gave; return the objective's metric."""
    if not 0 <= max_accuracy_drop <= 1:
        raise KfoptError(
            f"max_accuracy_drop={max_accuracy_drop} is not a fraction between 0 and 1.",
            "pass e.g. --max-accuracy-drop 0.01 for at most one percentage point.",
        )
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


def objective_value(record: dict, objective: str) -> float | None:
    """What ``objective`` minimises for one candidate, or None when it was not measured.

    ``size`` is ``gzip_bytes`` and ``latency`` is ``latency_p50_ms``. ``mix:W``
    is ``gzip_bytes^W * latency_p50_ms^(1-W)``: a weighted geometric mean, so
    halving the size is worth as much as halving the latency (at W = 0.5)
    whatever the units, and the ranking does not depend on a baseline.
    """
    if objective in OBJECTIVES:
        return record.get(OBJECTIVES[objective])
    weight = mix_weight(objective)
    if weight is None:
        objective_metric(objective)  # raises, naming the choices
    size, latency = record.get("gzip_bytes"), record.get("latency_p50_ms")
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


def _value(record: dict, key: str):
    """``key`` is an objective (size, latency, mix:W) or a plain metric name."""
    if key in OBJECTIVES or mix_weight(key) is not None:
        return objective_value(record, key)
    return record.get(key)


def measured(candidate: dict, key: str) -> bool:
    """True when the candidate finished and has both accuracy and ``key`` (a metric or an objective)."""
    return (
        candidate.get("status") == "ok" and candidate.get("accuracy") is not None and _value(candidate, key) is not None
    )


def pareto_front(candidates: Iterable[dict], key: str) -> list[str]:
    """Labels of measured candidates not dominated on (higher accuracy, lower ``key``).

    ``key`` is a metric (``gzip_bytes``) or an objective (``size``, ``mix:0.7``).
    A candidate is dominated when another is at least as good on both and
    strictly better on one; equal candidates do not dominate each other, so
    ties all stay on the front. Sorted by ``key``, then accuracy (best first).
    """
    points = [(c, _value(c, key)) for c in candidates if measured(c, key)]
    front = [(c, v) for c, v in points if not any(_dominates(o, ov, c, v) for o, ov in points if o is not c)]
    front.sort(key=lambda cv: (cv[1], -cv[0]["accuracy"], cv[0]["recipe"]))
    return [c["recipe"] for c, _ in front]


def _dominates(a: dict, a_value: float, b: dict, b_value: float) -> bool:
    return (
        a["accuracy"] >= b["accuracy"] and a_value <= b_value and (a["accuracy"] > b["accuracy"] or a_value < b_value)
    )


def why_not_eligible(candidate, *, max_accuracy_drop: float, objective: str) -> str | None:
    """Why ``candidate`` cannot win under this budget and objective, or None when it can.

    The one budget check of kfopt: :func:`select` and the promotion gate both use it.
    Eligible: status ``ok``, measured on the objective, ``accuracy_drop <=
    max_accuracy_drop`` (test split) and, when measured, ``val_accuracy_drop <=
    max_accuracy_drop`` (the split the search decides on).
    """
    status = candidate.get("status")
    if status != "ok":
        return f"{status}: {candidate.get('reason') or 'no reason given'}"
    if not measured(candidate, objective):
        return (
            f"not measured: has no {'accuracy' if candidate.get('accuracy') is None else objective_metric(objective)}"
        )
    drop = candidate.get("accuracy_drop") or 0.0
    if drop > max_accuracy_drop + TOLERANCE:
        return f"accuracy drop {drop:.4f} is over the budget {max_accuracy_drop:.4f}"
    val_drop = candidate.get("val_accuracy_drop") or 0.0
    if val_drop > max_accuracy_drop + TOLERANCE:
        # Chosen on validation, confirmed on test: a candidate the search would not have kept
        # is not made the winner because it happened to do well on the test split.
        return (
            f"accuracy drop {val_drop:.4f} on the validation split is over the budget "
            f"{max_accuracy_drop:.4f} (test split: {drop:.4f})"
        )
    return None


def select(candidates: Iterable[dict], *, max_accuracy_drop: float = 0.01, objective: str = "size") -> Selection:
    """Pick the candidate with the best objective metric among those within the accuracy budget.

    Eligible: status ``ok``, ``accuracy_drop <= max_accuracy_drop`` (test
    split) and, when measured, ``val_accuracy_drop <= max_accuracy_drop`` (the
    split the search decides on: a winner is within the budget on both). Ties on
    the metric go to the higher accuracy, then to the recipe label (so the
    choice never depends on the order candidates finished in). Failed and
    skipped candidates are never eligible; if nothing is eligible the winner
    is None and ``reasons`` says why for each candidate.
    """
    metric = objective_metric(objective)
    candidates = list(candidates)
    selection = Selection(objective=objective, metric=metric, max_accuracy_drop=float(max_accuracy_drop))
    eligible = []
    for candidate in candidates:
        reason = why_not_eligible(candidate, max_accuracy_drop=max_accuracy_drop, objective=objective)
        if reason:
            selection.reasons[candidate["recipe"]] = reason
        else:
            eligible.append(candidate)
    selection.within_budget = [c["recipe"] for c in eligible]
    if eligible:
        best = min(eligible, key=lambda c: (objective_value(c, objective), -c["accuracy"], c["recipe"]))
        selection.winner = best["recipe"]
    selection.pareto = pareto_front(candidates, objective)
    selection.fronts = {metric: pareto_front(candidates, metric) for metric in OBJECTIVES.values()}
    return selection
