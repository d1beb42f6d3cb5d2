"""Running a search in-process (``kfopt search``), and the round bookkeeping the pipeline shares with it.

:func:`search` runs round 1 (the search space) and the refinement rounds of
:func:`~kfopt.recipe_search.next_round`, sharing one baseline and one
:class:`~kfopt.evaluate.Evaluator`. The pipeline runs the same rounds as KFP
steps; both describe a search with :func:`search_settings`,
:func:`trace_entry` and :func:`search_outcome`, and count time with
:func:`optimization_seconds`.
"""

from __future__ import annotations

import os

from ..result import Candidate, RunResult
from ..rundir import slug
from ..select import OBJECTIVES, check_goal, objective_metric, select
from .proposals import check_stop_when_met, next_round, target_met
from .sensitivity import layer_sensitivity

#: Why a round-1 recipe was tried, and how a search that ran every round ended.
ROUND_ONE_WHY = "round 1: from the search space"
ALL_ROUNDS_DONE = "all rounds done"


def optimization_seconds(candidates: list[Candidate]) -> float:
    """Seconds spent optimizing the candidates: what ``max_time`` bounds (parallel or cached steps count fairly)."""
    return sum(c.seconds or 0 for c in candidates)


def search_outcome(settings: dict, candidates: list[Candidate], stopped: str | None) -> dict:
    """The ``search`` block of a result: ``settings``, why it stopped, what met the target, seconds spent."""
    hit = target_met(
        candidates,
        max_accuracy_drop=settings["max_accuracy_drop"],
        objective=settings["objective"],
        target=settings["target"],
    )
    return {
        **settings,
        "stopped": stopped,
        "target_met_by": hit["recipe"] if hit else None,
        "seconds": round(optimization_seconds(candidates), 1),
    }


def search_settings(
    *,
    rounds: int,
    max_trials: int,
    max_time: float | None,
    objective: str,
    max_accuracy_drop: float | str,
    target: float | None,
    stop_when_met: bool,
) -> dict:
    """The ``search`` block of a result: how the search was bounded, and which split decides what."""
    check_stop_when_met(stop_when_met, target)
    check_goal(max_accuracy_drop, objective)
    return {
        "rounds": rounds,
        "max_trials": max_trials,
        "max_time": max_time,
        "objective": objective,
        "max_accuracy_drop": max_accuracy_drop,
        "target": target,
        "stop_when_met": stop_when_met,
        "choices_use": "validation split (val_metric_drop)",
        "final_check_uses": "test split",
    }


def trace_entry(candidate: Candidate, objective: str) -> dict:
    """One line of the search trace: which round proposed the recipe, why, and what came of it."""
    objective_metric(objective)
    return {
        "round": candidate.round or 1,
        "recipe": candidate.recipe,
        "why": candidate.why or ROUND_ONE_WHY,
        "status": candidate.status,
        "val_accuracy_drop": candidate.val_accuracy_drop,
        "val_metric_drop": candidate.val_metric_drop,
        **{metric: candidate.get(metric) for metric in OBJECTIVES.values()},
    }


def best_of_round(result: RunResult, number: int) -> Candidate | None:
    """The winner :func:`~kfopt.select.select` would pick among one round's candidates (test split), for comparisons."""
    selection = result.selection or {}
    chosen = select(
        [c for c in result.candidates if c.round == number],
        max_accuracy_drop=selection.get("max_accuracy_drop", 0.01),
        objective=selection.get("objective", "size"),
    )
    return result.candidate(chosen.winner)


def search(
    model: str,
    data: str,
    out: str | os.PathLike,
    *,
    recipes: str | os.PathLike | list | None = None,
    rounds: int = 1,
    max_trials: int = 4,
    max_time: float | None = None,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    metric: str | None = None,
    output: str | int | None = None,
    target: float | None = None,
    stop_when_met: bool = False,
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    reporter=None,
    latency_runs: int | None = None,
    baseline=None,
    sensitivity: float | None = None,
) -> RunResult:
    """Round 1 (the search space ``recipes``), then up to ``rounds`` refinement rounds, in-process.

    One baseline and one Evaluator serve every round. ``max_trials`` caps the
    recipes of each refinement round, ``max_time`` (seconds of optimization,
    summed over candidates, as in the pipeline) stops starting refinements once
    spent; round 1 always runs. With ``stop_when_met`` the search ends as soon as a
    candidate within the budget (validation split) reaches ``target`` (a
    compression_ratio for size, a speedup for latency). The winner is picked
    over all rounds by :func:`kfopt.select.select`: within the budget on the
    validation split and confirmed on the test split. Writes
    ``metrics.json`` under ``out`` with a ``search_trace`` and returns it.
    ``baseline`` may be a ``(ModelHandle, Data)`` pair already prepared. With
    ``sensitivity`` (a sparsity), :func:`~kfopt.recipe_search.layer_sensitivity` of the
    baseline is added as ``layer_sensitivity`` and refinement keeps the most
    sensitive layers dense (or float under QAT), see :func:`~kfopt.recipe_search.propose`.
    """
    from ..data import describe
    from ..engine import finish_result, prepare, refuse_early, run_recipe, start_result
    from ..evaluate import LATENCY_RUNS, Evaluator
    from ..plugins.manager import registry
    from ..progress import Reporter
    from ..recipe import plan
    from ..rundir import locked
    from .space import load_search

    settings = search_settings(
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
        target=target,
        stop_when_met=stop_when_met,
    )
    reporter = reporter or Reporter(enabled=False)
    techniques = registry()
    if metric is not None:
        techniques.metric(metric)  # an unknown metric name fails before any work
    first = load_search(recipes, techniques)  # every recipe checked before any work
    with locked(out, "kfopt search", fresh=True, inputs=(model, data)) as out:
        handle, dataset = baseline or prepare(
            model,
            data,
            seed=seed,
            unsafe=unsafe,
            epochs=epochs,
            reporter=reporter,
            workdir=out,
            check=refuse_early([(r.recipe, r.planned) for r in first]),
        )
        handle.save(out / "baseline")
        evaluator = Evaluator(
            dataset,
            handle,
            out / "baseline",
            latency_runs=latency_runs or LATENCY_RUNS,
            metric=metric,
            metrics=techniques.metrics,
            output=output,
        )
        reporter.say("Measuring the baseline")
        result = start_result(model, describe(data), seed, handle, evaluator)
        result.search, result.search_trace = settings, []
        if sensitivity is not None and handle.format == "keras":
            reporter.say(
                f"Layer sensitivity: one layer at a time pruned to {sensitivity:.0%}, then its weights int8 "
                "(validation split)"
            )
            result.layer_sensitivity = layer_sensitivity(handle.keras(), dataset, sensitivity)
        trace, candidates = result.search_trace, result.candidates
        (out / "candidates").mkdir(exist_ok=True)
        stop = None

        def run_round(number: int, planned_recipes: list[tuple], whys: list[str]) -> None:
            nonlocal stop
            for (recipe, planned), why in zip(planned_recipes, whys):
                # Round 1 always runs in full.
                if number > 1 and max_time is not None and optimization_seconds(candidates) > max_time:
                    stop = stop or f"time budget of {max_time:g} s spent"
                    trace.append({"round": number, "recipe": recipe.label, "why": why, "status": "not run: " + stop})
                    continue
                reporter.say(f"[round {number}] {recipe.label}: {why}")
                candidate = run_recipe(
                    recipe,
                    planned,
                    handle,
                    dataset,
                    evaluator,
                    out / "candidates" / f"r{number}-{slug(recipe.label)}",
                    seed=seed,
                    reporter=reporter,
                )
                candidate.round, candidate.why = number, why
                candidates.append(candidate)
                trace.append(trace_entry(candidate, objective))
                result.save(out)  # partial results survive an interruption

        run_round(1, [(r.recipe, r.planned) for r in first], [ROUND_ONE_WHY] * len(first))
        for number in range(2, rounds + 2):
            if stop:
                break
            proposals, stop = next_round(
                candidates,
                number,
                max_accuracy_drop=max_accuracy_drop,
                objective=objective,
                max_trials=max_trials,
                target=target,
                stop_when_met=stop_when_met,
                elapsed=optimization_seconds(candidates),
                max_time=max_time,
                sensitivity=result.layer_sensitivity,
                techniques=techniques,
            )
            if stop:
                break
            recipes_of_round = [p.to_recipe() for p in proposals]
            run_round(number, [(r, plan(r, techniques)) for r in recipes_of_round], [p.why for p in proposals])
        result.search = search_outcome(settings, candidates, stop or ALL_ROUNDS_DONE)
        finish_result(result, evaluator, max_accuracy_drop=max_accuracy_drop, objective=objective)
        result.save(out)
        return result
