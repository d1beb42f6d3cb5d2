"""Choosing the winner: the accuracy budget, the objective, and the Pareto front.

Works on candidate records as :func:`kfopt.optimize.run_recipe` returns them
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

#: Slack for comparing an accuracy drop with the budget: drops are differences
#: of fractions of the test set, so 0.01 may come out as 0.010000000000000009.
_TOLERANCE = 1e-9


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

    def as_dict(self) -> dict:
        return {"objective": self.objective, "metric": self.metric, "max_accuracy_drop": self.max_accuracy_drop,
                "winner": self.winner, "pareto": list(self.pareto), "within_budget": list(self.within_budget),
                "reasons": dict(self.reasons)}


def check_goal(max_accuracy_drop: float, objective: str) -> str:
    """Validate a budget and an objective the user gave; return the objective's metric."""
    if not 0 <= max_accuracy_drop <= 1:
        raise KfoptError(f"max_accuracy_drop={max_accuracy_drop} is not a fraction between 0 and 1.",
                         "pass e.g. --max-accuracy-drop 0.01 for at most one percentage point.")
    return objective_metric(objective)


def objective_metric(objective: str) -> str:
    """The metric an objective minimises; a KfoptError naming the choices otherwise."""
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise KfoptError(
            f"Unknown objective '{objective}'.{did_you_mean(str(objective), OBJECTIVES)} "
            f"Valid objectives: {', '.join(OBJECTIVES)}.",
            "pass --objective size (smallest gzip_bytes) or --objective latency (lowest latency_p50_ms).",
        ) from None


def measured(candidate: dict, metric: str) -> bool:
    """True when the candidate finished and has both accuracy and ``metric``."""
    return candidate.get("status") == "ok" and candidate.get("accuracy") is not None and candidate.get(metric) is not None


def pareto_front(candidates: Iterable[dict], metric: str) -> list[str]:
    """Labels of measured candidates not dominated on (higher accuracy, lower ``metric``).

    A candidate is dominated when another is at least as good on both and
    strictly better on one; equal candidates do not dominate each other, so
    ties all stay on the front. Sorted by ``metric``, then accuracy (best first).
    """
    points = [c for c in candidates if measured(c, metric)]
    front = [c for c in points if not any(_dominates(other, c, metric) for other in points if other is not c)]
    front.sort(key=lambda c: (c[metric], -c["accuracy"], c["recipe"]))
    return [c["recipe"] for c in front]


def _dominates(a: dict, b: dict, metric: str) -> bool:
    return (a["accuracy"] >= b["accuracy"] and a[metric] <= b[metric]
            and (a["accuracy"] > b["accuracy"] or a[metric] < b[metric]))


def select(candidates: Iterable[dict], *, max_accuracy_drop: float = 0.01, objective: str = "size") -> Selection:
    """Pick the candidate with the best objective metric among those within the accuracy budget.

    Eligible: status ``ok`` and ``accuracy_drop <= max_accuracy_drop``. Ties on
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
        label = candidate["recipe"]
        status = candidate.get("status")
        if status != "ok":
            selection.reasons[label] = f"{status}: {candidate.get('reason') or 'no reason given'}"
        elif not measured(candidate, metric):
            selection.reasons[label] = f"not measured: has no {'accuracy' if candidate.get('accuracy') is None else metric}"
        elif candidate.get("accuracy_drop", 0.0) > max_accuracy_drop + _TOLERANCE:
            selection.reasons[label] = (f"accuracy drop {candidate['accuracy_drop']:.4f} is over the budget "
                                        f"{max_accuracy_drop:.4f}")
        else:
            eligible.append(candidate)
    selection.within_budget = [c["recipe"] for c in eligible]
    if eligible:
        best = min(eligible, key=lambda c: (c[metric], -c["accuracy"], c["recipe"]))
        selection.winner = best["recipe"]
    selection.pareto = pareto_front(candidates, metric)
    return selection


def apply_selection(result: dict, selection: Selection) -> dict:
    """Write a selection into a ``metrics.json``-shaped result (in place) and return it.

    Sets ``winner``, ``pareto`` and ``selection``, and marks each candidate
    with ``within_budget`` (and ``not_selected_because`` when it is out).
    """
    result["winner"] = selection.winner
    result["pareto"] = list(selection.pareto)
    result["selection"] = {k: v for k, v in selection.as_dict().items() if k not in ("winner", "pareto", "reasons")}
    for candidate in result.get("candidates", []):
        label = candidate["recipe"]
        candidate["within_budget"] = label in selection.within_budget
        if label in selection.reasons:
            candidate["not_selected_because"] = selection.reasons[label]
        else:
            candidate.pop("not_selected_because", None)
    return result
