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

- **provisional starts**: while a family has nothing within budget, a chain
  over it by at most ``LONGER_MAX_DROP`` budgets after short fine-tuning is the
  start of its bisections and chains (every proposal fine-tunes at the
  defaults), so round 2 already pushes where round 1 nearly succeeded;
- **the best chain pushed**: the best ``distill>prune`` chain within budget
  has its sparsity bisected up among the chains that differ only there;
- **channels** (latency or mix, a conv model, a ``prune`` with
  ``method=channels``): whole filters removed, then int8, bisected like
  magnitude sparsity in a bracket of its own (ceiling ``CHANNEL_CEILING``).

A round takes the first proposal of each family in turn, then the second, so a
few trials cover every direction that can still gain. Without a number of
rounds the search stops when a round improved the best candidate within budget
by at most ``MIN_GAIN`` (:func:`round_gain`, :func:`next_round`).

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
    LATENCY_RESOLUTION,
    TOLERANCE,
    Budget,
    absolute_budget,
    objective_metric,
    objective_ratio,
    quality,
    steady_objective,
)
from .sensitivity import sensitivity_drop

#: Bisection bounds when no candidate has yet failed the budget on that side.
SPARSITY_CEILING = 0.98
#: Channel pruning removes whole filters: past this share the layers are too thin to fine-tune back.
CHANNEL_CEILING = 0.9
#: Where channel pruning starts (round 1 on conv models for latency or mix), bisected from there.
CHANNEL_START = 0.5
WIDTH_FLOOR = 0.0625
#: Stop bisecting when the bracket is this narrow.
MIN_SPARSITY_STEP = 0.01
MIN_WIDTH_RATIO = 1.15
#: The lowest sparsity a retreat from an over-budget prune proposes (below it, pruning saves too little).
RETREAT_FLOOR = 0.2
#: Width of the first dense (Flatten + Dense) student: hidden layers as wide as the teacher's widest layer.
DENSE_WIDTH = 1.0

#: Sensitive layers kept dense (or float) together hold at most this share of the kernel params.
#: demo:cnn: keeping its output Dense and first Conv (1.4%) dense let the big Dense go to 98%
#: (31.6x); adding the second Conv (8%) as well left it at 18.8x, below plain 94% pruning.
KEEP_SHARE = 0.05
#: Without --rounds the search refines while a round improves the best candidate within budget by more than
#: this (its objective value: gzip bytes, latency or their mix); demo:cnn's rounds gain 30-200% until they stop.
MIN_GAIN = 0.03
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
        and not q.over_on_validation(Budget.parse(max_accuracy_drop))
    )


def _val_measured(record: dict) -> bool:
    return record.get("status") == "ok" and val_drop(record) is not None


def best_feasible(
    records: list[dict], max_accuracy_drop: float, objective: str, *, among: list[dict] | None = None
) -> dict | None:
    """The best candidate by the objective among those within the budget on the validation split.

    Ranked by :func:`~kfopt.select.steady_objective` over ``among`` (default: ``records``), the value
    :func:`~kfopt.select.select` ranks by, so the search and the final selection agree.
    """
    value = steady_objective(records if among is None else among, objective)
    feasible = [r for r in records if val_feasible(r, max_accuracy_drop) and value(r) is not None]
    if not feasible:
        return None
    return min(feasible, key=lambda r: (value(r), val_drop(r), r["recipe"]))


def target_met(records: list[dict], *, max_accuracy_drop: float, objective: str, target: float | None) -> dict | None:
    """A candidate within the budget (validation split) whose ratio metric reaches ``target``, or None."""
    if target is None:
        return None
    hits = [
        r for r in records if val_feasible(r, max_accuracy_drop) and (objective_ratio(r, objective)[1] or 0) >= target
    ]
    # Of those, the one the selection would rank first (steady latency, not a raw p50 of its own window).
    return best_feasible(hits, max_accuracy_drop, objective, among=records)


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

    def __post_init__(self) -> None:
        # The steady value select() ranks by, with one latency baseline for all the records.
        self._value = steady_objective(self.records, self.objective)

    def feasible(self, record: dict) -> bool:
        return val_feasible(record, self.given or self.budget)

    def provisional(self, record: dict) -> bool:
        """Over budget by at most ``LONGER_MAX_DROP`` budgets after fine-tuning for fewer epochs than the defaults.

        Such a chain is likely within budget once fine-tuned at the defaults
        (which every proposal is), so the search bisects and combines from it
        in the same round that retries it, instead of waiting a round for the proof.
        """
        if not _val_measured(record) or self.feasible(record) or self.objective_value(record) is None:
            return False
        if val_drop(record) > LONGER_MAX_DROP * self.budget + TOLERANCE:
            return False
        same = Proposal(_copied_recipe(record, self.defaults), "")
        return _fully_fine_tuned(same, self.defaults).recipe != same.recipe

    def usable(self, record: dict) -> bool:
        """Within budget, or provisionally so (see :meth:`provisional`): what a bisection may start from."""
        return self.feasible(record) or self.provisional(record)

    def has_conv(self) -> bool:
        """The baseline has convolution layers (read from the layer-sensitivity rows' ``type``)."""
        return any("Conv" in (row.get("type") or "") for row in self.sensitivity)

    def objective_value(self, record: dict) -> float | None:
        """The steady value :func:`~kfopt.select.select` ranks by (one latency baseline for all the records)."""
        return self._value(record)

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
def _bracket(evidence: _Evidence, keep: tuple[str, ...] = (), method: str = "magnitude") -> Bracket | None:
    """The prune bisection bracket of ``method`` and the ``keep_dense`` set ``keep``; None when nothing is usable.

    ``low`` is the highest val-feasible sparsity (or, when none is feasible
    yet, the highest provisionally feasible one: a little over budget after
    short fine-tuning), ``high`` the lowest sparsity over budget above it
    (fine-tuned at least as long) or the ceiling. Keeping layers dense only
    makes pruning easier, so a feasible plain prune bounds a ``keep`` set from
    below too. Methods do not share brackets (channels remove whole filters).
    """
    runs = [run for run in evidence.prune_runs() if run.method == method]
    starts = [run for run in runs if evidence.feasible(run.record) and run.keep in {keep, ()}]
    provisional = not starts
    if provisional:
        starts = [run for run in runs if evidence.provisional(run.record) and run.keep in {keep, ()}]
    if not starts:
        return None
    best = max(starts, key=lambda run: (run.sparsity, run.keep == keep, -val_drop(run.record)))
    above = [
        run.sparsity
        for run in runs
        if run.keep == keep
        and not evidence.usable(run.record)
        and run.sparsity > best.sparsity
        and run.epochs >= best.epochs
    ]
    ceiling = CHANNEL_CEILING if method == "channels" else SPARSITY_CEILING
    high = min(above, default=ceiling)
    bound = f"lowest sparsity over budget {high:g}" if above else f"nothing over budget yet, ceiling {high:g}"
    if provisional:
        bound += "; provisional start: a little over budget after short fine-tuning"
    return Bracket(best, high, bound)


def _bisect_prune(evidence: _Evidence, keep: tuple[str, ...] = (), method: str = "magnitude") -> Proposal | None:
    bracket = _bracket(evidence, keep, method)
    if bracket is None:
        return _retreat_prune(evidence, keep, method)
    if bracket.high - bracket.low < MIN_SPARSITY_STEP:
        return None
    best = bracket.best
    middle = round((bracket.low + bracket.high) / 2, 3)
    steps = _copied_recipe(best.record, evidence.defaults)
    steps[best.index] = best.proposed(middle, keep)
    kept = f" with keep_dense=[{','.join(keep)}]" if keep else ""
    what = "channel sparsity" if method == "channels" else "prune sparsity"
    return Proposal(
        steps,
        f"bisect {what} up{kept} from '{best.record['recipe']}' "
        f"(sparsity {bracket.low:g}, {_drop(best.record)}; {bracket.bound}): try {middle:g}",
    )


def _retreat_prune(evidence: _Evidence, keep: tuple[str, ...], method: str) -> Proposal | None:
    """Every prune of ``method`` (not after a distill) is over budget: try half the lowest sparsity tried.

    A model with little redundancy (small, or trained on all its data) loses too much at the round-1 sparsity;
    a lower one may still fit the budget, and the bisection then climbs from it.
    """
    runs = [
        run
        for run in evidence.prune_runs()
        if run.method == method and run.keep == keep and _distill_step(run.record, evidence.defaults) is None
    ]
    if not runs or any(evidence.usable(run.record) for run in runs):
        return None
    lowest = min(runs, key=lambda run: (run.sparsity, val_drop(run.record)))
    half = round(lowest.sparsity / 2, 3)
    if half < RETREAT_FLOOR:
        return None
    steps = _copied_recipe(lowest.record, evidence.defaults)
    steps[lowest.index] = lowest.proposed(half, keep)
    what = "channel sparsity" if method == "channels" else "prune sparsity"
    return Proposal(
        steps,
        f"every {what} tried is over budget (lowest: '{lowest.record['recipe']}', {_drop(lowest.record)}): "
        f"retreat to half of it, {half:g}",
    )


def _push_chain(evidence: _Evidence) -> Proposal | None:
    """Push the prune sparsity of the best chain within budget that prunes after another step (``distill>prune``).

    Plain prune chains have their own bisection; a chain that prunes a
    distilled student is bracketed among the candidates that differ from it
    only in that sparsity, so the winner is pushed while it has headroom.
    """
    chained = []
    for record in evidence.records:
        found = _prune_step(record, evidence.defaults)
        if found is not None and evidence.feasible(record) and _distill_step(record, evidence.defaults) is not None:
            chained.append(found)
    if not chained:
        return None
    best = min(chained, key=lambda run: evidence.rank(run.record))
    family = _without_sparsity(best.record, evidence.defaults)
    same = [
        run
        for run in (_prune_step(r, evidence.defaults) for r in evidence.records if _val_measured(r))
        if run is not None and _without_sparsity(run.record, evidence.defaults) == family
    ]
    low = max(run.sparsity for run in same if evidence.feasible(run.record))
    above = [run.sparsity for run in same if not evidence.feasible(run.record) and run.sparsity > low]
    ceiling = CHANNEL_CEILING if best.method == "channels" else SPARSITY_CEILING
    high = min(above, default=ceiling)
    if high - low < MIN_SPARSITY_STEP:
        return None
    middle = round((low + high) / 2, 3)
    steps = _copied_recipe(best.record, evidence.defaults)
    steps[best.index] = best.proposed(middle)
    bound = f"lowest sparsity over budget {high:g}" if above else f"nothing over budget yet, ceiling {high:g}"
    return Proposal(
        steps,
        f"push the best chain further: '{best.record['recipe']}' ({_drop(best.record)}) has headroom; "
        f"bisect its sparsity up from {low:g} ({bound}): try {middle:g}",
    )


def _without_sparsity(record: dict, defaults: Defaults) -> str:
    """The record's steps as copied, with the prune step's sparsity left out: a chain's family."""
    steps = []
    for step in _copied_recipe(record, defaults):
        config = {k: v for k, v in step.config.items() if not (step.technique == "prune" and k == "target_sparsity")}
        steps.append({"technique": step.technique, "config": config})
    return _key(steps)


def _channels(evidence: _Evidence, techniques) -> Proposal | None:
    """Channel pruning then int8, once, for latency or mix on a conv model, when no channel pruning was tried.

    Magnitude and 2:4 sparsity leave the zeros in dense kernels, so they do
    not make a conv model faster; removing whole filters does, and keeps the
    user's architecture (a dense student does not).
    """
    if not evidence.objective.startswith(("latency", "mix")) or not evidence.has_conv():
        return None
    if not accepts_channels(techniques):
        return None
    if any(run.method == "channels" for run in evidence.prune_runs()):
        return None
    return channel_proposal(
        techniques,
        "channel pruning for a conv model: removing whole filters makes the model faster on any runtime and keeps "
        "its architecture (sparse kernels do not run faster)",
    )


def channel_proposal(techniques, why: str) -> Proposal:
    """``prune(method=channels, target_sparsity=CHANNEL_START)>quantize(int8)`` at prune's default epochs."""
    epochs = Defaults(techniques).epochs("prune") or 1
    return Proposal([_prune("channels", CHANNEL_START, epochs, ()), _quantize("int8")], why)


def accepts_channels(techniques) -> bool:
    """True when the installed ``prune`` technique accepts ``method=channels`` (structured channel removal)."""
    try:
        techniques.get("prune").Config(method="channels", target_sparsity=CHANNEL_START)
    except Exception:  # an older prune without the method, or no prune at all
        return False
    return True


def _sensitive_layers(rows, budget: float, int8: bool = False) -> list[dict]:
    """Rows whose drop (pruned alone, or ``int8`` weights alone) exceeds the budget, kept within KEEP_SHARE.

    The layers saving the most of the metric per kernel param come first.
    """
    total = sum(r["params"] for r in rows)
    chosen, share = [], 0
    for row in sorted(rows, key=lambda r: (-sensitivity_drop(r, int8) / max(r["params"], 1), r["layer"])):
        if sensitivity_drop(row, int8) > budget + TOLERANCE and share + row["params"] <= KEEP_SHARE * total:
            chosen.append(row)
            share += row["params"]
    return chosen


def _layer_list(rows, int8: bool, what: str) -> str:
    def drop(row):
        value = sensitivity_drop(row, int8)
        if row.get("metric", "accuracy") == "accuracy":
            return f"val drop {value * 100:+.2f} pt"
        return f"val {row['metric']} drop {value:+.4g}"

    return ", ".join(f"{r['layer']} ({r['params']:,} params, {drop(r)} {what})" for r in rows)


def _keep_sensitive_dense(evidence: _Evidence) -> Proposal | None:
    """Keep the most prune-sensitive layers dense and prune the rest to the upper end of the bracket."""
    rows = _sensitive_layers(evidence.sensitivity, evidence.budget)
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
            f"keep the most sensitive layers dense: {_layer_list(rows, False, f'pruned alone to {pruned_to}')}"
            f" ({kept / total:.1%} of kernel params), and prune the rest to {high:g}, beyond '{best.record['recipe']}' "
            f"(sparsity {low:g}, {_drop(best.record)}; {bracket.bound})"
        ),
    )


def _float_sensitive(evidence: _Evidence) -> Proposal | None:
    """The best chain (on the objective) over budget that quantizes to int8, with the int8-sensitive layers float (QAT)."""
    rows = _sensitive_layers(evidence.sensitivity, evidence.budget, int8=True)
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
            f"{_layer_list(rows, True, 'with int8 weights alone')}; quantization-aware training of "
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
    provisional = not feasible
    if provisional:  # none within budget yet: start from one a little over it after short fine-tuning
        feasible = [s for s in students if evidence.provisional(s.record)]
    if not feasible:
        return _retreat_distill(evidence, students, architecture)
    best = min(feasible, key=lambda s: (s.width, val_drop(s.record)))
    high = float(best.width)
    # A student over budget bounds the bracket when it was trained at least as long as the best one.
    below = [s.width for s in students if not evidence.usable(s.record) and s.width < high and s.epochs >= best.epochs]
    low = max(below) if below else WIDTH_FLOOR
    if high / low < MIN_WIDTH_RATIO:
        return None
    middle = round(math.sqrt(low * high), 4)
    steps = _copied_recipe(best.record, evidence.defaults)
    steps[best.index] = best.proposed(middle, evidence.defaults)
    bound = f"widest student over budget {low:g}" if below else f"nothing over budget yet, floor {low:g}"
    if provisional:
        bound += "; provisional start: a little over budget after short fine-tuning"
    kind = "" if architecture == "same" else f" of {architecture} students"
    return Proposal(
        steps,
        f"bisect distill width{kind} down from '{best.record['recipe']}' "
        f"(width {high:g}, {_drop(best.record)}; {bound}): try {middle:g}",
    )


def _retreat_distill(evidence: _Evidence, students: list, architecture: str) -> Proposal | None:
    """Every student of ``architecture`` is over budget: try one wider than the widest tried (its width's
    square root, halfway to the teacher's width on a log scale), while that is clearly narrower than the teacher."""
    if not students:
        return None
    widest = max(students, key=lambda s: (s.width, -val_drop(s.record)))
    wider = round(math.sqrt(widest.width), 4)
    if 1 / wider < MIN_WIDTH_RATIO or any(s.width >= wider for s in students):
        return None
    steps = _copied_recipe(widest.record, evidence.defaults)
    steps[widest.index] = widest.proposed(wider, evidence.defaults)
    kind = "student" if architecture == "same" else f"{architecture} student"
    return Proposal(
        steps,
        f"every {kind} tried is over budget (widest: '{widest.record['recipe']}', {_drop(widest.record)}): "
        f"retreat to width {wider:g}",
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


def _standing(evidence: _Evidence, record: dict) -> str:
    return "feasible" if evidence.feasible(record) else "nearly feasible"


def _chains(evidence: _Evidence) -> list[Proposal]:
    """The best student pruned like the best prune then int8, and the best prune with QAT.

    From candidates within budget, or, for a family with none yet, from
    provisional ones (a little over budget after short fine-tuning).
    """
    prunes = [p for p in evidence.prune_runs() if p.method != "channels"]
    prunes = [p for p in prunes if evidence.feasible(p.record)] or [p for p in prunes if evidence.provisional(p.record)]
    # Pruning goes into the narrowest width-scaled student (dense students' widths are not comparable).
    students = [s for s in evidence.students() if evidence.feasible(s.record)] or [
        s for s in evidence.students() if evidence.provisional(s.record)
    ]

    def most(runs):
        return max(runs, key=lambda p: (p.sparsity, -val_drop(p.record)), default=None)

    best_student = min(students, key=lambda s: (s.width, val_drop(s.record)), default=None)
    # A student is pruned like the best plain prune: keep_dense names the teacher's layers, and a narrow student
    # has no slack for the sparsity its teacher reached with them dense (demo:mlp: 0.98 on a 0.125 student: +17 pt).
    plain = most(p for p in prunes if not p.keep)
    # Once a student was pruned within budget, a narrower one is pruned like that chain, not like the teacher: a
    # narrow student has less to spare (demo:mlp: 0.125 pruned to the teacher's 0.89 lost 12 pt, 0.088 to 0.935 41).
    pruned_students = [
        run
        for run in (_prune_step(r, evidence.defaults) for r in evidence.records if evidence.feasible(r))
        if run is not None and not run.keep and _distill_step(run.record, evidence.defaults) is not None
    ]
    plain = most(pruned_students) or plain
    out = []
    if plain and best_student:
        out.append(
            Proposal(
                [
                    best_student.proposed(best_student.width, evidence.defaults),
                    plain.proposed(plain.sparsity),
                    _quantize("int8"),
                ],
                f"combine families: narrowest {_standing(evidence, best_student.record)} student "
                f"'{best_student.record['recipe']}' ({_drop(best_student.record)}) pruned like "
                f"'{plain.record['recipe']}' ({_drop(plain.record)}), then int8",
            )
        )
    best_prune = most(prunes)
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
    under QAT), and a conv model (rows of type ``Conv...``) gets channel
    pruning for latency or mix when the installed ``prune`` has
    ``method=channels``.

    Proposals come in families: prune (sensitive layers dense, then the
    bisections of each method and ``keep_dense`` set), distillation (the width
    bisections of same-architecture and dense students, the family with the
    best feasible student first), chains (the best chain within budget pushed
    further, distill>prune>int8, prune>qat), longer fine-tuning, float layers
    and the dense student. A round takes the best proposal of each family in
    turn, then the second of each, so a few trials cover every direction that
    can still gain. Family order: for size prune, distillation, chains, longer
    fine-tuning, float layers, then the dense student last; for latency and mix channel
    pruning and the dense student first, then distillation, prune, and the rest
    (for latency without sparse-weight pruning: zeros in dense kernels run no faster).
    Bisections may start from a chain a little over budget after short
    fine-tuning (it is retried at the default epochs in the same round).
    Only the validation split decides what is feasible or best.
    ``techniques`` is the registry whose ``Config`` defaults fill what a
    record's steps leave out.
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
    runs = evidence.prune_runs()
    keep_sets = sorted({(run.method, run.keep) for run in runs if run.keep})
    methods = sorted({run.method for run in runs}, key=lambda m: (m != "magnitude", m))
    prune = [_keep_sensitive_dense(evidence)]
    prune += [_bisect_prune(evidence, keep, method) for method, keep in keep_sets]
    prune += [_bisect_prune(evidence, (), method) for method in methods]
    if objective != "size":  # channels make a conv model faster: bisect them first
        prune.sort(key=lambda p: p is None or "method=channels" not in p.recipe)
    distill = _distill_order(evidence, {a: _bisect_distill(evidence, a) for a in ("same", "dense")})
    chains = [_push_chain(evidence)] + _chains(evidence)
    longer = _longer(evidence)
    floats = [_float_sensitive(evidence)]
    dense = [_dense_student(evidence)]
    if objective == "size":  # a dense student rarely makes a conv model smaller: only after everything else
        ordered = _round_robin([prune, distill, chains, longer, floats]) + _round_robin([dense])
    elif objective == "latency":  # zeros in dense kernels cost as much time as any weight: only channels pay off
        prune = [p for p in prune if p is not None and "method=channels" in p.recipe]
        chains = [p for p in chains if p is not None and not _sparse_only(p)]
        ordered = _round_robin([[_channels(evidence, techniques)], dense, distill, prune, chains, longer, floats])
    else:
        ordered = _round_robin([[_channels(evidence, techniques)], dense, distill, prune, chains, longer, floats])
    out = []
    for proposal in ordered:
        if len(out) >= max_trials:
            break
        proposal = _fully_fine_tuned(proposal, evidence.defaults)
        key = _canonical(proposal.to_recipe(), techniques)
        if key in seen:
            continue
        seen.add(key)
        out.append(proposal)
    return out


def _sparse_only(proposal: Proposal) -> bool:
    """The proposal prunes weights to zeros (magnitude, l1, m:n) rather than removing channels."""
    return any(step.technique == "prune" and step.config.get("method") != "channels" for step in proposal.steps)


def _round_robin(families: list[list[Proposal | None]]) -> list[Proposal]:
    """The first proposal of each family in order, then the second of each, and so on (Nones skipped)."""
    families = [[p for p in family if p is not None] for family in families]
    out = []
    for depth in range(max((len(f) for f in families), default=0)):
        out += [family[depth] for family in families if depth < len(family)]
    return out


def round_gain(records: list[dict], number: int, *, max_accuracy_drop: float | str, objective: str) -> float | None:
    """How much round ``number`` improved the best candidate within budget (validation split) on ``objective``.

    ``before / after - 1`` of the objective value (lower is better: 0.25 means
    the best got 25% smaller, faster or both), over the candidates of rounds up
    to ``number - 1`` and up to ``number``; ``inf`` when round ``number`` found
    the first candidate within budget, 0.0 when neither found one. None when
    round ``number`` ran no candidate.
    """
    if not any((r.get("round") or 1) == number for r in records):
        return None
    earlier = [r for r in records if (r.get("round") or 1) < number]
    upto = [r for r in records if (r.get("round") or 1) <= number]
    # Both sides on one latency baseline (that of all the records): a gain is the candidates', not the load's.
    before = best_feasible(earlier, max_accuracy_drop, objective, among=records)
    after = best_feasible(upto, max_accuracy_drop, objective, among=records)
    if after is None:
        return 0.0
    if before is None:
        return math.inf
    value = steady_objective(records, objective)
    return value(before) / value(after) - 1


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
    until_no_gain: bool = False,
) -> tuple[list[Proposal], str | None]:
    """The recipes of refinement round ``number`` (2, 3, ...), or why the search stops here.

    One decision shared by the in-process search and the pipeline's propose
    step: stop when ``stop_when_met`` and a candidate reached ``target`` (on the
    validation split), when ``elapsed`` seconds passed ``max_time``, with
    ``until_no_gain`` when the last refinement round did not improve the best
    candidate within budget by more than ``MIN_GAIN`` (:func:`round_gain`), or
    when :func:`propose` finds nothing left to refine. Returns ``(proposals, None)``
    or ``([], reason)``.
    """
    check_stop_when_met(stop_when_met, target)
    if until_no_gain and number > 2:
        gain = round_gain(records, number - 1, max_accuracy_drop=max_accuracy_drop, objective=objective)
        # A latency gain smaller than the latency measurement can resolve is noise, not progress.
        least = MIN_GAIN if objective == "size" else max(MIN_GAIN, LATENCY_RESOLUTION)
        if gain is not None and gain <= least:
            return [], (
                f"round {number - 1} improved the best candidate within budget by {gain:.1%} "
                f"(validation split), not more than {least:.0%}"
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
