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
import time

from ..result import Candidate, RunResult
from ..rundir import slug
from ..select import OBJECTIVES, check_goal, objective_metric, select
from .proposals import (
    Defaults,
    Proposal,
    accepts_channels,
    channel_proposal,
    check_stop_when_met,
    next_round,
    target_met,
)
from .sensitivity import layer_sensitivity

#: Why a round-1 recipe was tried, and how a search that ran every round ended.
ROUND_ONE_WHY = "round 1: from the search space"
ALL_ROUNDS_DONE = "all rounds done"
#: Without --rounds: refine while a round gains (proposals.MIN_GAIN), at most this many refinement rounds.
AUTO_ROUNDS = 8
#: Without --time-budget (and without --rounds): the whole search may take this many times the wall seconds
#: it took up to the end of round 1, and at least TIME_BUDGET_FLOOR seconds. On the digits demos round 1
#: ends after ~35-60 s on 2 cores, so refinement gets a few rounds and the demo stays under 3 minutes;
#: a bigger model's budget grows with its round 1.
TIME_BUDGET_FACTOR = 3.0
TIME_BUDGET_FLOOR = 120.0


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
    rounds: int | None,
    max_trials: int,
    max_time: float | None,
    objective: str,
    max_accuracy_drop: float | str,
    target: float | None,
    stop_when_met: bool,
    time_budget: float | None = None,
    until_no_gain: bool | None = None,
) -> dict:
    """The ``search`` block of a result: how the search was bounded, and which split decides what.

    ``rounds`` None: refine until a round stops gaining (``until_no_gain``), at
    most :data:`AUTO_ROUNDS` rounds, within ``time_budget`` wall seconds (None:
    :func:`default_time_budget`). A number of rounds runs them all unless
    nothing is left to refine (or ``max_time``/``time_budget`` is spent), or,
    with ``until_no_gain`` True (a pipeline compiled with a cap of rounds), until
    a round stops gaining.
    """
    check_stop_when_met(stop_when_met, target)
    check_goal(max_accuracy_drop, objective)
    return {
        "rounds": AUTO_ROUNDS if rounds is None else rounds,
        "until_no_gain": rounds is None if until_no_gain is None else until_no_gain,
        "time_budget": time_budget,
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


def default_time_budget(round_one_seconds: float) -> float:
    """The wall seconds a search without ``--time-budget`` may take: :data:`TIME_BUDGET_FACTOR` times the seconds
    up to the end of round 1 (baseline, layer sensitivity, the search space), at least :data:`TIME_BUDGET_FLOOR`."""
    return max(TIME_BUDGET_FLOOR, TIME_BUDGET_FACTOR * round_one_seconds)


def estimated_seconds(steps: list[dict], candidates: list[Candidate]) -> float:
    """How long a recipe of planned ``steps`` (``PlannedStep.as_dict()``) will take, from the candidates so far.

    Among candidates with the same techniques in the same order: the slowest
    one that fine-tuned as many epochs; else the ones nearest in epochs, scaled
    by the epochs (which dominate; scaling from far away overestimates, as
    converting and measuring do not scale). Else the slowest candidate so far
    (0 when none ran).
    """
    shape = [s["technique"] for s in steps]
    timed = [c for c in candidates if c.seconds is not None]
    alike = [c for c in timed if [s["technique"] for s in c.steps or []] == shape]
    if not alike:
        return max((c.seconds for c in timed), default=0.0)
    want = _epochs(steps)
    nearest = min(abs(_epochs(c.steps) - want) for c in alike)
    alike = [c for c in alike if abs(_epochs(c.steps) - want) == nearest]
    return max(c.seconds * (want / _epochs(c.steps) if want and _epochs(c.steps) else 1.0) for c in alike)


def _epochs(steps: list[dict]) -> int:
    """Fine-tuning epochs of planned steps (a quantize step's epochs count under QAT only)."""
    total = 0
    for step in steps:
        config = step.get("config") or {}
        if step.get("technique") == "quantize" and config.get("mode") != "qat":
            continue
        total += int(config.get("epochs") or 0)
    return total


def keeps_architecture(record, techniques=None) -> bool:
    """True when no step of the candidate replaces the model by one of another architecture.

    Pruning (channels too), quantization, compilation and a width-scaled
    student (``distill(architecture=same)``: the user's layers, narrower) keep
    it; a dense student (``architecture=dense``) or a student from a file does not.
    """
    defaults = Defaults(techniques) if techniques is not None else None
    for step in record.get("steps") or []:
        if step.get("technique") != "distill":
            continue
        config = step.get("config") or {}
        architecture = config.get("architecture") or (defaults("distill", "architecture") if defaults else "same")
        if architecture != "same" or config.get("student"):
            return False
    return True


def best_same_architecture(candidates: list[Candidate], *, max_accuracy_drop, objective: str, techniques=None):
    """The recipe :func:`~kfopt.select.select` picks among the candidates that keep the user's architecture
    (:func:`keeps_architecture`), or None: what the report shows beside an overall winner that is a dense student."""

    def keeps(candidate) -> bool:
        return keeps_architecture(candidate, techniques)

    overall = select(candidates, max_accuracy_drop=max_accuracy_drop, objective=objective)
    winner = next((c for c in candidates if c["recipe"] == overall.winner), None)
    if winner is not None and keeps(winner):
        return winner["recipe"]  # the winner itself keeps it: never name another model beside it
    # Among all candidates, so the latency baselines are the same ones the winner was ranked on.
    return select(candidates, max_accuracy_drop=max_accuracy_drop, objective=objective, among=keeps).winner


def channel_recipes(keras_model, objective: str, techniques) -> list[Proposal]:
    """Round-1 channel pruning for ``latency`` or ``mix`` on a model with Conv2D layers (one proposal), else none.

    None for other objectives, models without convolutions, or a ``prune``
    that has no ``method=channels`` (an older kfopt or a replaced plugin).
    """
    if not objective.startswith(("latency", "mix")) or not accepts_channels(techniques):
        return []
    if not any(type(layer).__name__ in ("Conv2D", "DepthwiseConv2D") for layer in _layers(keras_model)):
        return []
    why = (
        f"round 1: channel pruning for {objective} on a conv model: fewer filters run faster on any runtime and "
        "keep the architecture"
    )
    return [channel_proposal(techniques, why)]


def _layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _layers(layer) if hasattr(layer, "layers") else ()


def search(
    model: str,
    data: str,
    out: str | os.PathLike,
    *,
    recipes: str | os.PathLike | list | None = None,
    rounds: int | None = None,
    max_trials: int = 4,
    max_time: float | None = None,
    time_budget: float | None = None,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    metric: str | None = None,
    target: float | None = None,
    stop_when_met: bool = False,
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    reporter=None,
    latency_runs: int | None = None,
    baseline=None,
    sensitivity: float | None = None,
    output: str | int | None = None,
) -> RunResult:
    """Round 1 (the search space ``recipes``), then refinement rounds, in-process.

    ``rounds`` None (the default): refine while a round improves the best
    candidate within budget by more than ``MIN_GAIN`` (validation split), at
    most :data:`AUTO_ROUNDS` rounds, within ``time_budget`` wall seconds for the
    whole search (None: :func:`default_time_budget` of the time round 1 took). A
    refinement recipe starts only when its estimated time
    (:func:`estimated_seconds`) fits in what is left. ``rounds`` N: N refinement
    rounds (fewer when nothing is left to refine, or ``time_budget`` if given is
    spent). ``max_trials`` caps the recipes of each refinement round,
    ``max_time`` (seconds of optimization, summed over candidates, as in the
    pipeline) stops starting refinements once spent; round 1 always runs. With
    ``stop_when_met`` the search ends as soon as a candidate within the budget
    (validation split) reaches ``target`` (a compression_ratio for size, a
    speedup for latency). For ``latency`` or ``mix`` on a conv model, the
    built-in search space also gets channel pruning in round 1. The winner is
    picked over all rounds by :func:`kfopt.select.select`: within the budget on
    the validation split and confirmed on the test split; ``best_same_architecture``
    names the best candidate that keeps the user's architecture. Writes
    ``metrics.json`` under ``out`` with a ``search_trace`` and returns it.
    ``baseline`` may be a ``(ModelHandle, Data)`` pair already prepared. With
    ``sensitivity`` (a sparsity), :func:`~kfopt.recipe_search.layer_sensitivity` of the
    baseline (in the run's metric) is added as ``layer_sensitivity`` and refinement
    keeps the most sensitive layers dense (or float under QAT), see
    :func:`~kfopt.recipe_search.propose`.
    """
    from ..data import describe
    from ..engine import finish_result, prepare, refuse_early, run_recipe, start_result
    from ..evaluate import LATENCY_RUNS, Evaluator
    from ..plugins.manager import registry
    from ..progress import Reporter
    from ..recipe import plan
    from ..rundir import clear_run, locked
    from ..select import check_budget
    from .space import load_search

    started = time.perf_counter()
    settings = search_settings(
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
        target=target,
        stop_when_met=stop_when_met,
        time_budget=time_budget,
    )
    reporter = reporter or Reporter(enabled=False)
    techniques = registry()
    if metric is not None:
        techniques.metric(metric)  # an unknown metric name fails before any work
    first = load_search(recipes, techniques)  # every recipe checked before any work
    # The earlier run in ``out`` is replaced only once the model and data loaded: a wrong path loses nothing.
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
        clear_run(out)
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
        check_budget(max_accuracy_drop, evaluator.metric)
        reporter.say("Measuring the baseline")
        result = start_result(model, describe(data), seed, handle, evaluator)
        result.search, result.search_trace = settings, []
        if sensitivity is not None and handle.format == "keras":
            reporter.say(
                f"Layer sensitivity: one layer at a time pruned to {sensitivity:.0%}, then its weights int8 "
                f"(validation split, {evaluator.metric.name})"
            )
            result.layer_sensitivity = layer_sensitivity(
                handle.keras(),
                dataset,
                sensitivity,
                task=evaluator.task,
                metric=evaluator.metric,
                output=getattr(evaluator, "output", None),
            )
        trace, candidates = result.search_trace, result.candidates
        (out / "candidates").mkdir(exist_ok=True)
        stop = None
        budget = time_budget

        def run_round(number: int, planned_recipes: list[tuple], whys: list[str]) -> None:
            nonlocal stop
            for (recipe, planned), why in zip(planned_recipes, whys):
                # Round 1 always runs in full.
                if number > 1 and not stop and max_time is not None and optimization_seconds(candidates) > max_time:
                    stop = f"time budget of {max_time:g} s spent"
                if number > 1 and not stop and budget is not None:
                    steps = [p.as_dict() for p in planned]
                    elapsed, estimate = time.perf_counter() - started, estimated_seconds(steps, candidates)
                    if elapsed + estimate > budget:
                        stop = (
                            f"time budget of {budget:g} s: {elapsed:.0f} s spent, '{recipe.label}' would take "
                            f"~{estimate:.0f} s more"
                        )
                if stop:
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

        round_one = [(r.recipe, r.planned) for r in first]
        whys = [ROUND_ONE_WHY] * len(first)
        if recipes is None and handle.format == "keras":  # the built-in space: channels where they can pay off
            for proposal in channel_recipes(handle.keras(), objective, techniques):
                recipe = proposal.to_recipe()
                round_one.append((recipe, plan(recipe, techniques)))
                whys.append(proposal.why)
        run_round(1, round_one, whys)
        if rounds is None and budget is None:
            budget = round(default_time_budget(time.perf_counter() - started), 1)
            settings["time_budget"] = budget
        for number in range(2, settings["rounds"] + 2):
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
                until_no_gain=settings["until_no_gain"],
            )
            if stop:
                break
            recipes_of_round = [p.to_recipe() for p in proposals]
            run_round(number, [(r, plan(r, techniques)) for r in recipes_of_round], [p.why for p in proposals])
        result.search = search_outcome(settings, candidates, stop or ALL_ROUNDS_DONE)
        result.search["wall_seconds"] = round(time.perf_counter() - started, 1)
        finish_result(result, evaluator, max_accuracy_drop=max_accuracy_drop, objective=objective)
        result.best_same_architecture = best_same_architecture(
            candidates, max_accuracy_drop=max_accuracy_drop, objective=objective, techniques=techniques
        )
        result.save(out)
        return result
