"""Refinement proposals: from every candidate so far, the recipes of the next round.

Round 1 is the search space. Each later round looks at every candidate so far
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
- **sensitive layers** (with :func:`~kfopt.recipe_search.layer_sensitivity` rows): keep the layers
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
(``val_metric_drop``, the budgeted metric's drop) only; the test split is for the final budget check by
:func:`kfopt.select.select`, so the search does not overfit the test set.
Each proposal carries a ``why`` string, kept as the search trace.

A candidate's step is read with the settings it ran with: its recorded config,
and for a key it does not record, its technique's ``Config`` default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import KfoptError
from ..recipe import Recipe, Step, parse_recipe, plan
from ..select import (
    TOLERANCE,
    Budget,
    absolute_budget,
    objective_metric,
    objective_ratio,
    objective_value,
    quality,
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
    """A recipe to try next, built step by step, and why the search proposes it.

    ``recipe`` is the label (inline form) of ``steps``: what the search trace,
    the pipeline's loop items and the candidate record carry. Parsing it gives
    ``steps`` back, so the in-process search (which plans ``steps``) and the
    pipeline (which passes the label between steps) run the same configs.
    """

    steps: list[Step]
    why: str
    recipe: str = field(init=False)

    def __post_init__(self) -> None:
        self.steps = [Step(s.technique, {k: _tidy(v) for k, v in s.config.items()}) for s in self.steps]
        self.recipe = str(self.to_recipe())

    def to_recipe(self) -> Recipe:
        """The proposal as a :class:`~kfopt.recipe.Recipe`, to plan and run."""
        return Recipe(list(self.steps))


def _tidy(value: Any) -> Any:
    """A config value as short as a label should show it: 4 significant digits, whole floats as ints (``width=1``)."""
    if isinstance(value, (list, tuple)):
        return [_tidy(v) for v in value]
    if not isinstance(value, float):
        return value
    text = f"{value:.4g}"
    rounded = float(text)
    return int(rounded) if rounded.is_integer() and "e" not in text else rounded


# -- reading candidate records ---------------------------------------------------
def val_drop(record: dict) -> float | None:
    """The candidate's VALIDATION drop of the budgeted metric (``val_metric_drop``; ``val_accuracy_drop`` in
    records without metric fields)."""
    return quality(record).val_drop


def val_feasible(record: dict, max_accuracy_drop: float | str | Budget) -> bool:
    """True when the candidate finished and its VALIDATION metric drop is within the budget."""
    q = quality(record)
    return (
        record.get("status") == "ok"
        and q.val_drop is not None
        and not Budget.parse(max_accuracy_drop).over(q.val_drop, q.val_relative_drop)
    )


def _val_measured(record: dict) -> bool:
    return record.get("status") == "ok" and val_drop(record) is not None


def best_feasible(records: list[dict], max_accuracy_drop: float, objective: str) -> dict | None:
    """The best candidate by the objective among those within the budget on the validation split."""
    feasible = [r for r in records if val_feasible(r, max_accuracy_drop) and objective_value(r, objective) is not None]
    if not feasible:
        return None
    return min(feasible, key=lambda r: (objective_value(r, objective), val_drop(r), r["recipe"]))


def target_met(records: list[dict], *, max_accuracy_drop: float, objective: str, target: float | None) -> dict | None:
    """A candidate within the budget (validation split) whose ratio metric reaches ``target``, or None."""
    if target is None:
        return None
    hits = [
        r for r in records if val_feasible(r, max_accuracy_drop) and (objective_ratio(r, objective)[1] or 0) >= target
    ]
    return max(hits, key=lambda r: objective_ratio(r, objective)[1], default=None)


def _drop(record: dict) -> str:
    q = quality(record)
    if q.name == "accuracy":
        return f"val drop {q.val_drop * 100:+.2f} pt"
    return f"val {q.name} drop {q.val_drop:+.4g}"


def _recorded_steps(record: dict) -> list[Step]:
    return [Step(s["technique"], dict(s.get("config") or {})) for s in record.get("steps") or []]


def _key(steps: list[dict]) -> str:
    return json.dumps(steps, sort_keys=True)


def _canonical(recipe: Recipe | str, techniques) -> str:
    """A recipe in comparable form: its steps with every config value filled in (defaults too)."""
    recipe = parse_recipe([recipe]) if isinstance(recipe, str) else recipe
    try:
        return _key([p.as_dict() for p in plan(recipe, techniques)])
    except KfoptError:
        return recipe.label


@dataclass
class Defaults:
    """The techniques' config defaults, read from each technique's pydantic ``Config`` through the registry."""

    techniques: Any

    def __call__(self, technique: str, key: str) -> Any:
        return self.techniques.get(technique).Config.model_fields[key].get_default(call_default_factory=True)

    def setting(self, step: Step, key: str) -> Any:
        """What ``step`` ran with for ``key``: its recorded value, else its technique's default."""
        return step.config[key] if key in step.config else self(step.technique, key)

    def epochs(self, technique: str) -> int | None:
        """The technique's default fine-tuning epochs; None when it has none (or is not installed here)."""
        try:
            epochs = self.techniques.get(technique).Config.model_fields.get("epochs")
        except KfoptError:
            return None
        return epochs.default if epochs is not None and isinstance(epochs.default, int) else None


# -- the families a proposal starts from -------------------------------------------
@dataclass(frozen=True)
class PruneStep:
    """A candidate's first prune step (magnitude or l1) and the settings it ran with."""

    record: dict
    index: int  # where the step is in the candidate's recipe
    method: str
    sparsity: float
    epochs: int
    keep: tuple[str, ...]  # keep_dense, sorted

    def proposed(self, sparsity: float, keep: tuple[str, ...] | None = None) -> Step:
        """This step at ``sparsity``, keeping ``keep`` dense (default: the layers it kept dense)."""
        return _prune(self.method, sparsity, self.epochs, self.keep if keep is None else keep)


@dataclass(frozen=True)
class DistillStep:
    """A candidate's first distill step and the settings it ran with."""

    record: dict
    index: int  # where the step is in the candidate's recipe
    architecture: str
    width: float
    epochs: int
    student: str | None  # a student model file, instead of one built from the teacher

    def proposed(self, width: float, defaults: Defaults) -> Step:
        """This step with a student of ``width``."""
        return _distill(self.architecture, width, self.epochs, defaults)


@dataclass(frozen=True)
class Bracket:
    """Where the prune bisection of one ``keep_dense`` set stands."""

    best: PruneStep  # the highest val-feasible sparsity (``low``)
    high: float  # the lowest sparsity over budget above it (fine-tuned at least as long), or the ceiling
    bound: str  # where ``high`` comes from, for the why text

    @property
    def low(self) -> float:
        return self.best.sparsity


def _prune_step(record: dict, defaults: Defaults) -> PruneStep | None:
    """The record's first prune step, unless it is structured (m:n sparsity has no level to bisect)."""
    for index, step in enumerate(_recorded_steps(record)):
        if step.technique == "prune":
            method = defaults.setting(step, "method")
            if method == "structured":
                return None
            return PruneStep(
                record,
                index,
                method,
                float(defaults.setting(step, "target_sparsity")),
                defaults.setting(step, "epochs"),
                _layers(defaults.setting(step, "keep_dense")),
            )
    return None


def _distill_step(record: dict, defaults: Defaults) -> DistillStep | None:
    for index, step in enumerate(_recorded_steps(record)):
        if step.technique == "distill":
            return DistillStep(
                record,
                index,
                defaults.setting(step, "architecture"),
                defaults.setting(step, "width"),
                defaults.setting(step, "epochs"),
                defaults.setting(step, "student"),
            )
    return None


def _layers(names) -> tuple[str, ...]:
    return tuple(sorted(names or ()))


def _prune(method: str, sparsity: float, epochs: int, keep: tuple[str, ...]) -> Step:
    config = {"method": method, "target_sparsity": round(sparsity, 3), "epochs": epochs}
    if keep:
        config["keep_dense"] = list(keep)
    return Step("prune", config)


def _distill(architecture: str, width: float, epochs: int, defaults: Defaults) -> Step:
    config = {"architecture": architecture} if architecture != defaults("distill", "architecture") else {}
    config.update(width=round(width, 4), epochs=epochs)
    return Step("distill", config)


def _quantize(mode: str, float_layers=()) -> Step:
    floats = sorted(float_layers or ())
    return Step("quantize", {"mode": mode, **({"float_layers": floats} if floats else {})})


def _copied(step: Step, defaults: Defaults) -> Step:
    """``step`` as a proposal copies it: the keys that say what it does, so proposals stay readable."""
    setting = defaults.setting
    if step.technique == "prune":
        return _copied_prune(step, defaults)
    if step.technique == "distill":
        return _distill(setting(step, "architecture"), setting(step, "width"), setting(step, "epochs"), defaults)
    if step.technique == "quantize":
        return _quantize(setting(step, "mode"), setting(step, "float_layers"))
    return Step(step.technique, dict(step.config))


def _copied_prune(step: Step, defaults: Defaults) -> Step:
    method, epochs = defaults.setting(step, "method"), defaults.setting(step, "epochs")
    keep = _layers(defaults.setting(step, "keep_dense"))
    if method != "structured":
        return _prune(method, defaults.setting(step, "target_sparsity"), epochs, keep)
    # m:n sparsity takes no target_sparsity (its Config rejects one): the pattern says how sparse it is.
    config = {"method": method}
    if defaults.setting(step, "m_by_n") != defaults("prune", "m_by_n"):
        config["m_by_n"] = defaults.setting(step, "m_by_n")
    config["epochs"] = epochs
    if keep:
        config["keep_dense"] = list(keep)
    return Step("prune", config)


def _copied_recipe(record: dict, defaults: Defaults) -> list[Step]:
    return [_copied(step, defaults) for step in _recorded_steps(record)]


@dataclass
class _Evidence:
    """What every proposal family reads: the candidates so far and how the search judges them."""

    records: list[dict]
    #: The budget in the metric's units on the validation split (a relative budget made absolute).
    budget: float
    objective: str
    defaults: Defaults
    sensitivity: list[dict]
    #: The budget as the user gave it (absolute, or relative to the baseline): what "feasible" means.
    given: Budget | None = None

    def feasible(self, record: dict) -> bool:
        return val_feasible(record, self.given or self.budget)

    def objective_value(self, record: dict) -> float | None:
        return objective_value(record, self.objective)

    def rank(self, record: dict) -> tuple:
        """Best on the objective first, then the smallest val drop, then by label."""
        return (self.objective_value(record), val_drop(record), record["recipe"])

    def prune_runs(self) -> list[PruneStep]:
        """The val-measured prune chains without distillation (magnitude/l1 only)."""
        # A distilled student prunes differently: the chains below cover it.
        runs = [
            _prune_step(r, self.defaults)
            for r in self.records
            if _val_measured(r) and _distill_step(r, self.defaults) is None
        ]
        return [run for run in runs if run is not None]

    def students(self, architecture: str = "same") -> list[DistillStep]:
        """The val-measured, unpruned students built as ``architecture`` (no student file)."""
        found = [
            _distill_step(r, self.defaults)
            for r in self.records
            if _val_measured(r) and _prune_step(r, self.defaults) is None
        ]
        return [s for s in found if s is not None and not s.student and s.architecture == architecture]


# -- proposing -----------------------------------------------------------------
def _bracket(evidence: _Evidence, keep: tuple[str, ...] = ()) -> Bracket | None:
    """The prune bisection bracket of the ``keep_dense`` set ``keep``; None when nothing is feasible.

    ``low`` is the highest val-feasible sparsity, ``high`` the lowest sparsity
    over budget above it (fine-tuned at least as long) or the ceiling. Keeping
    layers dense only makes pruning easier, so a feasible plain prune bounds a
    ``keep`` set from below too.
    """
    runs = evidence.prune_runs()
    feasible = [run for run in runs if evidence.feasible(run.record) and run.keep in {keep, ()}]
    if not feasible:
        return None
    best = max(feasible, key=lambda run: (run.sparsity, run.keep == keep, -val_drop(run.record)))
    above = [
        run.sparsity
        for run in runs
        if run.keep == keep
        and not evidence.feasible(run.record)
        and run.sparsity > best.sparsity
        and run.epochs >= best.epochs
    ]
    high = min(above, default=SPARSITY_CEILING)
    bound = f"lowest sparsity over budget {high:g}" if above else f"nothing over budget yet, ceiling {high:g}"
    return Bracket(best, high, bound)


def _bisect_prune(evidence: _Evidence, keep: tuple[str, ...] = ()) -> Proposal | None:
    bracket = _bracket(evidence, keep)
    if bracket is None or bracket.high - bracket.low < MIN_SPARSITY_STEP:
        return None
    best = bracket.best
    middle = round((bracket.low + bracket.high) / 2, 3)
    steps = _copied_recipe(best.record, evidence.defaults)
    steps[best.index] = best.proposed(middle, keep)
    kept = f" with keep_dense=[{','.join(keep)}]" if keep else ""
    return Proposal(
        steps,
        f"bisect prune sparsity up{kept} from '{best.record['recipe']}' "
        f"(sparsity {bracket.low:g}, {_drop(best.record)}; {bracket.bound}): try {middle:g}",
    )


def _sensitive_layers(rows, key: str, budget: float) -> list[dict]:
    """Rows whose ``key`` (a val drop with that layer alone changed) exceeds the budget, kept within KEEP_SHARE.

    The layers saving the most accuracy per kernel param come first.
    """
    total = sum(r["params"] for r in rows)
    chosen, share = [], 0
    for row in sorted(rows, key=lambda r: (-(r.get(key) or 0) / max(r["params"], 1), r["layer"])):
        if (row.get(key) or 0) > budget + TOLERANCE and share + row["params"] <= KEEP_SHARE * total:
            chosen.append(row)
            share += row["params"]
    return chosen


def _layer_list(rows, key: str, what: str) -> str:
    return ", ".join(f"{r['layer']} ({r['params']:,} params, val drop {r[key] * 100:+.2f} pt {what})" for r in rows)


def _keep_sensitive_dense(evidence: _Evidence) -> Proposal | None:
    """Keep the most prune-sensitive layers dense and prune the rest to the upper end of the bracket."""
    rows = _sensitive_layers(evidence.sensitivity, "val_accuracy_drop", evidence.budget)
    keep = _layers(r["layer"] for r in rows)
    if not keep or any(run.keep == keep for run in evidence.prune_runs()):
        return None  # nothing sensitive, or this set was tried: _bisect_prune refines it
    bracket = _bracket(evidence)
    if bracket is None:
        return None
    best, low, high = bracket.best, bracket.low, bracket.high
    total = sum(r["params"] for r in evidence.sensitivity)
    kept = sum(r["params"] for r in rows)
    if kept + (total - kept) * (1 - high) >= total * (1 - low):
        return None  # the dense layers would cost more nonzero weights than pruning them saves
    steps = _copied_recipe(best.record, evidence.defaults)
    steps[best.index] = best.proposed(high, keep)
    pruned_to = f"{rows[0]['sparsity']:.0%}" if rows[0].get("sparsity") else "the sensitivity sparsity"
    return Proposal(
        steps,
        (
            f"keep the most sensitive layers dense: {_layer_list(rows, 'val_accuracy_drop', f'pruned alone to {pruned_to}')}"
            f" ({kept / total:.1%} of kernel params), and prune the rest to {high:g}, beyond '{best.record['recipe']}' "
            f"(sparsity {low:g}, {_drop(best.record)}; {bracket.bound})"
        ),
    )


def _float_sensitive(evidence: _Evidence) -> Proposal | None:
    """The best chain (on the objective) over budget that quantizes to int8, with the int8-sensitive layers float (QAT)."""
    rows = _sensitive_layers(evidence.sensitivity, "int8_val_accuracy_drop", evidence.budget)
    if not rows:
        return None
    over = [
        r
        for r in evidence.records
        if _val_measured(r)
        and not evidence.feasible(r)
        and evidence.objective_value(r) is not None
        and _ends_in_int8(r, evidence.defaults)
    ]
    if not over:
        return None
    base = min(over, key=evidence.rank)
    steps = _copied_recipe(base, evidence.defaults)
    steps[-1] = _quantize("qat", [r["layer"] for r in rows])
    return Proposal(
        steps,
        (
            f"keep the layers whose int8 weights cost the most accuracy in float: "
            f"{_layer_list(rows, 'int8_val_accuracy_drop', 'with int8 weights alone')}; quantization-aware training of "
            f"the rest, to bring '{base['recipe']}' ({_drop(base)}) within budget"
        ),
    )


def _ends_in_int8(record: dict, defaults: Defaults) -> bool:
    steps = _recorded_steps(record)
    return bool(steps) and steps[-1].technique == "quantize" and defaults.setting(steps[-1], "mode") in ("int8", "qat")


def _longer(evidence: _Evidence) -> list[Proposal]:
    """Chains a little over budget that fine-tuned for fewer epochs than the defaults, at the defaults (best first)."""
    near = [
        r
        for r in evidence.records
        if _val_measured(r)
        and not evidence.feasible(r)
        and evidence.objective_value(r) is not None
        and val_drop(r) <= LONGER_MAX_DROP * evidence.budget + TOLERANCE
    ]
    out = []
    for record in sorted(near, key=evidence.rank):
        same = Proposal(
            _copied_recipe(record, evidence.defaults),
            f"fine-tune longer: '{record['recipe']}' ({_drop(record)}), to win back accuracy",
        )
        longer = _fully_fine_tuned(same, evidence.defaults)
        if longer.recipe != same.recipe:
            out.append(longer)
    return out


def _fully_fine_tuned(proposal: Proposal, defaults: Defaults) -> Proposal:
    """``proposal`` with every step fine-tuning for at least its technique's default epochs.

    A search space may screen with short fine-tuning; what refinement proposes
    is meant to ship, and on a small validation split a briefly fine-tuned
    model that looks within budget often is not on the test split.
    """
    steps, raised = [], []
    for step in proposal.steps:
        config = dict(step.config)
        default = defaults.epochs(step.technique)
        if default is not None and config.get("epochs", default) < default:
            config["epochs"] = default
            raised.append(f"{step.technique} {default}")
        steps.append(Step(step.technique, config))
    if not raised:
        return proposal
    return Proposal(steps, f"{proposal.why}; fine-tuning for the default epochs ({', '.join(raised)})")


def _bisect_distill(evidence: _Evidence, architecture: str = "same") -> Proposal | None:
    """Bisect the width of ``architecture`` students down; widths of other architectures do not count."""
    students = evidence.students(architecture)
    feasible = [s for s in students if evidence.feasible(s.record)]
    if not feasible:
        return None
    best = min(feasible, key=lambda s: (s.width, val_drop(s.record)))
    high = float(best.width)
    # A student over budget bounds the bracket when it was trained at least as long as the best one.
    below = [
        s.width for s in students if not evidence.feasible(s.record) and s.width < high and s.epochs >= best.epochs
    ]
    low = max(below) if below else WIDTH_FLOOR
    if high / low < MIN_WIDTH_RATIO:
        return None
    middle = round(math.sqrt(low * high), 4)
    steps = _copied_recipe(best.record, evidence.defaults)
    steps[best.index] = best.proposed(middle, evidence.defaults)
    bound = f"widest student over budget {low:g}" if below else f"nothing over budget yet, floor {low:g}"
    kind = "" if architecture == "same" else f" of {architecture} students"
    return Proposal(
        steps,
        f"bisect distill width{kind} down from '{best.record['recipe']}' "
        f"(width {high:g}, {_drop(best.record)}; {bound}): try {middle:g}",
    )


def _dense_student(evidence: _Evidence) -> Proposal | None:
    """A Flatten + Dense student, then int8, once: when width-scaled students were tried (latency) or one is
    within the budget (other objectives).

    A width-scaled student shows the search distils; a dense one may be about
    as accurate without the conv ops' per-op overhead. For latency that is worth
    a trial even when the (often briefly trained) width-scaled ones missed the
    budget; for size only when distillation is known to stay within it.
    """
    for record in evidence.records:
        found = _distill_step(record, evidence.defaults)
        if found is not None and found.architecture == "dense":
            return None
    students = evidence.students()
    feasible = [s for s in students if evidence.feasible(s.record)]
    if not (feasible or (evidence.objective == "latency" and students)):
        return None
    narrowest = min(feasible or students, key=lambda s: (s.width, val_drop(s.record))).record
    return Proposal(
        [Step("distill", {"architecture": "dense", "width": DENSE_WIDTH}), _quantize("int8")],
        f"try a dense student (width-scaled: '{narrowest['recipe']}', {_drop(narrowest)}): TFLite conv ops cost a "
        "fixed per-op overhead whatever their width, so narrower conv students stop getting faster; a Flatten + "
        "Dense student distilled from the teacher runs in a few fully connected ops",
    )


def _distill_order(evidence: _Evidence, proposals: dict[str, Proposal | None]) -> list[Proposal | None]:
    """The distill bisections, the family whose best feasible student scores best on the objective first.

    Dense students are only narrowed further while their best beats the best
    width-scaled one (on an MLP teacher they are the same models).
    """

    def score(architecture):
        students = [s.record for s in evidence.students(architecture) if evidence.feasible(s.record)]
        values = [v for v in map(evidence.objective_value, students) if v is not None]
        return (min(values) if values else math.inf, architecture != "same")

    if score("dense")[0] >= score("same")[0] < math.inf:
        proposals = {a: p for a, p in proposals.items() if a != "dense"}
    return [proposals[a] for a in sorted(proposals, key=score)]


def _chains(evidence: _Evidence) -> list[Proposal]:
    feasible = [r for r in evidence.records if evidence.feasible(r)]
    prunes = [_prune_step(r, evidence.defaults) for r in feasible if _distill_step(r, evidence.defaults) is None]
    prunes = [p for p in prunes if p is not None]
    # Pruning goes into the narrowest width-scaled student (dense students' widths are not comparable).
    students = [s for s in evidence.students() if evidence.feasible(s.record)]
    best_prune = max(prunes, key=lambda p: (p.sparsity, -val_drop(p.record)), default=None)
    best_student = min(students, key=lambda s: (s.width, val_drop(s.record)), default=None)
    out = []
    if best_prune and best_student:
        out.append(
            Proposal(
                [
                    best_student.proposed(best_student.width, evidence.defaults),
                    best_prune.proposed(best_prune.sparsity),
                    _quantize("int8"),
                ],
                f"combine families: narrowest feasible student '{best_student.record['recipe']}' "
                f"({_drop(best_student.record)}) pruned like '{best_prune.record['recipe']}' "
                f"({_drop(best_prune.record)}), then int8",
            )
        )
    if best_prune:
        out.append(
            Proposal(
                [best_prune.proposed(best_prune.sparsity), _quantize("qat")],
                f"chain prune -> qat: '{best_prune.record['recipe']}' ({_drop(best_prune.record)}) with "
                "quantization-aware training instead of post-training int8, to win back accuracy",
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
    ``sensitivity`` are :func:`~kfopt.recipe_search.layer_sensitivity` rows of the
    baseline: with them the most sensitive layers are kept dense (or float
    under QAT). Order: for size the prune proposals (sensitive layers dense,
    then bisections), then distillation; for latency a dense student (once)
    and distillation first; then longer fine-tuning, chains and float layers
    (and for size, the dense student last). The width bisections of
    same-architecture and dense students are separate, the family with the
    best feasible student first. Only the validation split decides what is
    feasible or best. ``techniques`` is the registry whose ``Config`` defaults
    fill what a record's steps leave out.
    """
    objective_metric(objective)  # a bad objective fails here, with the choices
    if techniques is None:
        from ..plugins.manager import registry

        techniques = registry()
    given = Budget.parse(max_accuracy_drop)
    evidence = _Evidence(
        records, absolute_budget(given, records), objective, Defaults(techniques), sensitivity or [], given=given
    )
    seen = {_key(r["steps"]) if r.get("steps") else r["recipe"] for r in records}
    seen |= {_canonical(t, techniques) for t in tried or []}
    keep_sets = sorted({run.keep for run in evidence.prune_runs()} - {()})
    prune = [_keep_sensitive_dense(evidence)]
    prune += [_bisect_prune(evidence, keep) for keep in keep_sets] + [_bisect_prune(evidence)]
    distill = _distill_order(evidence, {a: _bisect_distill(evidence, a) for a in ("same", "dense")})
    dense = _dense_student(evidence)
    # Sparsity shrinks gzip size but not dense-kernel latency; narrower students shrink both, and a dense
    # student drops the conv ops' per-op overhead (it rarely makes a conv model smaller, so last for size).
    ordered = [dense] + distill + prune if objective == "latency" else prune + distill
    ordered += _longer(evidence)
    ordered += _chains(evidence) + [_float_sensitive(evidence)]
    if objective != "latency":
        ordered.append(dense)
    out = []
    for proposal in ordered:
        if proposal is None or len(out) >= max_trials:
            continue
        proposal = _fully_fine_tuned(proposal, evidence.defaults)
        key = _canonical(proposal.to_recipe(), techniques)
        if key in seen:
            continue
        seen.add(key)
        out.append(proposal)
    return out


def check_stop_when_met(stop_when_met: bool, target: float | None) -> None:
    """Raise the user's error for ``stop_when_met`` without a ``target``."""
    if stop_when_met and target is None:
        raise KfoptError(
            "--stop-when-met needs a target.", "pass --target-compression X as well, or drop --stop-when-met."
        )


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
    check_stop_when_met(stop_when_met, target)
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
