"""KFP v2 lightweight Python components: thin wrappers over :mod:`kfopt.components.steps`.

Each function below turns its artifacts into paths and calls one step
function; all imports are inside the body because KFP ships only the
function's source to the container. The image they run in is chosen when the
components are built (:func:`build_components`), so ``kfopt compile --image``
can point them at your registry. The image already holds kfopt and kfp, so
nothing is pip-installed when a step starts (``install_kfp_package=False``):
the same holds under ``kfp.local.SubprocessRunner(use_venv=False)``, which runs
them with the current Python environment.

Every component also writes its ``status`` output, a
:class:`~kfopt.components.status.StepStatus` saying how the step went (and,
for a failure, the error and its fix), also when the step raises; the local
runner reads the outcome of a run from these files.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
import functools
from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from kfopt.components import DEFAULT_IMAGE


def fingerprint(model: str, data: str, status: Output[Artifact]) -> str:
    """Fingerprints the model and the data by content, so the cached steps key on what they are, not on their names.

    Args:
        model: The model as prepare takes it (a path, a URI, or demo:mlp / demo:cnn).
        data: The data as prepare takes it (an .npz path or URI, 'py:module:function', or 'digits'); a py: loader
            is never cached unless its module defines kfopt_fingerprint().
        status: How the step went (kfopt.components.status.StepStatus as JSON).

    Returns:
        A sha256 hex digest: of the content of local files and folders, of size and modification time of
        remote objects, and of the kfopt and plugin versions (see kfopt.components.fingerprint).
    """
    from kfopt.components.status import step_status

    with step_status("fingerprint", status.path):
        from kfopt.components.fingerprint import fingerprint as digest

        return digest(model, data)


def prepare(
    model: str,
    data: str,
    seed: int,
    epochs: int,
    unsafe: bool,
    metric: str,
    output: str,
    fingerprint: str,
    baseline: Output[Model],
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    status: Output[Artifact],
):
    """Loads or trains the baseline model and stores it with the data spec.

    Args:
        model: A .keras/.h5 file, a SavedModel directory, a URI of one, or demo:mlp / demo:cnn.
        data: An .npz file or URI, 'py:module:function', or 'digits'.
        seed: Seed for data splits and training.
        epochs: Epochs to train a demo baseline.
        unsafe: Allow models with Lambda layers.
        metric: The budgeted metric (accuracy, mae, ...); empty: the task's default.
        output: The output the metric is computed on, by name or index (several outputs); empty: the first.
        fingerprint: What the model and data are (the fingerprint step's digest): an input only so that the
            step's cache key changes when their content does; recorded in baseline.json.
        baseline: The baseline (model.keras, or saved_model/) and baseline.json with its format, metrics, task,
            metric and output.
        dataset: The data spec (data.json), with a copy of an .npz source.
        metrics: The baseline's metrics, for the KFP UI.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
    """
    from kfopt.components.status import step_status

    with step_status("prepare", status.path):
        from kfopt.components.ops import log_metrics
        from kfopt.components.steps import prepare_step

        record = prepare_step(
            model,
            data,
            baseline.path,
            dataset.path,
            seed=seed,
            epochs=epochs,
            unsafe=unsafe,
            metric=metric or None,
            output=output or None,
            fingerprint=fingerprint or None,
        )
        baseline.metadata.update(
            {
                "format": record["format"],
                "output": record.get("output") or "",
                "source": model,
                "accuracy": record["metrics"].get("accuracy"),
                "metric_name": record["metrics"].get("metric_name"),
                "metric": record["metrics"].get("metric"),
            }
        )
        dataset.metadata.update({"source": data})
        log_metrics(metrics, record["metrics"])


def optimize(
    recipe: str,
    seed: int,
    measure: bool,
    baseline: Input[Model],
    dataset: Input[Dataset],
    candidate: Output[Model],
    metrics: Output[Metrics],
    status: Output[Artifact],
):
    """Runs one recipe on the baseline; a failing recipe gives a failed candidate, not a failed task.

    Args:
        recipe: JSON of {"position": int, "recipe": {...} or inline text, "round": int, "why": str}
            (round and why from a propose step), or {"round": int, "stopped": reason} when the search stopped.
        seed: Seed for fine-tuning and calibration.
        measure: Measure the candidate here (False: a later evaluate step measures it).
        baseline: The prepared baseline.
        dataset: The prepared data spec.
        candidate: The candidate model and candidate.json (recipe, status, reason, metrics).
        metrics: The candidate's metrics, for the KFP UI.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
    """
    from kfopt.components.status import step_status

    with step_status("optimize", status.path) as step:
        import json

        from kfopt.components.ops import describe, log_metrics
        from kfopt.components.steps import STOPPED, optimize_step, stopped_step

        item = json.loads(recipe)
        if STOPPED in item:
            stopped_step(candidate.path, item["round"], item[STOPPED])
            log_metrics(metrics, {})
            return
        record = optimize_step(
            item["recipe"],
            baseline.path,
            dataset.path,
            candidate.path,
            seed=seed,
            measure=measure,
            position=item.get("position"),
            round=item.get("round", 1),
            why=item.get("why"),
        )
        step.recipe = record.recipe
        describe(candidate, record)
        log_metrics(metrics, record)


def optimize_group(
    recipes: str,
    seed: int,
    baseline: Input[Model],
    dataset: Input[Dataset],
    candidates: Output[Model],
    metrics: Output[Metrics],
    status: Output[Artifact],
):
    """Runs several post-training recipes in one step (one TensorFlow start), each a candidate of its own.

    Args:
        recipes: JSON list of {"position": int, "recipe": {...}}: the recipes, run one after another.
        seed: Seed for calibration.
        baseline: The prepared baseline.
        dataset: The prepared data spec.
        candidates: group.json (the recipes and their folders) and one folder per recipe with its model and
            candidate.json; a failing recipe is a failed candidate, the others still run.
        metrics: Each candidate's metrics as '<recipe> <metric>', for the KFP UI.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
    """
    from kfopt.components.status import step_status

    with step_status("optimize-group", status.path) as step:
        import json

        from kfopt.components.ops import log_metrics
        from kfopt.components.steps import optimize_group_step

        records = optimize_group_step(json.loads(recipes), baseline.path, dataset.path, candidates.path, seed=seed)
        step.recipe = ", ".join(r.recipe for r in records)
        candidates.metadata.update({"recipes": [r.recipe for r in records], "statuses": [r.status for r in records]})
        log_metrics(metrics, {})  # the file exists also when no recipe finished
        for record in records:
            log_metrics(metrics, record, prefix=f"{record.recipe} ")


def evaluate(
    seed: int,
    unmeasured: Input[Model],
    baseline: Input[Model],
    dataset: Input[Dataset],
    candidate: Output[Model],
    metrics: Output[Metrics],
    status: Output[Artifact],
):
    """Measures a candidate that was optimized on another node pool, like every other candidate.

    Args:
        seed: Seed the data splits were made with.
        unmeasured: The candidate from an optimize step run with measure=False.
        baseline: The prepared baseline.
        dataset: The prepared data spec.
        candidate: The candidate model and its measured candidate.json.
        metrics: The candidate's metrics, for the KFP UI.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
    """
    from kfopt.components.status import step_status

    with step_status("evaluate", status.path) as step:
        from kfopt.components.ops import describe, log_metrics
        from kfopt.components.steps import evaluate_step

        record = evaluate_step(unmeasured.path, baseline.path, dataset.path, candidate.path, seed=seed)
        step.recipe = record.recipe
        describe(candidate, record)
        log_metrics(metrics, record)


def plan_search(
    rounds: int,
    max_trials: int,
    max_time: float,
    target: float,
    stop_when_met: bool,
    max_accuracy_drop: str,
    objective: str,
    baseline: Input[Model],
    search: Output[Artifact],
    status: Output[Artifact],
    items: list,
    until_no_gain: bool = False,
    channels_at: int = -1,
    groups: bool = False,
) -> list[str]:
    """Records the search's bounds and proposes round-1 channel pruning, as loop items of the round-1 loop.

    Args:
        rounds: Refinement rounds after round 1 (fixed when the pipeline was compiled); with until_no_gain the
            most rounds.
        max_trials: Most recipes per refinement round.
        max_time: Optimization seconds (summed over candidates) after which no round starts; 0 = no limit.
        target: compression_ratio (objective size) or speedup (latency) to reach; 0 = none.
        stop_when_met: Stop refining once a candidate within the budget reaches the target.
        max_accuracy_drop: The budget: a drop of the metric (0.01) or a percentage of the baseline's value (1%).
        objective: 'size', 'latency' or 'mix'.
        baseline: The prepared baseline.
        search: search.json: the bounds and the round-1 channel recipes.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
        items: The round-1 loop's own items (JSON), which the channel recipes join.
        until_no_gain: Refine while a round gains (at most `rounds` rounds), as kfopt search does.
        channels_at: Loop position of a round-1 channel pruning recipe (built-in search space, objective latency
            or mix, a Keras conv model); -1: none.
        groups: The loop runs optimize-group steps (its items are lists): a channel recipe comes as a group of one.

    Returns:
        The loop items: `items`, then the round-1 channel pruning recipes (or one 'stopped' no-op item when both
        are empty).
    """
    from kfopt.components.status import step_status

    with step_status("plan-search", status.path):
        from kfopt.components.steps import plan_search_step, round_one_items

        plan = plan_search_step(
            baseline.path,
            search.path,
            rounds=rounds,
            max_trials=max_trials,
            max_time=max_time,
            target=target,
            stop_when_met=stop_when_met,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            until_no_gain=until_no_gain,
            channels_at=channels_at,
        )
        return round_one_items(plan, items, groups=groups)


def layer_sensitivity(
    sensitivity: float,
    seed: int,
    baseline: Input[Model],
    dataset: Input[Dataset],
    plan: Input[Artifact],
    search: Output[Artifact],
    status: Output[Artifact],
):
    """Measures each layer's sensitivity (validation split) for the refinement rounds, beside round 1.

    Args:
        sensitivity: Sparsity each layer alone is pruned to when measuring sensitivity; 0 = skip.
        seed: Seed the data splits were made with.
        baseline: The prepared baseline.
        dataset: The prepared data spec.
        plan: The plan step's search plan.
        search: search.json: the plan with the layer sensitivity rows.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
    """
    from kfopt.components.status import step_status

    with step_status("layer-sensitivity", status.path):
        from kfopt.components.steps import sensitivity_step

        sensitivity_step(baseline.path, dataset.path, plan.path, search.path, sensitivity=sensitivity, seed=seed)


def propose(number: int, results: Input[Artifact], search: Input[Artifact], status: Output[Artifact]) -> list[str]:
    """Proposes the recipes of search round `number` from every candidate so far (validation split).

    Args:
        number: The round to propose (2, 3, ...).
        results: The previous round's select results.
        search: The search plan (bounds and layer sensitivity).
        status: How the step went (kfopt.components.status.StepStatus as JSON).

    Returns:
        Loop items (JSON): one per recipe with the reason it is proposed, or one 'stopped' item.
    """
    from kfopt.components.status import step_status

    with step_status("propose", status.path):
        from kfopt.components.steps import propose_step

        return propose_step(results.path, search.path, number)


def select(
    max_accuracy_drop: str,
    objective: str,
    baseline: Input[Model],
    results: Output[Artifact],
    metrics: Output[Metrics],
    status: Output[Artifact],
    number: int = 1,
    accelerator_candidates: Input[list[Model]] = None,
    cpu_candidates: Input[list[Model]] = None,
    previous: Input[Artifact] = None,
    search: Input[Artifact] = None,
) -> str:
    """Picks the best candidate within the accuracy budget and the Pareto front.

    Args:
        max_accuracy_drop: Largest drop of the metric a winner may have: absolute (0.01) or relative (1%).
        objective: 'size' (lowest gzip_bytes) or 'latency' (lowest latency_p50_ms).
        baseline: The prepared baseline.
        results: metrics.json (baseline, candidates, winner, pareto) plus copies of every model.
        metrics: The winner's metrics, for the KFP UI.
        status: How the step went (kfopt.components.status.StepStatus as JSON).
        number: The search round whose candidates these are.
        accelerator_candidates: Candidates of the recipes that fine-tune.
        cpu_candidates: Candidates measured where they were made: folders of optimize_group steps (post-training
            recipes; every recipe when the pipeline has no placement) or of optimize steps.
        previous: The previous round's results (a search round after the first).
        search: The search plan (bounds and layer sensitivity), in a search.

    Returns:
        The winning recipe's label, or an empty string when no candidate is within the budget.
    """
    from kfopt.components.status import step_status

    with step_status("select", status.path):
        from kfopt.components.ops import log_metrics
        from kfopt.components.steps import select_step

        found = list(accelerator_candidates or []) + list(cpu_candidates or [])
        directories = [c.path for c in found]
        result = select_step(
            baseline.path,
            directories,
            results.path,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            number=number,
            previous_dir=previous.path if previous else None,
            search_dir=search.path if search else None,
        )
        results.metadata.update(
            {"winner": result.winner or "", "pareto": result.pareto, "candidates": len(result.candidates)}
        )
        log_metrics(metrics, result.winning_candidate or {})
        return result.winner or ""


def report(results: Input[Artifact], report: Output[HTML], summary: Output[Markdown], status: Output[Artifact]):
    """Renders the HTML report (the candidates table and accuracy-vs-size/latency plots) and a Markdown summary.

    Args:
        results: The select step's results.
        report: The HTML page.
        summary: The candidates table in Markdown (the KFP UI shows it in the step's visualizations).
        status: How the step went (kfopt.components.status.StepStatus as JSON).
    """
    from kfopt.components.status import step_status

    with step_status("report", status.path):
        from kfopt.components.steps import report_step

        report_step(results.path, report.path, summary.path)


def promote(
    registered_model: str,
    tracking_uri: str,
    max_accuracy_drop: str,
    objective: str,
    experiment: str,
    results: Input[Artifact],
    confusion: Output[ClassificationMetrics],
    status: Output[Artifact],
    kfp_run_id: str = "",
    baseline: Input[Model] = None,
    dataset: Input[Dataset] = None,
    seed: int = 0,
) -> NamedTuple("Outputs", [("registered_model", str), ("version", str), ("promoted", bool), ("alias", str)]):  # noqa: UP014
    """Registers the winner in MLflow, moves the champion alias if it passes the gate, logs its confusion matrix.

    The confusion matrix runs the winner on the test split, which needs TensorFlow: this step loads it for
    MLflow anyway, so select and report stay light (no TensorFlow in their processes).

    Args:
        registered_model: Registered model name ('' = 'kfopt-' + the model's name).
        tracking_uri: MLflow tracking URI ('' = MLflow's default / MLFLOW_TRACKING_URI).
        max_accuracy_drop: The budget the gate applies: absolute (0.01) or relative (1%).
        objective: 'size' or 'latency'.
        experiment: MLflow experiment name.
        results: The select step's results.
        confusion: The winner's confusion matrix on the test split (a classifier's, given the baseline and data; the
            KFP UI shows it); empty otherwise.
        status: How the step went, with the registration and the MLflow tracking record, also when MLflow failed.
        kfp_run_id: This pipeline run's id (dsl.PIPELINE_JOB_ID_PLACEHOLDER), tagged on the MLflow runs as kfopt.kfp_run_id.
        baseline: The prepared baseline (the confusion matrix runs the winner as the Evaluator ran it).
        dataset: The prepared data spec (the test split of the confusion matrix).
        seed: Seed the data splits were made with.

    Returns:
        registered_model: JSON of the registered model (name, version, aliases, promoted), or of {"skipped": reason}.
        version: The new model version ('' when nothing was registered), for a deploy step downstream.
        promoted: Whether the champion alias moved to the new version: gate a deploy step with dsl.If on it.
        alias: 'champion' when promoted, 'challenger' when registered but not promoted, '' when nothing was.
    """
    from kfopt.components.status import step_status

    with step_status("promote", status.path) as step:
        import json
        import os
        from typing import NamedTuple

        from kfopt.components.ops import write_metadata
        from kfopt.components.steps import confusion_step, promote_step
        from kfopt.lineage import KFP_RUN_ID_ENV

        if kfp_run_id:
            os.environ[KFP_RUN_ID_ENV] = kfp_run_id  # read by kfopt.lineage when the runs are logged

        outputs = NamedTuple(  # noqa: UP014
            "Outputs", [("registered_model", str), ("version", str), ("promoted", bool), ("alias", str)]
        )

        promote_step(
            results.path,
            registered_model=registered_model,
            tracking_uri=tracking_uri,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            experiment=experiment,
            status=step,
        )
        # After registering (a picture for the UI never delays or costs the registration).
        matrix = None
        if baseline is not None and dataset is not None:
            try:
                matrix = confusion_step(results.path, baseline.path, dataset.path, seed=seed)
            except Exception as exc:
                print(f"no confusion matrix: {type(exc).__name__}: {exc}")
        if matrix is not None:
            confusion.log_confusion_matrix(matrix.categories, matrix.matrix)
            confusion.metadata["recipe"] = matrix.recipe
        write_metadata(confusion)  # the file exists also without a matrix
        registration = step.registered_model
        if registration is None:
            return outputs(json.dumps({"skipped": step.tracking.error}), "", False, "")
        version = "" if registration.version is None else str(registration.version)
        alias = "champion" if registration.promoted else ("challenger" if version else "")
        return outputs(json.dumps(registration.to_dict()), version, bool(registration.promoted), alias)


# -- helpers the component bodies import (they run inside the component) -----------
def log_metrics(metrics, record, prefix: str = "") -> None:
    """Log a record's scalar metrics on a KFP Metrics artifact (the UI shows numbers only), and write its file.

    ``record`` is a :class:`~kfopt.result.Candidate` or the baseline's metrics (a
    dict); ``prefix`` goes before each name (a grouped step logs several
    candidates). KFP keeps the numbers in the artifact's metadata; the file
    (the same numbers as JSON) makes the artifact exist on disk, which a
    cache (kfp.local's) checks before it reuses a step's outputs.
    """
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "position":
            metrics.log_metric(prefix + key, float(value))
    write_metadata(metrics)


def write_metadata(artifact) -> None:
    """Write a metrics artifact's metadata (KFP keeps it there) as its file too, so the artifact exists on disk."""
    import json
    from pathlib import Path

    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(artifact.metadata, indent=1, sort_keys=True))


def describe(candidate, record) -> None:
    """Put the facts a person filters on into the candidate artifact's metadata."""
    candidate.metadata.update(
        {
            k: record[k]
            for k in ("recipe", "status", "format", "accuracy", "metric_name", "metric", "gzip_bytes", "latency_p50_ms")
            if record.get(k) is not None
        }
    )
    if record.get("reason"):
        candidate.metadata["reason"] = record["reason"]


@dataclass(frozen=True)
class Components:
    """The kfopt components, built for one image."""

    fingerprint: object
    prepare: object
    optimize: object
    optimize_group: object
    evaluate: object
    plan_search: object
    layer_sensitivity: object
    propose: object
    select: object
    report: object
    promote: object


@functools.cache
def build_components(image: str = DEFAULT_IMAGE) -> Components:
    """The components, running in ``image`` (which must contain kfopt; nothing is installed at run time)."""
    make = functools.partial(dsl.component, base_image=image, install_kfp_package=False)
    return Components(
        fingerprint=make(fingerprint),
        prepare=make(prepare),
        optimize=make(optimize),
        optimize_group=make(optimize_group),
        evaluate=make(evaluate),
        plan_search=make(plan_search),
        layer_sensitivity=make(layer_sensitivity),
        propose=make(propose),
        select=make(select),
        report=make(report),
        promote=make(promote),
    )
