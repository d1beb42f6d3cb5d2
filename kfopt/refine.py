"""Accuracy-aware search: refine a round of candidates into more aggressive recipes.

Round 1 is the search file. Each later round looks at every candidate so far
and proposes a few recipes that push where the budget still has room:

- **prune, upward**: bisect ``target_sparsity`` between the highest sparsity
  that stayed inside the budget and the lowest one that did not (0.98 if
  none failed yet), keeping the rest of the chain (e.g. ``>quantize(int8)``);
- **distill, downward**: bisect ``width`` (geometrically) between the
  narrowest student inside the budget and the widest one outside (0.0625);
- **chains**: the best feasible student pruned to the best feasible sparsity
  then int8 (``distill>prune>quantize(int8)``), and the best feasible prune
  with quantization-aware training instead of post-training int8.

Every choice here ("inside the budget", "best") uses the **validation** split
(``val_accuracy_drop``) only; the test split is for the final budget check by
:func:`kfopt.select.select`, so the search does not overfit the test set.
Each proposal carries a ``why`` string, kept as the search trace.

:func:`search` runs round 1 and the refinement rounds in-process (``kfopt
search``), sharing one baseline and one :class:`~kfopt.evaluate.Evaluator`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import KfoptError
from .select import _TOLERANCE, apply_selection, objective_metric, select

#: Bisection bounds when no candidate has yet failed the budget on that side.
SPARSITY_CEILING = 0.98
WIDTH_FLOOR = 0.0625
#: Stop bisecting when the bracket is this narrow.
MIN_SPARSITY_STEP = 0.01
MIN_WIDTH_RATIO = 1.15

#: Objective name -> the ratio metric a --target-compression is compared with.
TARGET_METRICS = {"size": "compression_ratio", "latency": "speedup"}


@dataclass
class Proposal:
    """A recipe to try next (inline form) and why the search proposes it."""

    recipe: str
    why: str


# -- reading candidate records ---------------------------------------------------
def _steps(record: dict) -> list[tuple[str, dict]]:
    return [(s["technique"], dict(s.get("config") or {})) for s in record.get("steps") or []]


def val_feasible(record: dict, max_accuracy_drop: float) -> bool:
    """True when the candidate finished and its VALIDATION accuracy drop is within the budget."""
    drop = record.get("val_accuracy_drop")
    return record.get("status") == "ok" and drop is not None and drop <= max_accuracy_drop + _TOLERANCE


def _val_measured(record: dict) -> bool:
    return record.get("status") == "ok" and record.get("val_accuracy_drop") is not None


def best_feasible(records: list[dict], max_accuracy_drop: float, objective: str) -> dict | None:
    """The best candidate by the objective among those within the budget on the validation split."""
    metric = objective_metric(objective)
    feasible = [r for r in records if val_feasible(r, max_accuracy_drop) and r.get(metric) is not None]
    if not feasible:
        return None
    return min(feasible, key=lambda r: (r[metric], r["val_accuracy_drop"], r["recipe"]))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _inline(steps: list[tuple[str, dict]]) -> str:
    parts = []
    for name, config in steps:
        args = ",".join(f"{k}={_fmt(v)}" for k, v in config.items())
        parts.append(f"{name}({args})" if args else name)
    return ">".join(parts)


def _key(steps: list[dict]) -> str:
    return json.dumps(steps, sort_keys=True)


def _canonical(label: str, techniques) -> str:
    """A recipe in comparable form: its steps with every config value filled in (defaults too)."""
    from .recipe import parse_recipe, plan

    try:
        return _key([p.as_dict() for p in plan(parse_recipe([label]), techniques)])
    except Exception:
        return label


def _prune_config(config: dict, sparsity: float) -> dict:
    out = {"method": config.get("method", "magnitude"), "target_sparsity": round(sparsity, 3)}
    if config.get("epochs") is not None:
        out["epochs"] = config["epochs"]
    return out


def _distill_config(config: dict, width: float) -> dict:
    out = {"width": round(width, 4)}
    if config.get("epochs") is not None:
        out["epochs"] = config["epochs"]
    return out


def _minimal(name: str, config: dict) -> dict:
    """The config keys a proposal keeps from a step it copies (so proposals stay readable)."""
    if name == "prune":
        return _prune_config(config, config.get("target_sparsity", 0.5))
    if name == "distill":
        return _distill_config(config, config.get("width", 0.5))
    if name == "quantize":
        return {"mode": config.get("mode", "int8")}
    return config


def _family(record: dict, technique: str) -> tuple[int, dict] | None:
    """(index, config) of the record's first ``technique`` step (prune: magnitude/l1 only)."""
    for index, (name, config) in enumerate(_steps(record)):
        if name == technique:
            if technique == "prune" and config.get("method", "magnitude") == "structured":
                return None
            return index, config
    return None


def _drop(record: dict) -> str:
    return f"val drop {record['val_accuracy_drop'] * 100:+.2f} pt"


# -- proposing -----------------------------------------------------------------
def _bisect_prune(records, budget) -> Proposal | None:
    # Pure prune chains only: a distilled student prunes differently (the chains below cover it).
    pruned = [(r, _family(r, "prune")) for r in records if _val_measured(r) and _family(r, "distill") is None]
    pruned = [(r, found) for r, found in pruned if found is not None]
    feasible = [(r, f) for r, f in pruned if val_feasible(r, budget)]
    if not feasible:
        return None
    best, (index, config) = max(feasible, key=lambda rf: (rf[1][1].get("target_sparsity", 0), -rf[0]["val_accuracy_drop"]))
    low = float(config.get("target_sparsity", 0))
    above = [f[1].get("target_sparsity", 0) for r, f in pruned if not val_feasible(r, budget) and f[1].get("target_sparsity", 0) > low]
    high = min(above) if above else SPARSITY_CEILING
    if high - low < MIN_SPARSITY_STEP:
        return None
    middle = round((low + high) / 2, 3)
    steps = [(n, _minimal(n, c)) for n, c in _steps(best)]
    steps[index] = ("prune", _prune_config(config, middle))
    bound = (f"lowest sparsity over budget {high:g}" if above else f"nothing over budget yet, ceiling {high:g}")
    return Proposal(_inline(steps), f"bisect prune sparsity up from '{best['recipe']}' "
                                    f"(sparsity {low:g}, {_drop(best)}; {bound}): try {middle:g}")


def _bisect_distill(records, budget) -> Proposal | None:
    students = [(r, _family(r, "distill")) for r in records if _val_measured(r) and _family(r, "prune") is None]
    students = [(r, f) for r, f in students if f is not None and not f[1].get("student")]
    feasible = [(r, f) for r, f in students if val_feasible(r, budget)]
    if not feasible:
        return None
    best, (index, config) = min(feasible, key=lambda rf: (rf[1][1].get("width", 0.5), rf[0]["val_accuracy_drop"]))
    high = float(config.get("width", 0.5))
    below = [f[1].get("width", 0.5) for r, f in students if not val_feasible(r, budget) and f[1].get("width", 0.5) < high]
    low = max(below) if below else WIDTH_FLOOR
    if high / low < MIN_WIDTH_RATIO:
        return None
    middle = round(math.sqrt(low * high), 4)
    steps = [(n, _minimal(n, c)) for n, c in _steps(best)]
    steps[index] = ("distill", _distill_config(config, middle))
    bound = (f"widest student over budget {low:g}" if below else f"nothing over budget yet, floor {low:g}")
    return Proposal(_inline(steps), f"bisect distill width down from '{best['recipe']}' "
                                    f"(width {high:g}, {_drop(best)}; {bound}): try {middle:g}")


def _chains(records, budget) -> list[Proposal]:
    feasible = [r for r in records if val_feasible(r, budget)]
    prunes = [(r, _family(r, "prune")) for r in feasible if _family(r, "distill") is None]
    prunes = [(r, f) for r, f in prunes if f is not None]
    students = [(r, _family(r, "distill")) for r in feasible if _family(r, "prune") is None]
    students = [(r, f) for r, f in students if f is not None and not f[1].get("student")]
    out = []
    best_prune = max(prunes, key=lambda rf: (rf[1][1].get("target_sparsity", 0), -rf[0]["val_accuracy_drop"]), default=None)
    best_student = min(students, key=lambda rf: (rf[1][1].get("width", 0.5), rf[0]["val_accuracy_drop"]), default=None)
    if best_prune and best_student:
        p_cfg, d_cfg = best_prune[1][1], best_student[1][1]
        out.append(Proposal(
            _inline([("distill", _distill_config(d_cfg, d_cfg.get("width", 0.5))),
                     ("prune", _prune_config(p_cfg, p_cfg.get("target_sparsity", 0.5))),
                     ("quantize", {"mode": "int8"})]),
            f"combine families: narrowest feasible student '{best_student[0]['recipe']}' ({_drop(best_student[0])}) "
            f"pruned like '{best_prune[0]['recipe']}' ({_drop(best_prune[0])}), then int8"))
    if best_prune:
        p_cfg = best_prune[1][1]
        out.append(Proposal(
            _inline([("prune", _prune_config(p_cfg, p_cfg.get("target_sparsity", 0.5))), ("quantize", {"mode": "qat"})]),
            f"chain prune -> qat: '{best_prune[0]['recipe']}' ({_drop(best_prune[0])}) with quantization-aware "
            "training instead of post-training int8, to win back accuracy"))
    return out


def propose(records: list[dict], *, max_accuracy_drop: float = 0.01, objective: str = "size",
            max_trials: int = 4, tried: list[str] | None = None, sensitivity: list[dict] | None = None,
            techniques=None) -> list[Proposal]:
    """Recipes for the next round, most promising for ``objective`` first, at most ``max_trials``.

    ``records`` are candidate records (``metrics.json`` shape, with
    ``val_accuracy_drop``) of all rounds so far; ``tried`` are labels not to
    propose again (the labels of ``records`` always count as tried).
    ``sensitivity`` are :func:`layer_sensitivity` rows of the baseline. Only
    the validation split decides what is feasible or best.
    """
    objective_metric(objective)  # a bad objective fails here, with the choices
    if techniques is None:
        from .plugins.manager import registry

        techniques = registry()
    seen = {_key(r["steps"]) if r.get("steps") else r["recipe"] for r in records}
    seen |= {_canonical(t, techniques) for t in tried or []}
    prune, distill = _bisect_prune(records, max_accuracy_drop), _bisect_distill(records, max_accuracy_drop)
    # Sparsity shrinks gzip size but not dense-kernel latency; narrower students shrink both.
    ordered = [prune, distill] if objective == "size" else [distill, prune]
    ordered += _chains(records, max_accuracy_drop)
    out = []
    for proposal in ordered:
        if proposal is None or len(out) >= max_trials:
            continue
        key = _canonical(proposal.recipe, techniques)
        if key in seen:
            continue
        seen.add(key)
        out.append(proposal)
    return out


# -- layer sensitivity -----------------------------------------------------------
def layer_sensitivity(keras_model, data, sparsity: float = 0.9) -> list[dict]:
    """Prune one layer at a time (its smallest ``sparsity`` of kernel weights, no fine-tuning).

    Returns one row per layer with kernels: ``layer``, ``params`` (kernel
    weights), ``sparsity``, ``val_accuracy`` and ``val_accuracy_drop`` against
    the unpruned model, on the validation split. The caller's model is not
    changed (a copy is pruned). Most sensitive layer first.
    """
    import numpy as np

    from .models import copy_model
    from .plugins.prune import threshold_global

    x, y = data.validation.arrays()
    if not len(x):
        return []
    model = copy_model(keras_model)

    def val_accuracy() -> float:
        pred = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
        return float((pred.argmax(axis=1) == y).mean())

    base = val_accuracy()
    rows = []
    for layer in model.layers:
        kernels = [w for w in layer.trainable_weights if len(w.shape) >= 2]
        if not kernels:
            continue
        original = [k.numpy() for k in kernels]
        try:
            for kernel, value in zip(kernels, threshold_global(original, sparsity)):
                kernel.assign(value)
            accuracy = val_accuracy()
        finally:
            for kernel, value in zip(kernels, original):
                kernel.assign(value)
        rows.append({"layer": layer.name, "params": int(sum(v.size for v in original)), "sparsity": sparsity,
                     "val_accuracy": accuracy, "val_accuracy_drop": base - accuracy})
    rows.sort(key=lambda r: (-r["val_accuracy_drop"], r["layer"]))
    return rows


def sensitivity_table(rows: list[dict]):
    """Layer sensitivity rows as a rich Table."""
    from rich.table import Table

    sparsity = rows[0]["sparsity"] if rows else 0
    table = Table(title=f"Layer sensitivity: one layer pruned to {sparsity:.0%}, no fine-tuning (validation split)")
    for col in ("layer", "kernel params", "val accuracy", "val drop"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in rows:
        table.add_row(row["layer"], f"{row['params']:,}", f"{row['val_accuracy']:.4f}", f"{row['val_accuracy_drop'] * 100:+.2f} pt")
    return table


# -- the in-process search -------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80]


def target_met(records: list[dict], *, max_accuracy_drop: float, objective: str, target: float | None) -> dict | None:
    """A candidate within the budget (validation split) whose ratio metric reaches ``target``, or None."""
    if target is None:
        return None
    metric = TARGET_METRICS[objective]
    hits = [r for r in records if val_feasible(r, max_accuracy_drop) and (r.get(metric) or 0) >= target]
    return max(hits, key=lambda r: r[metric], default=None)


def search_settings(*, rounds: int, max_trials: int, max_time: float | None, objective: str,
                    max_accuracy_drop: float, target: float | None, stop_when_met: bool) -> dict:
    """The ``search`` block of a result: how the search was bounded, and which split decides what."""
    if stop_when_met and target is None:
        raise KfoptError("--stop-when-met needs a target.", "pass --target-compression X as well, or drop --stop-when-met.")
    objective_metric(objective)
    return {"rounds": rounds, "max_trials": max_trials, "max_time": max_time, "objective": objective,
            "max_accuracy_drop": max_accuracy_drop, "target": target, "stop_when_met": stop_when_met,
            "choices_use": "validation split (val_accuracy_drop)", "final_check_uses": "test split"}


def trace_entry(candidate: dict, objective: str) -> dict:
    """One line of the search trace: which round proposed the recipe, why, and what came of it."""
    metric = objective_metric(objective)
    return {"round": candidate.get("round", 1), "recipe": candidate["recipe"],
            "why": candidate.get("why") or "round 1: from the search space", "status": candidate["status"],
            "val_accuracy_drop": candidate.get("val_accuracy_drop"), metric: candidate.get(metric)}


def next_round(records: list[dict], number: int, *, max_accuracy_drop: float = 0.01, objective: str = "size",
               max_trials: int = 4, target: float | None = None, stop_when_met: bool = False,
               elapsed: float | None = None, max_time: float | None = None, sensitivity: list[dict] | None = None,
               techniques=None) -> tuple[list[Proposal], str | None]:
    """The recipes of refinement round ``number`` (2, 3, ...), or why the search stops here.

    One decision shared by the in-process search and the pipeline's propose
    step: stop when ``stop_when_met`` and a candidate reached ``target`` (on the
    validation split), when ``elapsed`` seconds passed ``max_time``, or when
    :func:`propose` finds nothing left to refine. Returns ``(proposals, None)``
    or ``([], reason)``.
    """
    if stop_when_met and target is None:
        raise KfoptError("--stop-when-met needs a target.", "pass --target-compression X as well, or drop --stop-when-met.")
    hit = target_met(records, max_accuracy_drop=max_accuracy_drop, objective=objective, target=target)
    if stop_when_met and hit:
        metric = TARGET_METRICS[objective]
        return [], f"target {target:g}x met by '{hit['recipe']}' ({metric} {hit[metric]:.1f}x)"
    if max_time is not None and elapsed is not None and elapsed > max_time:
        return [], f"time budget of {max_time:g} s spent"
    proposals = propose(records, max_accuracy_drop=max_accuracy_drop, objective=objective, max_trials=max_trials,
                        sensitivity=sensitivity, techniques=techniques)
    if not proposals:
        return [], f"round {number}: nothing left to refine"
    return proposals, None


def search(model: str, data: str, out: str | os.PathLike, *, recipes: str | os.PathLike | list | None = None,
           rounds: int = 1, max_trials: int = 4, max_time: float | None = None, max_accuracy_drop: float = 0.01,
           objective: str = "size", target: float | None = None, stop_when_met: bool = False, seed: int = 0,
           epochs: int = 40, unsafe: bool = False, reporter=None, latency_runs: int | None = None,
           baseline=None, sensitivity: float | None = None) -> dict:
    """Round 1 (the search space ``recipes``), then up to ``rounds`` refinement rounds, in-process.

    One baseline and one Evaluator serve every round. ``max_trials`` caps the
    recipes of each refinement round, ``max_time`` (seconds) stops starting new
    recipes once spent. With ``stop_when_met`` the search ends as soon as a
    candidate within the budget (validation split) reaches ``target`` (a
    compression_ratio for size, a speedup for latency). The winner is picked
    over all rounds by :func:`kfopt.select.select` on the test split. Writes
    ``metrics.json`` under ``out`` with a ``search_trace`` and returns it.
    ``baseline`` may be a ``(ModelHandle, Data)`` pair already prepared. With
    ``sensitivity`` (a sparsity), :func:`layer_sensitivity` of the baseline is
    added as ``layer_sensitivity`` (informational: refinement does not use it yet).
    """
    from .evaluate import LATENCY_RUNS, Evaluator
    from .optimize import METRICS_FILE, prepare, run_recipe, writable_dir, write_json
    from .plugins.manager import registry
    from .progress import Reporter
    from .recipe import parse_recipe, plan
    from .search import load_search

    settings = search_settings(rounds=rounds, max_trials=max_trials, max_time=max_time, objective=objective,
                               max_accuracy_drop=max_accuracy_drop, target=target, stop_when_met=stop_when_met)
    reporter = reporter or Reporter(enabled=False)
    techniques = registry()
    first = load_search(recipes, techniques)  # every recipe checked before any work
    out = writable_dir(out)
    started = time.perf_counter()
    handle, dataset = baseline or prepare(model, data, seed=seed, unsafe=unsafe, epochs=epochs, reporter=reporter, workdir=out)
    handle.save(out / "baseline")
    evaluator = Evaluator(dataset, handle, out / "baseline", latency_runs=latency_runs or LATENCY_RUNS)
    reporter.say("Measuring the baseline")
    result = {"model": model, "data": data, "seed": seed,
              "baseline": {"artifact": str(handle.path), **evaluator.baseline_metrics()},
              "candidates": [], "winner": None, "pareto": [], "registered_model": None,
              "search": settings,
              "search_trace": []}
    if sensitivity is not None and handle.format == "keras":
        reporter.say(f"Layer sensitivity: pruning one layer at a time to {sensitivity:.0%}")
        result["layer_sensitivity"] = layer_sensitivity(handle.keras(), dataset, sensitivity)
    trace, candidates = result["search_trace"], result["candidates"]
    (out / "candidates").mkdir(exist_ok=True)
    stop = None

    def run_round(number: int, planned_recipes: list[tuple], whys: list[str]) -> None:
        nonlocal stop
        for (recipe, planned), why in zip(planned_recipes, whys):
            if max_time is not None and time.perf_counter() - started > max_time:
                stop = stop or f"time budget of {max_time:g} s spent"
                trace.append({"round": number, "recipe": recipe.label, "why": why, "status": "not run: " + stop})
                continue
            reporter.say(f"[round {number}] {recipe.label}: {why}")
            candidate = run_recipe(recipe, planned, handle, dataset, evaluator,
                                   out / "candidates" / f"r{number}-{_slug(recipe.label)}", seed=seed, reporter=reporter)
            candidate.update(round=number, why=why)
            candidates.append(candidate)
            trace.append(trace_entry(candidate, objective))
            write_json(out / METRICS_FILE, result)  # partial results survive an interruption

    run_round(1, [(r.recipe, r.planned) for r in first], ["round 1: from the search space"] * len(first))
    for number in range(2, rounds + 2):
        if stop:
            break
        proposals, stop = next_round(candidates, number, max_accuracy_drop=max_accuracy_drop, objective=objective,
                                     max_trials=max_trials, target=target, stop_when_met=stop_when_met,
                                     elapsed=time.perf_counter() - started, max_time=max_time,
                                     sensitivity=result.get("layer_sensitivity"), techniques=techniques)
        if stop:
            break
        planned_recipes = []
        for proposal in proposals:
            parsed = parse_recipe([proposal.recipe])
            planned_recipes.append((parsed, plan(parsed, techniques)))
        run_round(number, planned_recipes, [p.why for p in proposals])
    result["search"]["stopped"] = stop or "all rounds done"
    hit = target_met(candidates, max_accuracy_drop=max_accuracy_drop, objective=objective, target=target)
    result["search"]["target_met_by"] = hit["recipe"] if hit else None
    result["search"]["seconds"] = round(time.perf_counter() - started, 1)
    result["baseline"]["references"] = evaluator.references
    apply_selection(result, select(candidates, max_accuracy_drop=max_accuracy_drop, objective=objective))
    write_json(out / METRICS_FILE, result)
    return result


def best_of_round(result: dict, number: int) -> dict | None:
    """The winner :func:`select` would pick among one round's candidates (test split), for comparisons."""
    selection = result.get("selection") or {}
    chosen = select([c for c in result["candidates"] if c.get("round") == number],
                    max_accuracy_drop=selection.get("max_accuracy_drop", 0.01), objective=selection.get("objective", "size"))
    return next((c for c in result["candidates"] if c["recipe"] == chosen.winner), None)


def search_table(result: dict):
    """The candidates of every round, with their round and validation drop, as a rich Table."""
    from rich.table import Table

    table = Table(title=f"kfopt search: {result.get('model')} on {result.get('data')} "
                        f"(winner chosen on the test split; refinement chose on validation)")
    for col in ("round", "recipe", "status", "val drop", "test drop", "accuracy", "KB gz", "compression", "p50 ms", "speedup", "s"):
        table.add_column(col, justify="left" if col in ("recipe", "status") else "right")
    for c in result["candidates"]:
        if c["status"] != "ok":
            table.add_row(str(c.get("round", "")), c["recipe"], f"{c['status']}: {(c.get('reason') or '')[:50]}",
                          *[""] * 7, f"{c.get('seconds', 0):.0f}")
            continue
        mark = "* " if c["recipe"] == result.get("winner") else ""  # in front: long labels are cut at the end
        val = c.get("val_accuracy_drop")
        table.add_row(str(c.get("round", "")), mark + c["recipe"], "ok" if c.get("within_budget") else "over budget",
                      "-" if val is None else f"{val * 100:+.2f} pt", f"{c['accuracy_drop'] * 100:+.2f} pt",
                      f"{c['accuracy']:.4f}", f"{c['gzip_bytes'] / 1024:,.1f}", f"{c['compression_ratio']:.1f}x",
                      f"{c['latency_p50_ms']:.4f}", f"{c['speedup']:.2f}x", f"{c.get('seconds', 0):.0f}")
    return table
