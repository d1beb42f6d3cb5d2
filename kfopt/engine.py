"""The step functions: prepare a baseline, run one recipe into a measured candidate.

``kfopt optimize`` calls them in-process; the Kubeflow components call the
very same functions with artifact paths.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from .data import Data, describe, load_data
from .errors import KfoptError, TechniqueSkipped
from .evaluate import Evaluator
from .models import DEMO_MODELS, load_keras, model_input_shape
from .plugins.technique import ModelHandle, StepContext
from .progress import Reporter
from .recipe import Recipe, parse_recipe, plan
from .result import Baseline, Candidate, RunResult
from .rundir import locked
from .task import Task, compiled_loss_info


def prepare(
    model: str,
    data: str | dict | tuple,
    *,
    seed: int = 0,
    unsafe: bool = False,
    epochs: int = 40,
    reporter: Reporter | None = None,
    workdir: str | os.PathLike | None = None,
) -> tuple[ModelHandle, Data]:
    """Load (or, for ``demo:*``, train) the baseline and load the data that fits it."""
    reporter = reporter or Reporter(enabled=False)
    if model not in DEMO_MODELS and not Path(model).exists():
        raise KfoptError(
            f"Model '{model}' does not exist.",
            f"pass a .keras/.h5 file, a SavedModel directory, or one of {', '.join(DEMO_MODELS)}.",
        )
    shape = model_input_shape(model, unsafe=unsafe)
    dataset = load_data(data, input_shape=shape, seed=seed, validation_from="train" if model in DEMO_MODELS else "test")
    if model in DEMO_MODELS:
        from .training import train_demo

        ctx = context(dataset, workdir or tempfile.mkdtemp(prefix="kfopt-"), seed, reporter)
        reporter.say(f"Training baseline {model} on {dataset.source} ({len(dataset.train)} training samples)")
        keras_model = train_demo(model, ctx, epochs=epochs)
        return ModelHandle.from_keras(keras_model), dataset
    return ModelHandle.from_keras(load_keras(model, unsafe=unsafe), info=compiled_loss_info(model)), dataset


def context(
    data: Data, workdir, seed: int, reporter: Reporter | None, device: str | None = None, task: Task | None = None
) -> StepContext:
    """The StepContext techniques get: train/validation only, never the test split; ``task`` as the Evaluator read it."""
    from .device import detect_device

    return StepContext(
        train=data.train,
        validation=data.validation,
        workdir=Path(workdir),
        seed=seed,
        device=device or detect_device(),
        progress=reporter,
        num_classes=data.num_classes,
        task=task,
    )


def run_recipe(
    recipe: Recipe,
    planned,
    baseline: ModelHandle,
    data: Data,
    evaluator: Evaluator,
    target: Path,
    *,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> Candidate:
    """Apply each step, save the candidate into the directory ``target``, and measure it.

    A technique that cannot run here gives status ``skipped``; one that raises
    gives ``failed`` with its name in the reason. Neither raises: a failed
    recipe is a failed candidate, not a failed run.
    """
    from . import _tf

    reporter = reporter or Reporter(enabled=False)
    candidate = Candidate(recipe=recipe.label, steps=[p.as_dict() for p in planned])
    started = time.perf_counter()
    handle = baseline
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix=".work-", dir=target.parent) as workdir:
        ctx = context(data, workdir, seed, reporter, task=getattr(evaluator, "task", None))
        for index, step in enumerate(planned, start=1):
            name = step.technique.name
            reporter.say(f"[{recipe.label}] step {index}/{len(planned)}: {name} on {ctx.device}")
            _tf.keras().utils.set_random_seed(seed)
            try:
                result = step.technique.apply(handle, step.config, ctx)
            except TechniqueSkipped as skip:
                candidate.status, candidate.reason = "skipped", f"{name}: {skip.reason}"
                break
            except KfoptError:
                raise
            except Exception as exc:  # a plugin's bug fails its candidate, never the run
                candidate.status = "failed"
                candidate.reason = f"technique '{name}' failed: {type(exc).__name__}: {exc}"
                candidate.traceback = traceback.format_exc()
                break
            if not isinstance(result, ModelHandle) or result.format != step.output_format:
                got = result.format if isinstance(result, ModelHandle) else type(result).__name__
                candidate.status = "failed"
                candidate.reason = f"technique '{name}' returned {got}, but declares it produces {step.output_format}"
                break
            if result is handle:
                candidate.status, candidate.reason = "failed", f"technique '{name}' returned its input model unchanged"
                break
            handle = result
        if candidate.ok:
            if target.exists():
                shutil.rmtree(target)
            path = handle.save(target)
            reporter.say(f"[{recipe.label}] evaluating {handle.format} candidate on {len(data.test)} test samples")
            candidate.artifact = str(path)
            candidate.record(evaluator.evaluate(handle))
    candidate.seconds = round(time.perf_counter() - started, 2)
    return candidate


def optimize(
    model: str,
    data: str | dict | tuple,
    recipe: str | Recipe,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    unsafe: bool = False,
    epochs: int = 40,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    metric: str | None = None,
    extra_plugins=(),
    reporter: Reporter | None = None,
    tracking: dict | None = None,
) -> RunResult:
    """Run one recipe on one model in-process; write models and ``metrics.json`` under ``out``.

    Everything the user can get wrong (recipe, configs, formats, output dir,
    model, data, tracking URI, budget, objective) is checked before any
    training starts. The candidate is the winner only when :func:`kfopt.select.select`
    says so, like in a search: within ``max_accuracy_drop`` (a drop of ``metric``, the task's
    default when None; ``"1%"`` for a relative drop) and measured on ``objective``.
    ``tracking`` holds keyword arguments of :func:`kfopt.observers.observer_context`
    (``registered_model``, ``tracking_uri``, ``experiment``, ...); MLflow
    trouble never raises: it shows as ``result.tracking.status == "failed"``.
    """
    from .observers import Observers, observer_context
    from .plugins.manager import registry

    reporter = reporter or Reporter(enabled=False)
    parsed = parse_recipe(recipe)
    techniques = registry(extra_plugins)
    if metric is not None:
        techniques.metric(metric)  # an unknown metric name fails before any work
    planned = plan(parsed, techniques)
    with locked(out, "kfopt optimize", fresh=True, inputs=(model, data)) as out:
        settings = {**(tracking or {}), "max_accuracy_drop": max_accuracy_drop, "objective": objective}
        observers = Observers(techniques.pm, observer_context(out, **settings))
        observers.run_started(
            {"model": model, "data": describe(data), "seed": seed, "recipes": [parsed.label], "out": str(out)}
        )
        baseline, dataset = prepare(
            model, data, seed=seed, unsafe=unsafe, epochs=epochs, reporter=reporter, workdir=out
        )
        baseline.save(out / "baseline")
        evaluator = Evaluator(dataset, baseline, out / "baseline", metric=metric, metrics=techniques.metrics)
        reporter.say("Measuring the baseline")
        result = start_result(model, describe(data), seed, baseline, evaluator)
        candidate = run_recipe(
            parsed, planned, baseline, dataset, evaluator, out / "candidate", seed=seed, reporter=reporter
        )
        result.candidates.append(candidate)
        observers.candidate_finished(candidate)
        finish_result(result, evaluator, max_accuracy_drop=max_accuracy_drop, objective=objective)
        result.save(out)
        result.update_from(observers.run_finished(result))
        result.save(out)
        return result


def start_result(model: str, data: str, seed: int, baseline: ModelHandle, evaluator: Evaluator) -> RunResult:
    """The run record of a run that measured ``baseline``, before any candidate: one skeleton for every path."""
    return RunResult(
        model=model,
        data=data,
        seed=seed,
        splits=evaluator.data.splits.as_dict(),
        baseline=Baseline(artifact=str(baseline.path), **evaluator.baseline_metrics()),
    )


def finish_result(
    result: RunResult, evaluator: Evaluator, *, max_accuracy_drop: float | str, objective: str
) -> RunResult:
    """Record the baseline's references and decide the winner with :func:`kfopt.select.select`."""
    from .select import select

    result.baseline.references = evaluator.references
    return result.apply(select(result.candidates, max_accuracy_drop=max_accuracy_drop, objective=objective))
