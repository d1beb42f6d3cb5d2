"""What each pipeline step does, as plain functions on local directories.

The KFP components in :mod:`kfopt.components.ops` only turn artifacts into
paths and call these; tests call them directly. They are built on the same
step functions as ``kfopt optimize`` (:func:`kfopt.engine.prepare`,
:func:`kfopt.engine.run_recipe`, one :class:`kfopt.evaluate.Evaluator`), so a
candidate measured in a pipeline is measured exactly like one measured in-process.

What a step writes into its output directory:

- prepare: ``baseline/`` = the model as it was loaded (``model.keras``, or
  ``saved_model/`` for a SavedModel served through its signature) +
  ``baseline.json`` (where it came from, its format, the output the metric is
  computed on, and its metrics); ``data/`` = ``data.json`` (+ ``data.npz``, a copy of an
  .npz source, so every step reads the same bytes).
- optimize / evaluate: ``candidate/`` = the model file + ``candidate.json``
  (the candidate record: recipe, status, reason, metrics).
- optimize-group (several recipes in one step): ``candidates/`` =
  ``group.json`` (the recipes, in order, and the folder of each) + one folder
  per recipe as an optimize step writes it.
- select: ``results/`` = ``metrics.json`` (a :class:`kfopt.result.RunResult`, as
  ``kfopt optimize`` writes it: baseline, candidates with ``artifact`` paths,
  winner, pareto) + copies of the baseline and every candidate model, so the
  folder is self-contained for ``kfopt.promotion.promote_from`` and ``kfopt promote --from``.

How each step went is not written here: the components record it in their
``status`` output (:mod:`kfopt.components.status`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from kfopt.errors import KfoptError
from kfopt.progress import Reporter
from kfopt.recipe_search import ROUND_ONE_WHY
from kfopt.result import Baseline, Candidate, RunResult, Tracking
from kfopt.rundir import read_json, slug, writable_dir, write_json

from .status import StepStatus, candidate_line, proposal_line, stopped_line

BASELINE_FILE = "baseline.json"
CANDIDATE_FILE = "candidate.json"
GROUP_FILE = "group.json"
DATA_FILE = "data.json"
#: The baseline's file when baseline.json does not say (records written before it said).
BASELINE_MODEL = "model.keras"


# -- prepare ---------------------------------------------------------------------
def prepare_step(
    model: str,
    data: str,
    baseline_dir,
    data_dir,
    *,
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    metric: str | None = None,
    output: str | int | None = None,
    fingerprint: str | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Load (or train, for ``demo:*``) the baseline, measure it, and store it and the data spec.

    ``model`` may also be a URI (``gs://...``) that ``tf.io.gfile`` can read.
    The baseline is stored in the format it was loaded in (a SavedModel without
    Keras layers stays a SavedModel). ``metric`` is the budgeted metric (None:
    the task's default) and ``output`` the output it is computed on (a name or
    an index; None: the first); the task the Evaluator read (``task``, with the
    model's compiled loss) and the output's name are stored so every later step
    scores and fine-tunes the same way. ``fingerprint`` (what the model and data
    were, see :mod:`kfopt.components.fingerprint`) is recorded as given. Returns
    the content of ``baseline.json``.
    """
    from kfopt.engine import prepare
    from kfopt.evaluate import Evaluator

    reporter = reporter or Reporter(enabled=False)
    baseline_dir, data_dir = writable_dir(baseline_dir), writable_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="kfopt-prepare-") as tmp:
        handle, dataset = prepare(
            _fetch(model, Path(tmp) / "source"),
            data,
            seed=seed,
            unsafe=unsafe,
            epochs=epochs,
            reporter=reporter,
            workdir=tmp,
        )
        artifact = handle.save(baseline_dir)
        reporter.say("Measuring the baseline")
        evaluator = Evaluator(dataset, handle, Path(tmp) / "reference", metric=metric, output=output or None)
        metrics = evaluator.baseline_metrics()
    _store_data(data, data_dir, dataset)
    baseline = {
        "model": model,
        "data": data,
        "seed": seed,
        "unsafe": unsafe,
        "format": handle.format,
        "artifact": artifact.name,
        "output": evaluator.output,
        "fingerprint": fingerprint,
        "input_shape": list(dataset.input_shape),
        "splits": dataset.splits.as_dict(),
        "task": evaluator.task.as_dict(),
        "metrics": metrics,
    }
    write_json(baseline_dir / BASELINE_FILE, baseline)
    return baseline


def _fetch(model: str, target: Path) -> str:
    """A local path for ``model``: URIs (gs://, s3://, ...) are copied with tf.io.gfile first."""
    if "://" not in model:
        return model
    from kfopt import _tf

    gfile = _tf.tf().io.gfile
    if not gfile.exists(model):
        raise KfoptError(f"Model '{model}' does not exist.", "check the URI and that this step can read it.")
    local = target / model.rstrip("/").rsplit("/", 1)[-1]
    if gfile.isdir(model):
        for root, _, files in gfile.walk(model):
            rel = root[len(model.rstrip("/")) :].lstrip("/")
            (local / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                gfile.copy(f"{root.rstrip('/')}/{name}", str(local / rel / name), overwrite=True)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        gfile.copy(model, str(local), overwrite=True)
    return str(local)


def _store_data(data: str, data_dir: Path, dataset) -> None:
    """Record the data spec; an .npz source is copied so every step reads the same bytes.

    The bundled ``digits`` are stored as the splits ``dataset`` holds (an .npz
    with ``x_val``/``y_val``, inputs as this model reads them): every later step
    reads the very same arrays without importing scikit-learn, which costs each
    step's process about a second.
    """
    info = {"source": data, "spec": data, "file": None, "validation_from": dataset.validation_from}
    if data.endswith(".npz") or "://" in data:
        from kfopt import _tf

        _tf.tf().io.gfile.copy(data, str(data_dir / "data.npz"), overwrite=True)
        info.update(spec=None, file="data.npz")
    elif data == "digits":
        import numpy as np

        splits = {"train": dataset.train, "val": dataset.validation, "test": dataset.test}
        arrays = {f"{axis}_{name}": getattr(split, axis) for name, split in splits.items() for axis in ("x", "y")}
        np.savez(data_dir / "data.npz", **arrays)
        info.update(spec=None, file="data.npz")
    write_json(data_dir / DATA_FILE, info)


def load_step_data(data_dir, input_shape, seed: int = 0, *, baseline=None):
    """The :class:`kfopt.data.Data` a prepare step stored in ``data_dir``.

    With ``baseline`` (a ModelHandle) the data is matched to its inputs (count,
    dtypes, names) as the prepare step matched it; else checked against ``input_shape``.
    """
    from kfopt.data import load_data

    info = read_json(Path(data_dir) / DATA_FILE, "data spec")
    spec = str(Path(data_dir) / info["file"]) if info.get("file") else info["spec"]
    inputs = None
    if baseline is not None:
        from kfopt.signature import model_info

        inputs = model_info(baseline).inputs
    return load_data(
        spec,
        input_shape=tuple(input_shape),
        inputs=inputs,
        seed=seed,
        validation_from=info.get("validation_from", "test"),
    )


def baseline_model_path(baseline_dir, info: dict) -> Path:
    """Where a prepare step saved the baseline model (``info`` is its baseline.json)."""
    return Path(baseline_dir) / (info.get("artifact") or BASELINE_MODEL)


def load_baseline(baseline_dir):
    """(the baseline ModelHandle, the content of baseline.json) from a prepare step's output.

    Opens the model in the format the prepare step stored (``format`` in
    baseline.json): a Keras model through :func:`kfopt.models.load_keras` (safe
    mode unless the run is ``unsafe``; a Keras 3 file comes back as Keras 3), a
    SavedModel without Keras layers as a ``saved_model`` handle served through its signature.
    """
    from kfopt.models import load_keras
    from kfopt.plugins.technique import ModelHandle

    info = read_json(Path(baseline_dir) / BASELINE_FILE, "baseline record")
    path = baseline_model_path(baseline_dir, info)
    # The saved baseline has no compile configuration: its compiled loss travels in baseline.json's task.
    loss = (info.get("task") or {}).get("loss")
    facts = {"loss": loss} if loss else None
    model_format = info.get("format") or "keras"
    if model_format == "keras":
        model = load_keras(path, unsafe=info.get("unsafe", False))
        return ModelHandle("keras", keras_model=model, path=path, info=facts), info
    if not path.exists():
        raise KfoptError(f"The prepared baseline '{path}' does not exist.", "re-run the pipeline's prepare step.")
    return ModelHandle(model_format, path=path, info=facts), info


# -- optimize / evaluate -----------------------------------------------------------
class _Unmeasured:
    """Stands in for the Evaluator when measuring happens in a later step (on the CPU pool).

    It keeps the facts a saved artifact cannot tell (``ModelHandle.info``) so
    the evaluate step can measure the model exactly as run_recipe would have.
    """

    def __init__(self, info: dict):
        from kfopt.task import Task

        # The task the prepare step read: fine-tuning picks its loss from it (run_recipe passes it on).
        self.task = Task.from_dict(info["task"]) if info.get("task") else None
        # The output the metric is computed on: fine-tuning trains that output on the labels.
        self.output = info.get("output")

    def evaluate(self, handle) -> dict:
        return {"format": handle.format, "info": dict(handle.info)}


class _Shared:
    """What the recipes of one step share, loaded once: the techniques, the baseline, its data, one Evaluator.

    A step that runs several recipes (:func:`optimize_group_step`) measures
    them all with one Evaluator, as ``kfopt optimize`` and ``kfopt search`` do
    in-process, so the baseline's reference in each format is converted and
    measured once. Loading happens on first use, after a recipe was parsed and
    planned: a recipe that cannot be planned fails without touching the
    baseline, and a baseline that cannot be loaded fails every recipe (each a
    failed candidate, never a failed step).
    """

    def __init__(self, baseline_dir, data_dir, workdir: Path, *, seed: int, measure: bool, registry=None):
        self.baseline_dir, self.data_dir, self.workdir = baseline_dir, data_dir, Path(workdir)
        self.seed, self.measure = seed, measure
        self._registry = registry
        self._loaded = None

    @property
    def registry(self):
        if self._registry is None:
            from kfopt.plugins.manager import registry as build_registry

            self._registry = build_registry()
        return self._registry

    def load(self):
        """(baseline ModelHandle, Data, Evaluator or _Unmeasured)."""
        if self._loaded is None:
            baseline, info = load_baseline(self.baseline_dir)
            dataset = load_step_data(self.data_dir, info["input_shape"], self.seed, baseline=baseline)
            evaluator = (
                _evaluator(dataset, baseline, self.workdir / "reference", info) if self.measure else _Unmeasured(info)
            )
            self._loaded = baseline, dataset, evaluator
        return self._loaded


def optimize_step(
    recipe,
    baseline_dir,
    data_dir,
    candidate_dir,
    *,
    seed: int = 0,
    measure: bool = True,
    position: int | None = None,
    round: int = 1,
    why: str | None = None,
    registry=None,
    reporter: Reporter | None = None,
) -> Candidate:
    """Run one recipe on the prepared baseline; write the candidate and ``candidate.json``.

    ``recipe`` is inline text, a recipe mapping (``Recipe.to_dict()``) or a
    Recipe; ``round`` and ``why`` say which search round proposed it and why
    (kept for the search trace). With ``measure=False`` the candidate is saved unmeasured, for
    :func:`evaluate_step`. Never raises for a bad recipe or a failing
    technique: the candidate gets status ``failed`` (or ``skipped``) and a reason.
    """
    with tempfile.TemporaryDirectory(prefix="kfopt-optimize-") as tmp:
        shared = _Shared(baseline_dir, data_dir, Path(tmp), seed=seed, measure=measure, registry=registry)
        return _optimize_one(recipe, shared, candidate_dir, position=position, round=round, why=why, reporter=reporter)


def optimize_group_step(
    items: list[dict],
    baseline_dir,
    data_dir,
    candidates_dir,
    *,
    seed: int = 0,
    registry=None,
    reporter: Reporter | None = None,
) -> list[Candidate]:
    """Run several recipes one after another in this step, each measured here with one Evaluator.

    ``items`` are loop items as :func:`optimize_step` takes them (``recipe``,
    ``position``, optionally ``round`` and ``why``). Post-training recipes take
    seconds, less than a step's start (a fresh Python importing TensorFlow),
    so the pipeline runs them in a few such steps instead of one step each (a
    fine-tuning recipe comes alone, when the pipeline has one loop). Writes ``group.json`` first (every recipe and its
    folder, so a step that dies midway still names its recipes), then one
    folder per recipe with its candidate and ``candidate.json`` exactly as
    :func:`optimize_step` writes them. A failing recipe is a failed candidate;
    the recipes after it still run.
    """
    reporter = reporter or Reporter(enabled=False)
    candidates_dir = writable_dir(candidates_dir)
    entries = [
        {"folder": f"{index:02d}", "recipe": _label(item["recipe"]), "position": item.get("position")}
        for index, item in enumerate(items)
    ]
    write_json(candidates_dir / GROUP_FILE, {"candidates": entries})
    found = []
    with tempfile.TemporaryDirectory(prefix="kfopt-optimize-") as tmp:
        shared = _Shared(baseline_dir, data_dir, Path(tmp), seed=seed, measure=True, registry=registry)
        for entry, item in zip(entries, items):
            found.append(
                _optimize_one(
                    item["recipe"],
                    shared,
                    candidates_dir / entry["folder"],
                    position=item.get("position"),
                    round=item.get("round", 1),
                    why=item.get("why"),
                    reporter=reporter,
                )
            )
    return found


def _optimize_one(
    recipe, shared: _Shared, candidate_dir, *, position: int | None, round: int, why: str | None, reporter
) -> Candidate:
    """One recipe of a step: see :func:`optimize_step`."""
    from kfopt.engine import run_recipe
    from kfopt.recipe import parse_recipe, plan

    reporter = reporter or Reporter(enabled=False)
    candidate_dir = writable_dir(candidate_dir)
    label = _label(recipe)
    try:
        parsed = parse_recipe(recipe)
        label = parsed.label
        planned = plan(parsed, shared.registry)
        baseline, dataset, evaluator = shared.load()
        with tempfile.TemporaryDirectory(prefix="kfopt-candidate-", dir=shared.workdir) as tmp:
            candidate = run_recipe(
                parsed,
                planned,
                baseline,
                dataset,
                evaluator,
                Path(tmp) / "candidate",
                seed=shared.seed,
                reporter=reporter,
            )
            if candidate.ok:
                candidate.artifact = str(_copy_model(Path(candidate.artifact), candidate_dir))
    except Exception as exc:  # a bad recipe or a broken input is this candidate's failure, not the run's
        candidate = _failed(label, exc)
    candidate.measured = bool(shared.measure and candidate.ok)
    candidate.round, candidate.why = round, why or ROUND_ONE_WHY
    if position is not None:
        candidate.position = position
    write_json(candidate_dir / CANDIDATE_FILE, candidate.to_dict())
    reporter.say(candidate_line(candidate))
    return candidate


def evaluate_step(
    candidate_in, baseline_dir, data_dir, candidate_out, *, seed: int = 0, reporter: Reporter | None = None
) -> Candidate:
    """Measure a candidate that :func:`optimize_step` saved unmeasured; write it to ``candidate_out``.

    Failed, skipped and already measured candidates pass through unchanged.
    """
    from kfopt.engine import non_finite
    from kfopt.plugins.technique import ModelHandle

    reporter = reporter or Reporter(enabled=False)
    candidate_out = writable_dir(candidate_out)
    candidate = read_candidate(candidate_in)
    info, candidate.info = candidate.info or {}, None
    if candidate.ok:
        try:
            path = _copy_model(Path(candidate_in) / Path(candidate.artifact).name, candidate_out)
            if not candidate.measured:
                baseline, baseline_info = load_baseline(baseline_dir)
                dataset = load_step_data(data_dir, baseline_info["input_shape"], seed, baseline=baseline)
                reporter.say(
                    f"[{candidate.recipe}] evaluating {candidate.format} candidate on {len(dataset.test)} test samples"
                )
                with tempfile.TemporaryDirectory(prefix="kfopt-evaluate-") as tmp:
                    # The format the technique declared, not one guessed from the file name.
                    handle = ModelHandle(candidate.format, path=path, info=info)
                    evaluator = _evaluator(dataset, baseline, Path(tmp), baseline_info)
                    candidate.record(evaluator.evaluate(handle))
                    broken = non_finite(handle, evaluator)
                    if broken:  # never "ok", so it can never win
                        candidate.status, candidate.reason = "failed", f"non-finite: {broken}"
                candidate.measured = True
            candidate.artifact = str(path)
        except Exception as exc:
            candidate = _failed(
                candidate.recipe,
                exc,
                steps=candidate.steps,
                measured=False,
                position=candidate.position,
                round=candidate.round,
                why=candidate.why,
            )
    write_json(candidate_out / CANDIDATE_FILE, candidate.to_dict())
    return candidate


def read_candidate(directory) -> Candidate:
    """The candidate record an optimize or evaluate step wrote into ``directory``."""
    return Candidate.model_validate(read_json(Path(directory) / CANDIDATE_FILE, "candidate record"))


def _evaluator(dataset, baseline, workdir, info: dict):
    """The Evaluator of a step: the metric the prepare step chose (``info`` is baseline.json)."""
    from kfopt.evaluate import Evaluator

    return Evaluator(
        dataset, baseline, workdir, metric=(info.get("task") or {}).get("metric"), output=info.get("output")
    )


def _copy_model(source: Path, directory: Path) -> Path:
    target = Path(directory) / source.name
    if source.resolve() == target.resolve():
        return target
    if source.is_dir():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return target


def _label(recipe) -> str:
    if isinstance(recipe, dict) and recipe.get("name"):
        return str(recipe["name"])
    return getattr(recipe, "label", None) or str(recipe)


def _failed(label: str, exc: BaseException, **fields) -> Candidate:
    """The failed candidate of a recipe whose step raised ``exc`` (a bug's traceback is kept, a KfoptError's is not)."""
    if isinstance(exc, KfoptError):
        return Candidate.failed(label, exc.one_line(), **fields)
    return Candidate.failed(label, f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), **fields)


# -- search rounds ---------------------------------------------------------------
SEARCH_FILE = "search.json"
#: The status of the one item a propose step emits when the search has stopped: a KFP loop
#: always gets at least one item (an empty ParallelFor breaks the fan-in in kfp.local).
STOPPED = "stopped"


def plan_search_step(
    baseline_dir,
    search_dir,
    *,
    rounds: int,
    max_trials: int = 4,
    max_time: float = 0,
    target: float = 0,
    stop_when_met: bool = False,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    until_no_gain: bool = False,
    channels_at: int = -1,
    registry=None,
) -> dict:
    """Write ``search.json``: the search's bounds (``settings``) and the round-1 channel pruning recipes
    (``round_one``); :func:`sensitivity_step` adds the layer sensitivity.

    Pipeline parameters use 0 for "none" (``max_time``, ``target``).
    ``until_no_gain``: refine while a round gains, at most ``rounds`` rounds (a
    pipeline compiled without an explicit number of rounds), as ``kfopt
    search`` does. ``channels_at`` >= 0 (the built-in search space): channel
    pruning joins round 1 where ``kfopt search`` adds it, decided by the same
    function (:func:`kfopt.recipe_search.driver.channel_recipes`: objective
    latency or mix, a Keras conv model), its loop items numbered from that
    position; -1: none. Round 1 is the same with or without refinement rounds.
    The propose and select steps of every round read this file.
    """
    from kfopt.recipe_search import search_settings
    from kfopt.recipe_search.driver import channel_recipes
    from kfopt.select import budget_value

    settings = search_settings(
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time or None,
        objective=objective,
        max_accuracy_drop=budget_value(max_accuracy_drop),
        target=target or None,
        stop_when_met=stop_when_met,
        until_no_gain=until_no_gain,
    )
    round_one = []
    info = read_json(Path(baseline_dir) / BASELINE_FILE, "baseline record")
    # channel_recipes proposes nothing for objective size: the model (and TensorFlow) is not loaded for it.
    if channels_at >= 0 and objective != "size" and (info.get("format") or "keras") == "keras":
        from kfopt.plugins.manager import registry as installed

        baseline, _ = load_baseline(baseline_dir)
        registry = registry or installed()
        round_one = [
            {"position": channels_at + index, "round": 1, "why": proposal.why, "recipe": proposal.recipe}
            for index, proposal in enumerate(channel_recipes(baseline.keras(), objective, registry))
        ]
    plan = {"settings": settings, "layer_sensitivity": [], "round_one": round_one}
    write_json(writable_dir(search_dir) / SEARCH_FILE, plan)
    return plan


def check_sensitivity(sensitivity: float) -> None:
    """A KfoptError unless ``sensitivity`` is a sparsity in [0, 1) (0: no sensitivity pass)."""
    if not 0 <= sensitivity < 1:
        raise KfoptError(
            f"sensitivity={sensitivity} is not a sparsity in [0, 1).",
            "pass e.g. 0.9 (each layer alone pruned to 90%), or 0 to skip the sensitivity pass.",
        )


def sensitivity_step(
    baseline_dir,
    data_dir,
    plan_dir,
    search_dir,
    *,
    sensitivity: float = 0.9,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> list[dict]:
    """Measure the baseline's layer sensitivity; write the plan's ``search.json`` with it to ``search_dir``.

    A step of its own, beside round 1 rather than before it: on a big model it
    takes minutes, and only the refinement rounds use it. Measured on a Keras
    baseline only (a SavedModel without Keras layers has none to prune), in
    the run's task, metric and output (baseline.json's, through the step's
    Evaluator); ``sensitivity`` 0 skips it. Returns the rows.
    """
    from kfopt.recipe_search import layer_sensitivity

    reporter = reporter or Reporter(enabled=False)
    check_sensitivity(sensitivity)
    plan = read_json(Path(plan_dir) / SEARCH_FILE, "search plan")
    rows = []
    info = read_json(Path(baseline_dir) / BASELINE_FILE, "baseline record")
    if sensitivity and (info.get("format") or "keras") == "keras":
        baseline, info = load_baseline(baseline_dir)
        dataset = load_step_data(data_dir, info["input_shape"], seed, baseline=baseline)
        with tempfile.TemporaryDirectory(prefix="kfopt-sensitivity-") as tmp:
            # The run's task, metric and output (baseline.json's), as the in-process search passes its own.
            evaluator = _evaluator(dataset, baseline, Path(tmp), info)
            reporter.say(
                f"Layer sensitivity: one layer at a time pruned to {sensitivity:.0%}, then its weights int8 "
                f"(validation split, {evaluator.metric.name})"
            )
            rows = layer_sensitivity(
                baseline.keras(),
                dataset,
                sensitivity,
                task=evaluator.task,
                metric=evaluator.metric,
                output=evaluator.output,
            )
    elif sensitivity:
        reporter.say(f"Layer sensitivity: skipped, the baseline is a {info.get('format')} without Keras layers")
    plan["layer_sensitivity"] = rows
    write_json(writable_dir(search_dir) / SEARCH_FILE, plan)
    return rows


def round_one_items(plan: dict, items: list[str] = (), *, groups: bool = False) -> list[str]:
    """The round-1 loop items the channel recipes join: ``items`` (the loop's own, JSON) and then one per
    channel recipe a plan step proposed (:func:`plan_search_step`), as a one-recipe group with ``groups``
    (a loop of optimize-group steps).

    A KFP loop always gets at least one item (an empty ParallelFor breaks the
    fan-in in kfp.local): with neither, the one item is a round-1 ``stopped``
    no-op, which :func:`select_step` drops (a round-1 item never stops the search).
    """
    proposed = plan.get("round_one") or []
    for item in proposed:
        print(proposal_line(1, item["recipe"], item["why"]), flush=True)
    found = list(items) + [json.dumps([item] if groups else item) for item in proposed]
    if not found:
        return [json.dumps({"round": 1, STOPPED: "no round-1 channel pruning (objective, model or search space)"})]
    return found


def propose_step(results_dir, search_dir, number: int, *, registry=None) -> list[str]:
    """The loop items of search round ``number``: JSON of ``{"position", "round", "why", "recipe"}`` each.

    Decides with :func:`kfopt.recipe_search.next_round` on every candidate so far (the
    previous select step's results; validation split only). ``max_time`` counts
    the optimization seconds of those candidates, which holds when steps run in
    parallel or come from the cache. When the search stops, the one item is
    ``{"round", "stopped": reason}`` so the round's loop runs a no-op.
    """
    from kfopt.recipe_search import next_round, optimization_seconds

    result = RunResult.load(results_dir)
    settings = read_json(Path(search_dir) / SEARCH_FILE, "search plan")
    bounds = settings["settings"]
    stopped = (result.search or {}).get("stopped")
    proposals = []
    if not stopped:
        proposals, stopped = next_round(
            result.candidates,
            number,
            max_accuracy_drop=bounds["max_accuracy_drop"],
            objective=bounds["objective"],
            max_trials=bounds["max_trials"],
            target=bounds["target"],
            stop_when_met=bounds["stop_when_met"],
            elapsed=optimization_seconds(result.candidates),
            max_time=bounds["max_time"],
            sensitivity=settings.get("layer_sensitivity"),
            techniques=registry,
            until_no_gain=bounds.get("until_no_gain", False),
        )
    if stopped:
        print(stopped_line(number, stopped), flush=True)
        return [json.dumps({"round": number, STOPPED: stopped})]
    for proposal in proposals:
        print(proposal_line(number, proposal.recipe, proposal.why), flush=True)
    return [
        json.dumps({"position": index, "round": number, "why": proposal.why, "recipe": proposal.recipe})
        for index, proposal in enumerate(proposals)
    ]


def stopped_step(candidate_dir, number: int, reason: str) -> Candidate:
    """What a round's loop writes for the item of a stopped search: a record select reads as the stop reason."""
    candidate = Candidate(recipe=f"(round {number}: none)", status=STOPPED, reason=reason, round=number)
    write_json(writable_dir(candidate_dir) / CANDIDATE_FILE, candidate.to_dict())
    return candidate


# -- select ----------------------------------------------------------------------
def select_step(
    baseline_dir,
    candidate_dirs,
    results_dir,
    *,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    number: int = 1,
    previous_dir=None,
    search_dir=None,
    registry=None,
) -> RunResult:
    """Collect every candidate, pick the winner within the budget, write a self-contained ``results_dir``.

    ``results_dir/metrics.json`` is the run record ``kfopt optimize`` writes, with
    ``artifact`` paths pointing at copies inside ``results_dir``. In a search,
    ``number`` is the round whose candidates these are, ``previous_dir`` the
    previous round's results (its candidates come first, their models copied
    too) and ``search_dir`` the plan of
    :func:`plan_search_step`; the result then also carries ``search``,
    ``search_trace`` and ``layer_sensitivity``, like ``kfopt search`` writes.
    ``best_same_architecture`` names the best candidate that keeps the user's
    architecture, as ``kfopt search`` does (``registry``: the techniques whose
    defaults tell which student a distill step builds; default the installed ones).
    """
    from kfopt.plugins.manager import registry as installed
    from kfopt.recipe_search import ALL_ROUNDS_DONE, best_same_architecture, search_outcome, trace_entry
    from kfopt.rundir import resolve_artifact
    from kfopt.select import budget_value, check_budget, objective_metric, select

    objective_metric(objective)  # a bad objective or budget is the user's error: fail before copying anything
    max_accuracy_drop = budget_value(max_accuracy_drop)
    results_dir = writable_dir(results_dir)
    info = read_json(Path(baseline_dir) / BASELINE_FILE, "baseline record")
    registry = registry or installed()  # the techniques' defaults say which student a distill step builds
    metric = registry.metrics.get(info["metrics"].get("metric_name") or "accuracy")
    if metric is not None:  # a budget of all the metric can lose selects everything and gates no champion
        check_budget(max_accuracy_drop, metric)
    baseline_path = _copy_model(baseline_model_path(baseline_dir, info), writable_dir(results_dir / "baseline"))
    previous = RunResult.load(previous_dir) if previous_dir else None
    candidates, stops, new = [], [], []
    for candidate in previous.candidates if previous else []:
        if candidate.ok:
            candidate.artifact = str(resolve_artifact(previous_dir, candidate.artifact))
        candidates.append(candidate)
    for index, (directory, label, position) in enumerate(_candidate_folders(candidate_dirs)):
        fields = {"position": position} if position is not None else {}
        try:
            candidate = read_candidate(directory)
        except KfoptError as exc:  # missing or broken: the step that writes it failed
            candidate = Candidate.failed(label or f"candidate {index + 1}", exc.one_line(), **fields)
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            reason = f"'{Path(directory) / CANDIDATE_FILE}' is not a candidate record ({first})"
            candidate = Candidate.failed(label or f"candidate {index + 1}", reason, **fields)
        candidate.info = None
        if candidate.status == STOPPED:
            if (candidate.round or 1) > 1:  # a round-1 no-op (no channel recipe) never stops the search
                stops.append(candidate.reason)
            continue
        if candidate.ok:
            candidate.artifact = str(Path(directory) / Path(candidate.artifact).name)
        new.append(candidate)
    # Fan-in order is the order tasks finished in; report in the search's order.
    new.sort(key=lambda c: (c.position is None, c.position or 0))
    candidates += new
    for index, candidate in enumerate(candidates, start=1):
        if candidate.ok:
            target = writable_dir(results_dir / "candidates" / f"{index:02d}-{slug(candidate.recipe)}")
            candidate.artifact = str(_copy_model(Path(candidate.artifact), target))
    references = dict(previous.baseline.references) if previous else {}
    for candidate in candidates:
        if candidate.compared_with:
            references.setdefault(candidate.compared_with["format"], candidate.compared_with)
    result = RunResult(
        model=info["model"],
        data=info["data"],
        seed=info["seed"],
        splits=info.get("splits"),
        baseline=Baseline(**info["metrics"], artifact=str(baseline_path), references=references),
        candidates=candidates,
    )
    if search_dir:
        plan = read_json(Path(search_dir) / SEARCH_FILE, "search plan")
        stopped = ((previous.search if previous else None) or {}).get("stopped") or (stops[0] if stops else None)
        if not stopped and number > plan["settings"]["rounds"]:
            stopped = ALL_ROUNDS_DONE
        result.search = search_outcome(plan["settings"], candidates, stopped)
        result.search_trace = list((previous.search_trace if previous else None) or []) + [
            trace_entry(c, objective) for c in new
        ]
        result.layer_sensitivity = plan.get("layer_sensitivity") or []
    result.settle_baseline_latency().apply(select(candidates, max_accuracy_drop=max_accuracy_drop, objective=objective))
    # As `kfopt search` names it: the best candidate that keeps the user's architecture (the report shows it
    # beside a winner that is a dense student).
    result.best_same_architecture = best_same_architecture(
        candidates, max_accuracy_drop=max_accuracy_drop, objective=objective, techniques=registry
    )
    result.save(results_dir)
    return result


@dataclass
class ConfusionMatrix:
    """The winner's confusion matrix on the test split: ``matrix[true][predicted]`` counts, rows and columns
    in the order of ``categories`` (the class ids as text)."""

    recipe: str
    categories: list[str]
    matrix: list[list[int]]


#: Above this many classes no confusion matrix is logged (a 1000-class matrix is a million cells of metadata).
MAX_CONFUSION_CLASSES = 100


def confusion_step(results_dir, baseline_dir, data_dir, *, seed: int = 0) -> ConfusionMatrix | None:
    """The confusion matrix of a select step's winner on the test split, for KFP's ``ClassificationMetrics``.

    None when there is no winner, the task is not single-label classification
    (multiclass or binary: a regression or multi-label model has no confusion
    matrix) or it has more than ``MAX_CONFUSION_CLASSES`` classes. The winner runs as the Evaluator runs it (its format, the scored
    output, the task's predicted class), on the data the prepare step stored.
    """
    import numpy as np

    from kfopt.evaluate import runner_for
    from kfopt.plugins.technique import ModelHandle
    from kfopt.rundir import resolve_artifact

    result = RunResult.load(results_dir)
    winner = result.winning_candidate
    if winner is None or not winner.ok:
        return None
    baseline, info = load_baseline(baseline_dir)
    if (info.get("task") or {}).get("kind") not in ("multiclass", "binary"):
        return None
    dataset = load_step_data(data_dir, info["input_shape"], seed, baseline=baseline)
    with tempfile.TemporaryDirectory(prefix="kfopt-confusion-") as tmp:
        evaluator = _evaluator(dataset, baseline, Path(tmp), info)
        handle = ModelHandle(winner.format, path=resolve_artifact(results_dir, winner.artifact), info=baseline.info)
        runner = runner_for(handle, evaluator.output)
        x, truth = evaluator.x_test, np.asarray(evaluator.y_test).astype(int).ravel()
        outputs = np.concatenate([runner(x[i : i + 256]) for i in range(0, len(x), 256)])
        predicted = np.asarray(evaluator.task.predict(evaluator.task.scores(outputs))).astype(int).ravel()
    classes = evaluator.task.num_classes or int(max(truth.max(), predicted.max()) + 1)
    if classes > MAX_CONFUSION_CLASSES:
        return None
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    return ConfusionMatrix(winner.recipe, [str(c) for c in range(classes)], matrix.tolist())


def _candidate_folders(directories) -> list[tuple[Path, str | None, int | None]]:
    """(folder, label, position) of every candidate: an optimize step's folder, or each of a group's."""
    found = []
    for directory in directories:
        directory = Path(directory)
        group = directory / GROUP_FILE
        if not group.is_file():
            found.append((directory, None, None))
            continue
        try:
            entries = read_json(group, "candidate group")["candidates"]
        except (KfoptError, KeyError, TypeError) as exc:
            found.append((directory, None, None))  # read as a candidate record, it fails with a reason
            print(f"select: '{group}' is not a candidate group ({exc})", flush=True)
            continue
        found += [(directory / e["folder"], e.get("recipe"), e.get("position")) for e in entries]
    return found


# -- report ----------------------------------------------------------------------
def report_step(results_dir, html_path, markdown_path=None) -> Path:
    """Write the HTML report (candidates table, Pareto plots) of a select step's results.

    With ``markdown_path`` also the candidates table as Markdown (:func:`markdown_summary`).
    """
    from kfopt.html_report import render_html

    result = RunResult.load(results_dir)
    path = Path(html_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result))
    if markdown_path is not None:
        summary = Path(markdown_path)
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(markdown_summary(result))
    return path


def markdown_summary(result: RunResult) -> str:
    """The candidates table in Markdown, as the KFP UI shows it: the baseline and every candidate with its status,
    the columns of the ``kfopt run`` table (test split), the winner and the Pareto front marked."""
    from kfopt.report import columns_for, metric_cells

    record = result.to_dict()
    columns = columns_for(record)
    selection = record.get("selection") or {}
    winner = record.get("winner")
    pareto = set(record.get("pareto") or [])
    budget = selection.get("max_accuracy_drop")
    lines = [
        f"**kfopt**: {_md(record.get('model'))} on {_md(record.get('data'))} (test split). "
        + (f"Winner: **{_md(winner)}**" if winner else "No candidate within the budget")
        + (f" (objective {_md(selection.get('objective'))}, budget {_md(budget)})" if selection else "")
        + ". \u2605 = on the Pareto front.",
        "",
    ]
    same = record.get("best_same_architecture")
    if same and same != winner:
        lines += [f"Best that keeps the model's architecture (no student of another kind): **{_md(same)}**.", ""]
    header = ["model", "format", "status", *(h for _, h, _ in columns)]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rows = [("baseline", {**record["baseline"], "status": "ok"})]
    rows += [
        (
            ("**" + c["recipe"] + "**" if c["recipe"] == winner else c["recipe"])
            + (" \u2605" if c["recipe"] in pareto else ""),
            c,
        )
        for c in record["candidates"]
    ]
    for label, row in rows:
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason') or ''}"
        cells = [label, row.get("format") or "-", status, *metric_cells(row, columns)]
        lines.append("| " + " | ".join(_md(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def _md(value) -> str:
    """A value as Markdown table text: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


# -- promote ---------------------------------------------------------------------
def promote_step(
    results_dir,
    *,
    registered_model: str = "",
    tracking_uri: str = "",
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    experiment: str = "kfopt",
    status: StepStatus | None = None,
    reporter: Reporter | None = None,
) -> StepStatus:
    """Log the run to MLflow, register the winner and promote it if it beats the champion.

    Calls :func:`kfopt.promotion.promote_from` on ``results_dir`` (which
    records in place what it logged, so a retry does not log twice). Fills in
    and returns ``status`` (the promote step's :class:`StepStatus`):
    ``registered_model`` (the :class:`~kfopt.result.Registration`) and
    ``tracking`` (``ok``; ``skipped`` with the reason when MLflow registration
    is not available in this installation). MLflow errors propagate, so the
    pipeline task fails and is retried; ``status.tracking`` and ``metrics.json``
    then say ``failed`` and why.
    """
    from kfopt.select import budget_value

    status = status or StepStatus(step="promote")
    reporter = reporter or Reporter(enabled=False)
    max_accuracy_drop = budget_value(max_accuracy_drop)  # "0.01" from a pipeline parameter is 0.01
    result = RunResult.load(results_dir)
    try:
        from kfopt.promotion import promote_from
        from kfopt.tracking import resolve_uri
    except ImportError as exc:
        reason = f"MLflow registration is not available in this installation (kfopt.promotion: {exc})"
        reporter.say(f"promote: skipped: {reason}")
        status.tracking = Tracking(status="skipped", error=reason, uri=tracking_uri or None)
        return status
    name = registered_model or default_registered_model(result.model)
    uri = resolve_uri(tracking_uri or None)
    # Record what was asked first, as not finished: if this process dies, metrics.json says so
    # truthfully and `kfopt promote --from` finds the settings there. Success or an error replaces it.
    asked = Tracking(
        status="failed",
        error="the promote step started but did not finish",
        registered_model=name,
        uri=uri,
        experiment=experiment or "kfopt",
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
    )
    result.tracking = asked
    result.save(results_dir)
    reporter.say(f"promote: logging to MLflow at {uri} and registering '{result.winner}' as a version of '{name}'")
    try:
        # promote_from switches MLflow's default URI itself where MLflow needs it (models:/ sources).
        status.registered_model = promote_from(
            str(results_dir),
            registered_model=name,
            tracking_uri=uri,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            experiment=experiment or "kfopt",
            # The select step of this very pipeline run measured it and handed the results over
            # as a KFP artifact; sha256s and paths are still verified.
            trust_metrics=True,
        )
    except Exception as exc:
        status.tracking = asked.model_copy(update={"error": _tracking_error(exc)})
        result.tracking = status.tracking
        result.save(results_dir)
        raise
    # promote_from recorded the run it logged (run_id) in metrics.json.
    status.tracking = RunResult.load(results_dir).tracking
    return status


def _tracking_error(exc: BaseException) -> str:
    """Why MLflow logging failed, in the words the CLI puts after "MLflow tracking at URI failed: "."""
    from kfopt.tracking import TrackingFailed, short_reason

    if isinstance(exc, TrackingFailed) and exc.__cause__ is not None:
        return short_reason(exc.__cause__)  # the MLflow error it wraps; its own message names the URI again
    if isinstance(exc, KfoptError):
        return exc.message.rstrip(".")
    return f"{type(exc).__name__}: {exc}"


def default_registered_model(model: str) -> str:
    """The registered model name used when none is given: ``kfopt-`` + the model's name."""
    name = Path(str(model).rstrip("/")).name if ":" not in str(model) or "://" in str(model) else str(model)
    return "kfopt-" + slug(Path(name).stem if "." in name else name).lower()


__all__ = [
    "prepare_step",
    "optimize_step",
    "optimize_group_step",
    "evaluate_step",
    "read_candidate",
    "plan_search_step",
    "sensitivity_step",
    "check_sensitivity",
    "round_one_items",
    "propose_step",
    "stopped_step",
    "select_step",
    "confusion_step",
    "ConfusionMatrix",
    "report_step",
    "promote_step",
    "load_baseline",
    "load_step_data",
    "baseline_model_path",
    "default_registered_model",
]
