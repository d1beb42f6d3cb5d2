"""Accuracy-aware search: refine a round of candidates into more aggressive recipes.

Round 1 is the search file. Each later round looks at every candidate so far
and proposes a few recipes that push where the budget still has room:

- **prune, upward**: bisect ``target_sparsity`` between the highest sparsity
  that stayed inside the budget and the lowest one that did not (0.98 if
  none failed yet), keeping the rest of the chain (e.g. ``>quantize(int8)``);
- **distill, downward**: bisect ``width`` (geometrically) between the
  narrowest student inside the budget and the widest one outside (0.0625),
  separately for each student architecture (``same``: the teacher's layers
  narrowed; ``dense``: a Flatten + Dense MLP, whose widths mean something else;
  dense students only while their best beats the best width-scaled one);
- **a dense student** (``distill(architecture=dense,width=DENSE_WIDTH)>quantize(int8)``),
  once, when width-scaled students were tried (for latency; for size: one is
  within the budget): TFLite conv ops cost
  a fixed per-op overhead whatever their width (int8 demo:cnn students bottom
  out at ~7.7 us beside an 18.6 us fp32 baseline), while a couple of fully
  connected ops run in ~1-2 us. First for latency, last for size;
- **chains**: the best feasible student pruned to the best feasible sparsity
  then int8 (``distill>prune>quantize(int8)``), and the best feasible prune
  with quantization-aware training instead of post-training int8;
- **sensitive layers** (with :func:`layer_sensitivity` rows): keep the layers
  whose pruning alone costs more than the budget dense (the densest in val
  drop per kernel param first, together at most ``KEEP_SHARE`` of the kernel
  params) and prune the rest beyond the bisection bracket, to its upper end
  (``prune(keep_dense=[...])``); each such set is then bisected like plain
  pruning. Layers whose int8 weights alone cost more than the budget stay float
  under QAT (``quantize(mode=qat,float_layers=[...])``) in the most compressed
  chain over budget;
- **longer fine-tuning**: a chain over budget by at most ``LONGER_MAX_DROP``
  budgets that fine-tuned for fewer epochs than its techniques' defaults is
  retried at the defaults (the built-in search space uses short fine-tuning).
  Every proposal fine-tunes for at least the defaults, for the same reason.

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
from dataclasses import dataclass

from .errors import KfoptError
from .select import (
    _TOLERANCE,
    OBJECTIVES,
    apply_selection,
    check_goal,
    objective_metric,
    objective_ratio,
    objective_value,
    select,
)

#: Bisection bounds when no candidate has yet failed the budget on that side.
SPARSITY_CEILING = 0.98
WIDTH_FLOOR = 0.0625
#: Stop bisecting when the bracket is this narrow.
MIN_SPARSITY_STEP = 0.01
MIN_WIDTH_RATIO = 1.15
#: Width of the first dense (Flatten + Dense) student: hidden layers as wide as the teacher's widest layer.
DENSE_WIDTH = 1.0

#: Sensitive layers kept dense (or float) together hold at most this share of the kernel params.
#: demo:cnn: keeping its output Dense and first Conv (1.4%) dense let the big Dense go to 98%
#: (31.6x); adding the second Conv (8%) as well left it at 18.8x, below plain 94% pruning.
KEEP_SHARE = 0.05
#: Only a chain over budget by at most this many budgets is retried with longer fine-tuning.
LONGER_MAX_DROP = 2.0


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
    feasible = [r for r in records if val_feasible(r, max_accuracy_drop) and objective_value(r, objective) is not None]
    if not feasible:
        return None
    return min(feasible, key=lambda r: (objective_value(r, objective), r["val_accuracy_drop"], r["recipe"]))


def _fmt(value) -> str:
    from .recipe import _format_value

    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return _format_value(value)


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


def _prune_config(config: dict, sparsity: float, keep: tuple[str, ...] | None = None) -> dict:
    """A prune step at ``sparsity``, keeping ``keep`` dense (default: the layers ``config`` keeps dense)."""
    out = {"method": config.get("method", "magnitude"), "target_sparsity": round(sparsity, 3)}
    if config.get("epochs") is not None:
        out["epochs"] = config["epochs"]
    keep = _keep(config) if keep is None else keep
    if keep:
        out["keep_dense"] = list(keep)
    return out


def _keep(config: dict) -> tuple[str, ...]:
    return tuple(sorted(config.get("keep_dense") or ()))


def _architecture(config: dict) -> str:
    return config.get("architecture") or "same"


def _distill_config(config: dict, width: float) -> dict:
    architecture = _architecture(config)
    out = {"architecture": architecture} if architecture != "same" else {}
    out["width"] = round(width, 4)
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
        floats = sorted(config.get("float_layers") or ())
        return {"mode": config.get("mode", "int8"), **({"float_layers": floats} if floats else {})}
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
def _sparsity(config: dict) -> float:
    return float(config.get("target_sparsity", 0))


def _prune_runs(records) -> list[tuple[dict, int, dict]]:
    """(record, index, config) of the val-measured prune chains without distillation (magnitude/l1 only)."""
    # A distilled student prunes differently: the chains below cover it.
    runs = [(r, _family(r, "prune")) for r in records if _val_measured(r) and _family(r, "distill") is None]
    return [(r, *found) for r, found in runs if found is not None]


def _bracket(records, budget, keep: tuple[str, ...] = ()):
    """The prune bisection bracket of the ``keep_dense`` set ``keep``: ``(best run, low, high, high's origin)``.

    ``low`` is the highest val-feasible sparsity, ``high`` the lowest sparsity
    over budget above it (fine-tuned at least as long) or the ceiling. Keeping
    layers dense only makes pruning easier, so a feasible plain prune bounds a
    ``keep`` set from below too. None when nothing is feasible.
    """
    runs = _prune_runs(records)
    feasible = [run for run in runs if val_feasible(run[0], budget) and _keep(run[2]) in {keep, ()}]
    if not feasible:
        return None
    best = max(feasible, key=lambda run: (_sparsity(run[2]), _keep(run[2]) == keep, -run[0]["val_accuracy_drop"]))
    low, epochs = _sparsity(best[2]), best[2].get("epochs") or 0
    above = [
        _sparsity(c)
        for r, _, c in runs
        if _keep(c) == keep and not val_feasible(r, budget) and _sparsity(c) > low and (c.get("epochs") or 0) >= epochs
    ]
    high = min(above, default=SPARSITY_CEILING)
    return (
        best,
        low,
        high,
        (f"lowest sparsity over budget {high:g}" if above else f"nothing over budget yet, ceiling {high:g}"),
    )


def _bisect_prune(records, budget, keep: tuple[str, ...] = ()) -> Proposal | None:
    bracket = _bracket(records, budget, keep)
    if bracket is None or bracket[2] - bracket[1] < MIN_SPARSITY_STEP:
        return None
    (best, index, config), low, high, bound = bracket
    middle = round((low + high) / 2, 3)
    steps = [(n, _minimal(n, c)) for n, c in _steps(best)]
    steps[index] = ("prune", _prune_config(config, middle, keep))
    kept = f" with keep_dense=[{','.join(keep)}]" if keep else ""
    return Proposal(
        _inline(steps),
        f"bisect prune sparsity up{kept} from '{best['recipe']}' "
        f"(sparsity {low:g}, {_drop(best)}; {bound}): try {middle:g}",
    )


def _sensitive_layers(rows, key: str, budget: float) -> list[dict]:
    """Rows whose ``key`` (a val drop with that layer alone changed) exceeds the budget, kept within KEEP_SHARE.

    The layers saving the most accuracy per kernel param come first.
    """
    total = sum(r["params"] for r in rows)
    chosen, share = [], 0
    for row in sorted(rows, key=lambda r: (-(r.get(key) or 0) / max(r["params"], 1), r["layer"])):
        if (row.get(key) or 0) > budget + _TOLERANCE and share + row["params"] <= KEEP_SHARE * total:
            chosen.append(row)
            share += row["params"]
    return chosen


def _layer_list(rows, key: str, what: str) -> str:
    return ", ".join(f"{r['layer']} ({r['params']:,} params, val drop {r[key] * 100:+.2f} pt {what})" for r in rows)


def _keep_sensitive_dense(records, budget, sensitivity) -> Proposal | None:
    """Keep the most prune-sensitive layers dense and prune the rest to the upper end of the bracket."""
    rows = _sensitive_layers(sensitivity or [], "val_accuracy_drop", budget)
    keep = tuple(sorted(r["layer"] for r in rows))
    if not keep or any(_keep(c) == keep for _, _, c in _prune_runs(records)):
        return None  # nothing sensitive, or this set was tried: _bisect_prune refines it
    bracket = _bracket(records, budget)
    if bracket is None:
        return None
    (best, index, config), low, high, bound = bracket
    total = sum(r["params"] for r in sensitivity)
    kept = sum(r["params"] for r in rows)
    if kept + (total - kept) * (1 - high) >= total * (1 - low):
        return None  # the dense layers would cost more nonzero weights than pruning them saves
    steps = [(n, _minimal(n, c)) for n, c in _steps(best)]
    steps[index] = ("prune", _prune_config(config, high, keep))
    pruned_to = f"{rows[0]['sparsity']:.0%}" if rows[0].get("sparsity") else "the sensitivity sparsity"
    return Proposal(
        _inline(steps),
        (
            f"keep the most sensitive layers dense: {_layer_list(rows, 'val_accuracy_drop', f'pruned alone to {pruned_to}')}"
            f" ({kept / total:.1%} of kernel params), and prune the rest to {high:g}, beyond '{best['recipe']}' "
            f"(sparsity {low:g}, {_drop(best)}; {bound})"
        ),
    )


def _float_sensitive(records, budget, sensitivity, objective: str) -> Proposal | None:
    """The best chain (on the objective) over budget that quantizes to int8, with the int8-sensitive layers float (QAT)."""
    rows = _sensitive_layers(sensitivity or [], "int8_val_accuracy_drop", budget)
    if not rows:
        return None
    over = [
        r
        for r in records
        if _val_measured(r)
        and not val_feasible(r, budget)
        and objective_value(r, objective) is not None
        and _steps(r)[-1][0] == "quantize"
        and _steps(r)[-1][1].get("mode") in ("int8", "qat")
    ]
    if not over:
        return None
    base = min(over, key=lambda r: (objective_value(r, objective), r["val_accuracy_drop"], r["recipe"]))
    floats = sorted(r["layer"] for r in rows)
    steps = [(n, _minimal(n, c)) for n, c in _steps(base)]
    steps[-1] = ("quantize", {"mode": "qat", "float_layers": floats})
    return Proposal(
        _inline(steps),
        (
            f"keep the layers whose int8 weights cost the most accuracy in float: "
            f"{_layer_list(rows, 'int8_val_accuracy_drop', 'with int8 weights alone')}; quantization-aware training of "
            f"the rest, to bring '{base['recipe']}' ({_drop(base)}) within budget"
        ),
    )


def _longer(records, budget, objective: str, techniques) -> list[Proposal]:
    """Chains a little over budget that fine-tuned for fewer epochs than the defaults, at the defaults (best first)."""
    near = [
        r
        for r in records
        if _val_measured(r)
        and not val_feasible(r, budget)
        and objective_value(r, objective) is not None
        and r["val_accuracy_drop"] <= LONGER_MAX_DROP * budget + _TOLERANCE
    ]
    out = []
    for record in sorted(near, key=lambda r: (objective_value(r, objective), r["val_accuracy_drop"], r["recipe"])):
        same = Proposal(
            _inline([(n, _minimal(n, c)) for n, c in _steps(record)]),
            f"fine-tune longer: '{record['recipe']}' ({_drop(record)}), to win back accuracy",
        )
        longer = _fully_fine_tuned(same, techniques)
        if longer.recipe != same.recipe:
            out.append(longer)
    return out


def _fully_fine_tuned(proposal: Proposal, techniques) -> Proposal:
    """``proposal`` with every step fine-tuning for at least its technique's default epochs.

    A search space may screen with short fine-tuning; what refinement proposes
    is meant to ship, and on a small validation split a briefly fine-tuned
    model that looks within budget often is not on the test split.
    """
    from .recipe import parse_recipe

    steps, raised = [], []
    for step in parse_recipe([proposal.recipe]).steps:
        config = dict(step.config)
        default = _default_epochs(techniques, step.technique)
        if default is not None and config.get("epochs", default) < default:
            config["epochs"] = default
            raised.append(f"{step.technique} {default}")
        steps.append((step.technique, config))
    if not raised:
        return proposal
    return Proposal(_inline(steps), f"{proposal.why}; fine-tuning for the default epochs ({', '.join(raised)})")


def _default_epochs(techniques, name: str) -> int | None:
    try:
        field = techniques.get(name).Config.model_fields.get("epochs")
    except KfoptError:  # not installed here
        return None
    return field.default if field is not None and isinstance(field.default, int) else None


def _students(records, architecture: str = "same") -> list[tuple[dict, tuple[int, dict]]]:
    """(record, (index, config)) of the val-measured, unpruned students built as ``architecture`` (no student file)."""
    students = [(r, _family(r, "distill")) for r in records if _val_measured(r) and _family(r, "prune") is None]
    return [
        (r, f) for r, f in students if f is not None and not f[1].get("student") and _architecture(f[1]) == architecture
    ]


def _bisect_distill(records, budget, architecture: str = "same") -> Proposal | None:
    """Bisect the width of ``architecture`` students down; widths of other architectures do not count."""
    students = _students(records, architecture)
    feasible = [(r, f) for r, f in students if val_feasible(r, budget)]
    if not feasible:
        return None
    best, (index, config) = min(feasible, key=lambda rf: (rf[1][1].get("width", 0.5), rf[0]["val_accuracy_drop"]))
    high, epochs = float(config.get("width", 0.5)), config.get("epochs") or 0
    # A student over budget bounds the bracket when it was trained at least as long as the best one.
    below = [
        f[1].get("width", 0.5)
        for r, f in students
        if not val_feasible(r, budget) and f[1].get("width", 0.5) < high and (f[1].get("epochs") or 0) >= epochs
    ]
    low = max(below) if below else WIDTH_FLOOR
    if high / low < MIN_WIDTH_RATIO:
        return None
    middle = round(math.sqrt(low * high), 4)
    steps = [(n, _minimal(n, c)) for n, c in _steps(best)]
    steps[index] = ("distill", _distill_config(config, middle))
    bound = f"widest student over budget {low:g}" if below else f"nothing over budget yet, floor {low:g}"
    kind = "" if architecture == "same" else f" of {architecture} students"
    return Proposal(
        _inline(steps),
        f"bisect distill width{kind} down from '{best['recipe']}' "
        f"(width {high:g}, {_drop(best)}; {bound}): try {middle:g}",
    )


def _dense_student(records, budget, objective: str) -> Proposal | None:
    """A Flatten + Dense student, then int8, once: when width-scaled students were tried (latency) or one is
    within the budget (other objectives).

    A width-scaled student shows the search distils; a dense one may be about
    as accurate without the conv ops' per-op overhead. For latency that is worth
    a trial even when the (often briefly trained) width-scaled ones missed the
    budget; for size only when distillation is known to stay within it.
    """
    for record in records:
        found = _family(record, "distill")
        if found is not None and _architecture(found[1]) == "dense":
            return None
    students = [r for r, _ in _students(records)]
    feasible = [r for r in students if val_feasible(r, budget)]
    if not (feasible or (objective == "latency" and students)):
        return None
    narrowest = min(
        feasible or students, key=lambda r: (_family(r, "distill")[1].get("width", 0.5), r["val_accuracy_drop"])
    )
    return Proposal(
        _inline([("distill", {"architecture": "dense", "width": DENSE_WIDTH}), ("quantize", {"mode": "int8"})]),
        f"try a dense student (width-scaled: '{narrowest['recipe']}', {_drop(narrowest)}): TFLite conv ops cost a "
        "fixed per-op overhead whatever their width, so narrower conv students stop getting faster; a Flatten + "
        "Dense student distilled from the teacher runs in a few fully connected ops",
    )


def _distill_order(records, budget, objective: str, proposals: dict) -> list[Proposal | None]:
    """The distill bisections, the family whose best feasible student scores best on ``objective`` first.

    Dense students are only narrowed further while their best beats the best
    width-scaled one (on an MLP teacher they are the same models).
    """

    def score(architecture):
        values = [objective_value(r, objective) for r, _ in _students(records, architecture) if val_feasible(r, budget)]
        values = [v for v in values if v is not None]
        return (min(values) if values else math.inf, architecture != "same")

    if score("dense")[0] >= score("same")[0] < math.inf:
        proposals = {a: p for a, p in proposals.items() if a != "dense"}
    return [proposals[a] for a in sorted(proposals, key=score)]


def _chains(records, budget) -> list[Proposal]:
    feasible = [r for r in records if val_feasible(r, budget)]
    prunes = [(r, _family(r, "prune")) for r in feasible if _family(r, "distill") is None]
    prunes = [(r, f) for r, f in prunes if f is not None]
    # Pruning goes into the narrowest width-scaled student (dense students' widths are not comparable).
    students = [(r, f) for r, f in _students(records) if val_feasible(r, budget)]
    out = []
    best_prune = max(
        prunes, key=lambda rf: (rf[1][1].get("target_sparsity", 0), -rf[0]["val_accuracy_drop"]), default=None
    )
    best_student = min(students, key=lambda rf: (rf[1][1].get("width", 0.5), rf[0]["val_accuracy_drop"]), default=None)
    if best_prune and best_student:
        p_cfg, d_cfg = best_prune[1][1], best_student[1][1]
        out.append(
            Proposal(
                _inline(
                    [
                        ("distill", _distill_config(d_cfg, d_cfg.get("width", 0.5))),
                        ("prune", _prune_config(p_cfg, p_cfg.get("target_sparsity", 0.5))),
                        ("quantize", {"mode": "int8"}),
                    ]
                ),
                f"combine families: narrowest feasible student '{best_student[0]['recipe']}' ({_drop(best_student[0])}) "
                f"pruned like '{best_prune[0]['recipe']}' ({_drop(best_prune[0])}), then int8",
            )
        )
    if best_prune:
        p_cfg = best_prune[1][1]
        out.append(
            Proposal(
                _inline(
                    [("prune", _prune_config(p_cfg, p_cfg.get("target_sparsity", 0.5))), ("quantize", {"mode": "qat"})]
                ),
                f"chain prune -> qat: '{best_prune[0]['recipe']}' ({_drop(best_prune[0])}) with quantization-aware "
                "training instead of post-training int8, to win back accuracy",
            )
        )
    return out


def propose(
    records: list[dict],
    *,
    max_accuracy_drop: float = 0.01,
    objective: str = "size",
    max_trials: int = 4,
    tried: list[str] | None = None,
    sensitivity: list[dict] | None = None,
    techniques=None,
) -> list[Proposal]:
    """Recipes for the next round, most promising for ``objective`` first, at most ``max_trials``.

    ``records`` are candidate records (``metrics.json`` shape, with
    ``val_accuracy_drop``) of all rounds so far; ``tried`` are labels not to
    propose again (the labels of ``records`` always count as tried).
    ``sensitivity`` are :func:`layer_sensitivity` rows of the baseline: with
    them the most sensitive layers are kept dense (or float under QAT). Order:
    for size the prune proposals (sensitive layers dense, then bisections),
    then distillation; for latency a dense student (once) and distillation
    first; then longer fine-tuning, chains and float layers (and for size, the
    dense student last). The width bisections of same-architecture and dense
    students are separate, the family with the best feasible student first.
    Only the validation split decides what is feasible or best.
    """
    objective_metric(objective)  # a bad objective fails here, with the choices
    if techniques is None:
        from .plugins.manager import registry

        techniques = registry()
    seen = {_key(r["steps"]) if r.get("steps") else r["recipe"] for r in records}
    seen |= {_canonical(t, techniques) for t in tried or []}
    budget = max_accuracy_drop
    keep_sets = sorted({_keep(c) for _, _, c in _prune_runs(records)} - {()})
    prune = [_keep_sensitive_dense(records, budget, sensitivity)]
    prune += [_bisect_prune(records, budget, keep) for keep in keep_sets] + [_bisect_prune(records, budget)]
    distill = _distill_order(
        records, budget, objective, {a: _bisect_distill(records, budget, a) for a in ("same", "dense")}
    )
    dense = _dense_student(records, budget, objective)
    # Sparsity shrinks gzip size but not dense-kernel latency; narrower students shrink both, and a dense
    # student drops the conv ops' per-op overhead (it rarely makes a conv model smaller, so last for size).
    ordered = [dense] + distill + prune if objective == "latency" else prune + distill
    ordered += _longer(records, budget, objective, techniques)
    ordered += _chains(records, budget) + [_float_sensitive(records, budget, sensitivity, objective)]
    if objective != "latency":
        ordered.append(dense)
    out = []
    for proposal in ordered:
        if proposal is None or len(out) >= max_trials:
            continue
        proposal = _fully_fine_tuned(proposal, techniques)
        key = _canonical(proposal.recipe, techniques)
        if key in seen:
            continue
        seen.add(key)
        out.append(proposal)
    return out


# -- layer sensitivity -----------------------------------------------------------
def layer_sensitivity(keras_model, data, sparsity: float = 0.9) -> list[dict]:
    """Prune one layer at a time (its smallest ``sparsity`` of kernel weights, no fine-tuning), then int8 it.

    Returns one row per layer with kernels: ``layer``, ``params`` (kernel
    weights), ``sparsity``, ``val_accuracy`` and ``val_accuracy_drop`` against
    the unpruned model, and ``int8_val_accuracy_drop`` when only that layer's
    kernels are rounded to int8 (symmetric, per output channel, as the TFLite
    converter stores them), all on the validation split. The caller's model is
    not changed (a copy is changed). Most prune-sensitive layer first.
    """
    import numpy as np

    from .models import copy_model
    from .plugins.prune import kernel_layers, threshold_global

    x, y = data.validation.arrays()
    if not len(x):
        return []
    model = copy_model(keras_model)

    def val_accuracy() -> float:
        pred = np.concatenate([np.asarray(model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)])
        return float((pred.argmax(axis=1) == y).mean())

    def accuracy_with(kernels, values) -> float:
        original = [k.numpy() for k in kernels]
        try:
            for kernel, value in zip(kernels, values):
                kernel.assign(value)
            return val_accuracy()
        finally:
            for kernel, value in zip(kernels, original):
                kernel.assign(value)

    base = val_accuracy()
    rows = []
    for layer in kernel_layers(model):
        kernels = [w for w in layer.trainable_weights if len(w.shape) >= 2]
        original = [k.numpy() for k in kernels]
        accuracy = accuracy_with(kernels, threshold_global(original, sparsity))
        int8 = accuracy_with(kernels, [_int8_weights(v) for v in original])
        rows.append(
            {
                "layer": layer.name,
                "params": int(sum(v.size for v in original)),
                "sparsity": sparsity,
                "val_accuracy": accuracy,
                "val_accuracy_drop": base - accuracy,
                "int8_val_accuracy_drop": base - int8,
            }
        )
    rows.sort(key=lambda r: (-r["val_accuracy_drop"], r["layer"]))
    return rows


def _int8_weights(kernel):
    """``kernel`` rounded to int8 and back: symmetric, one scale per output channel (the last axis)."""
    import numpy as np

    scale = np.abs(kernel).max(axis=tuple(range(kernel.ndim - 1)), keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1)
    return (np.round(kernel / scale) * scale).astype(kernel.dtype)


# -- the in-process search -------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80]


def target_met(records: list[dict], *, max_accuracy_drop: float, objective: str, target: float | None) -> dict | None:
    """A candidate within the budget (validation split) whose ratio metric reaches ``target``, or None."""
    if target is None:
        return None
    hits = [
        r for r in records if val_feasible(r, max_accuracy_drop) and (objective_ratio(r, objective)[1] or 0) >= target
    ]
    return max(hits, key=lambda r: objective_ratio(r, objective)[1], default=None)


#: Why a round-1 recipe was tried, and how a search that ran every round ended.
ROUND_ONE_WHY = "round 1: from the search space"
ALL_ROUNDS_DONE = "all rounds done"


def optimization_seconds(candidates: list[dict]) -> float:
    """Seconds spent optimizing the candidates: what ``max_time`` bounds (parallel or cached steps count fairly)."""
    return sum(c.get("seconds") or 0 for c in candidates)


def search_outcome(settings: dict, candidates: list[dict], stopped: str | None) -> dict:
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
    max_accuracy_drop: float,
    target: float | None,
    stop_when_met: bool,
) -> dict:
    """The ``search`` block of a result: how the search was bounded, and which split decides what."""
    if stop_when_met and target is None:
        raise KfoptError(
            "--stop-when-met needs a target.", "pass --target-compression X as well, or drop --stop-when-met."
        )
    check_goal(max_accuracy_drop, objective)
    return {
        "rounds": rounds,
        "max_trials": max_trials,
        "max_time": max_time,
        "objective": objective,
        "max_accuracy_drop": max_accuracy_drop,
        "target": target,
        "stop_when_met": stop_when_met,
        "choices_use": "validation split (val_accuracy_drop)",
        "final_check_uses": "test split",
    }


def trace_entry(candidate: dict, objective: str) -> dict:
    """One line of the search trace: which round proposed the recipe, why, and what came of it."""
    objective_metric(objective)
    return {
        "round": candidate.get("round", 1),
        "recipe": candidate["recipe"],
        "why": candidate.get("why") or ROUND_ONE_WHY,
        "status": candidate["status"],
        "val_accuracy_drop": candidate.get("val_accuracy_drop"),
        **{metric: candidate.get(metric) for metric in OBJECTIVES.values()},
    }


def next_round(
    records: list[dict],
    number: int,
    *,
    max_accuracy_drop: float = 0.01,
    objective: str = "size",
    max_trials: int = 4,
    target: float | None = None,
    stop_when_met: bool = False,
    elapsed: float | None = None,
    max_time: float | None = None,
    sensitivity: list[dict] | None = None,
    techniques=None,
) -> tuple[list[Proposal], str | None]:
    """The recipes of refinement round ``number`` (2, 3, ...), or why the search stops here.

    One decision shared by the in-process search and the pipeline's propose
    step: stop when ``stop_when_met`` and a candidate reached ``target`` (on the
    validation split), when ``elapsed`` seconds passed ``max_time``, or when
    :func:`propose` finds nothing left to refine. Returns ``(proposals, None)``
    or ``([], reason)``.
    """
    if stop_when_met and target is None:
        raise KfoptError(
            "--stop-when-met needs a target.", "pass --target-compression X as well, or drop --stop-when-met."
        )
    hit = target_met(records, max_accuracy_drop=max_accuracy_drop, objective=objective, target=target)
    if stop_when_met and hit:
        name, value = objective_ratio(hit, objective)
        return [], f"target {target:g}x met on the validation split by '{hit['recipe']}' ({name} {value:.1f}x)"
    if max_time is not None and elapsed is not None and elapsed > max_time:
        return [], f"time budget of {max_time:g} s spent"
    proposals = propose(
        records,
        max_accuracy_drop=max_accuracy_drop,
        objective=objective,
        max_trials=max_trials,
        sensitivity=sensitivity,
        techniques=techniques,
    )
    if not proposals:
        return [], f"round {number}: nothing left to refine"
    return proposals, None


def search(
    model: str,
    data: str,
    out: str | os.PathLike,
    *,
    recipes: str | os.PathLike | list | None = None,
    rounds: int = 1,
    max_trials: int = 4,
    max_time: float | None = None,
    max_accuracy_drop: float = 0.01,
    objective: str = "size",
    target: float | None = None,
    stop_when_met: bool = False,
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    reporter=None,
    latency_runs: int | None = None,
    baseline=None,
    sensitivity: float | None = None,
) -> dict:
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
    ``sensitivity`` (a sparsity), :func:`layer_sensitivity` of the baseline is
    added as ``layer_sensitivity`` and refinement keeps the most sensitive layers
    dense (or float under QAT), see :func:`propose`.
    """
    from .evaluate import LATENCY_RUNS, Evaluator
    from .optimize import METRICS_FILE, prepare, run_recipe, writable_dir, write_json
    from .plugins.manager import registry
    from .progress import Reporter
    from .recipe import parse_recipe, plan
    from .search import load_search

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
    first = load_search(recipes, techniques)  # every recipe checked before any work
    out = writable_dir(out)
    handle, dataset = baseline or prepare(
        model, data, seed=seed, unsafe=unsafe, epochs=epochs, reporter=reporter, workdir=out
    )
    handle.save(out / "baseline")
    evaluator = Evaluator(dataset, handle, out / "baseline", latency_runs=latency_runs or LATENCY_RUNS)
    reporter.say("Measuring the baseline")
    result = {
        "model": model,
        "data": data,
        "seed": seed,
        "baseline": {"artifact": str(handle.path), **evaluator.baseline_metrics()},
        "candidates": [],
        "winner": None,
        "pareto": [],
        "registered_model": None,
        "search": settings,
        "search_trace": [],
    }
    if sensitivity is not None and handle.format == "keras":
        reporter.say(
            f"Layer sensitivity: one layer at a time pruned to {sensitivity:.0%}, then its weights int8 "
            "(validation split)"
        )
        result["layer_sensitivity"] = layer_sensitivity(handle.keras(), dataset, sensitivity)
    trace, candidates = result["search_trace"], result["candidates"]
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
                out / "candidates" / f"r{number}-{_slug(recipe.label)}",
                seed=seed,
                reporter=reporter,
            )
            candidate.update(round=number, why=why)
            candidates.append(candidate)
            trace.append(trace_entry(candidate, objective))
            write_json(out / METRICS_FILE, result)  # partial results survive an interruption

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
            sensitivity=result.get("layer_sensitivity"),
            techniques=techniques,
        )
        if stop:
            break
        planned_recipes = []
        for proposal in proposals:
            parsed = parse_recipe([proposal.recipe])
            planned_recipes.append((parsed, plan(parsed, techniques)))
        run_round(number, planned_recipes, [p.why for p in proposals])
    result["search"] = search_outcome(settings, candidates, stop or ALL_ROUNDS_DONE)
    result["baseline"]["references"] = evaluator.references
    apply_selection(result, select(candidates, max_accuracy_drop=max_accuracy_drop, objective=objective))
    write_json(out / METRICS_FILE, result)
    return result


def best_of_round(result: dict, number: int) -> dict | None:
    """The winner :func:`select` would pick among one round's candidates (test split), for comparisons."""
    selection = result.get("selection") or {}
    chosen = select(
        [c for c in result["candidates"] if c.get("round") == number],
        max_accuracy_drop=selection.get("max_accuracy_drop", 0.01),
        objective=selection.get("objective", "size"),
    )
    return next((c for c in result["candidates"] if c["recipe"] == chosen.winner), None)
