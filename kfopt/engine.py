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
import weakref
from collections.abc import Callable
from pathlib import Path

from .data import Data, Inputs, describe, fit_to_model, load_data
from .errors import KfoptError, TechniqueSkipped
from .evaluate import Evaluator
from .models import DEMO_MODELS, load_keras, model_input_shape
from .plugins.technique import ModelHandle, StepContext
from .progress import Reporter
from .recipe import Recipe, parse_recipe, plan
from .result import Baseline, Candidate, RunResult
from .rundir import clear_run, locked
from .select import check_budget
from .signature import ModelInfo, keras_info, model_info
from .task import Task, compiled_loss_info

#: A baseline whose test accuracy is within this of the most frequent label's rate learned nothing worth keeping.
CHANCE_MARGIN = 0.02


def prepare(
    model: str,
    data: str | dict | tuple,
    *,
    seed: int = 0,
    unsafe: bool = False,
    epochs: int = 40,
    reporter: Reporter | None = None,
    workdir: str | os.PathLike | None = None,
    check: Callable[[ModelInfo], None] | None = None,
) -> tuple[ModelHandle, Data]:
    """Load (or, for ``demo:*``, train) the baseline and load the data that fits it.

    A SavedModel without Keras layers (``tf.saved_model.save`` or
    ``model.export`` of a subclassed model) stays a ``saved_model`` baseline,
    served through its signature. ``check`` is called with the model's
    :class:`~kfopt.signature.ModelInfo` as soon as it is known: before the data
    is read, a demo is trained or anything is measured. The data is checked
    against the model's inputs (count, shapes, dtypes) and matched to them.
    """
    from .models import DEMO_INPUT_SHAPES, build_demo

    reporter = reporter or Reporter(enabled=False)
    if model not in DEMO_MODELS and not Path(model).exists():
        raise KfoptError(
            f"Model '{model}' does not exist.",
            f"pass a .keras/.h5 file, a SavedModel directory, or one of {', '.join(DEMO_MODELS)}.",
        )
    check = check or (lambda info: None)
    if model in DEMO_MODELS:
        from .training import train_demo

        check(keras_info(build_demo(model)))
        dataset = load_data(data, input_shape=DEMO_INPUT_SHAPES[model], seed=seed, validation_from="train")
        ctx = context(dataset, workdir or tempfile.mkdtemp(prefix="kfopt-"), seed, reporter)
        reporter.say(f"Training baseline {model} on {dataset.source} ({len(dataset.train)} training samples)")
        keras_model = train_demo(model, ctx, epochs=epochs)
        return ModelHandle.from_keras(keras_model), dataset
    if is_signature_only(model):
        handle = ModelHandle.from_saved_model(model)
        info = model_info(handle)
        check(info)
        return handle, load_data(data, inputs=info.inputs, seed=seed)
    if keras3_file(model):
        # A Keras 3 model's conversion is proven on real test inputs (one batch), not only on generated ones,
        # so its data is read first and matched to its inputs once it is converted.
        dataset = load_data(
            data,
            input_shape=model_input_shape(model) if isinstance(data, str) and data == "digits" else None,
            seed=seed,
        )
        sample, _ = next(iter(dataset.test.batches(32)))
        handle = ModelHandle.from_keras(
            load_keras(model, unsafe=unsafe, sample=None if isinstance(sample, Inputs) else sample),
            info=compiled_loss_info(model),
        )
        info = model_info(handle)
        check(info)
        fit_to_model(dataset, info.inputs)
        return handle, dataset
    handle = ModelHandle.from_keras(load_keras(model, unsafe=unsafe), info=compiled_loss_info(model))
    info = model_info(handle)
    check(info)
    return handle, load_data(data, inputs=info.inputs, seed=seed)


def is_signature_only(model: str | os.PathLike) -> bool:
    """True for a SavedModel directory without Keras metadata: kfopt serves it through its signature."""
    path = Path(model)
    return path.is_dir() and (path / "saved_model.pb").exists() and not (path / "keras_metadata.pb").exists()


def keras3_file(model: str | os.PathLike) -> bool:
    from .keras3 import is_keras3_file

    path = Path(model)
    return path.is_file() and path.suffix == ".keras" and is_keras3_file(path)


def context(
    data: Data,
    workdir,
    seed: int,
    reporter: Reporter | None,
    device: str | None = None,
    task: Task | None = None,
    output: str | None = None,
) -> StepContext:
    """The StepContext techniques get: train/validation only, never the test split; ``task`` as the Evaluator read
    it, ``output`` the name of the output it scores."""
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
        output=output,
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

    A recipe that :func:`check_recipe` refuses for this baseline, or a
    technique that cannot run here, gives status ``skipped``; a technique that
    raises (a KfoptError too), or a candidate that cannot be saved or measured,
    gives ``failed`` with the reason in one line. Nothing raises: a failed
    recipe is a failed candidate, not a failed run.
    """
    from . import _tf

    reporter = reporter or Reporter(enabled=False)
    candidate = Candidate(recipe=recipe.label, steps=[p.as_dict() for p in planned])
    started = time.perf_counter()
    handle = baseline
    target = Path(target)
    try:
        check_recipe(recipe, planned, baseline_info(baseline))
    except KfoptError as refused:
        candidate.status, candidate.reason = "skipped", refused.one_line()
        candidate.seconds = round(time.perf_counter() - started, 2)
        return candidate
    except Exception as exc:  # a plugin's check() has a bug: its candidate fails, the run goes on
        candidate.status, candidate.reason = "failed", f"checking the recipe failed: {type(exc).__name__}: {exc}"
        candidate.traceback = traceback.format_exc()
        candidate.seconds = round(time.perf_counter() - started, 2)
        return candidate
    with tempfile.TemporaryDirectory(prefix=".work-", dir=target.parent) as workdir:
        ctx = context(
            data,
            workdir,
            seed,
            reporter,
            task=getattr(evaluator, "task", None),
            output=getattr(evaluator, "output", None),
        )
        for index, step in enumerate(planned, start=1):
            name = step.technique.name
            reporter.say(f"[{recipe.label}] step {index}/{len(planned)}: {name} on {ctx.device}")
            _tf.keras().utils.set_random_seed(seed)
            try:
                result = step.technique.apply(handle, step.config, ctx)
            except TechniqueSkipped as skip:
                candidate.status, candidate.reason = "skipped", f"{name}: {skip.reason}"
                break
            except KfoptError as exc:  # this model or config cannot take the technique: its candidate fails
                candidate.status, candidate.reason = "failed", f"technique '{name}' failed: {exc.one_line()}"
                break
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
            _measure(candidate, handle, target, evaluator, reporter, f"{len(data.test)} test samples")
    candidate.seconds = round(time.perf_counter() - started, 2)
    return candidate


def _measure(candidate: Candidate, handle: ModelHandle, target: Path, evaluator: Evaluator, reporter, samples: str):
    """Save the candidate into ``target`` and measure it; a failure to do either fails the candidate."""
    try:
        if target.exists():
            shutil.rmtree(target)
        path = handle.save(target)
        reporter.say(f"[{candidate.recipe}] evaluating {handle.format} candidate on {samples}")
        candidate.artifact = str(path)
        candidate.notes = list(handle.info.get("notes") or []) or None
        candidate.record(evaluator.evaluate(handle))
        if handle.format == "tflite":
            from .convert import tflite_ops

            candidate.record(tflite_ops(handle.tflite()))
        broken = non_finite(handle, evaluator) if isinstance(evaluator, Evaluator) else None  # else: measured later
        if broken:  # a diverged fine-tune (NaN weights) is never "ok", and so can never win
            candidate.status, candidate.reason = "failed", f"non-finite: {broken}"
    except Exception as exc:  # e.g. the baseline cannot be converted to the candidate's format for the reference
        candidate.status = "failed"
        said = exc.one_line() if isinstance(exc, KfoptError) else f"{type(exc).__name__}: {exc}"
        candidate.reason = f"measuring the {handle.format} candidate failed: {said}"
        if not isinstance(exc, KfoptError):
            candidate.traceback = traceback.format_exc()


def non_finite(handle: ModelHandle, evaluator: Evaluator) -> str | None:
    """What is not finite about a measured model (its weights, its outputs on test inputs), or None."""
    import numpy as np

    from .evaluate import runner_for

    if handle.format == "keras":
        bad = sum(int(w.size - np.count_nonzero(np.isfinite(w))) for w in handle.keras().get_weights())
        if bad:
            return f"{bad} weights are NaN or infinite"
    outputs = runner_for(handle, evaluator.output)(evaluator.x_test[:64])
    values = outputs.values() if isinstance(outputs, dict) else [outputs]
    if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values):
        return "its outputs on the test inputs are NaN or infinite"
    return None


_INFOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def baseline_info(baseline: ModelHandle) -> ModelInfo:
    """The :class:`~kfopt.signature.ModelInfo` of ``baseline``, read once per handle."""
    if baseline not in _INFOS:
        _INFOS[baseline] = model_info(baseline)
    return _INFOS[baseline]


def check_recipe(recipe: Recipe, planned: list, model: ModelInfo) -> None:
    """Everything about ``recipe`` that can be checked against the baseline ``model`` before any work.

    The first step must take the baseline's format (a SavedModel without Keras
    layers only goes to steps that accept ``saved_model``); every step's
    :meth:`Technique.check <kfopt.plugins.Technique.check>` may refuse the
    model's structure (each sees the baseline: what earlier steps make of it is
    not known before they run; steps after a ``distill`` are left to run time, since they get the
    student); a recipe that ends in TFLite needs a model the
    converter can take. Raises the refusal as a KfoptError.
    """
    first = planned[0].technique
    if model.format not in first.accepts:
        raise KfoptError(
            f"Recipe '{recipe.label}': step 1 '{first.name}' needs a {' or '.join(sorted(first.accepts))} model, "
            f"but the model is {model.kind}.",
            "start the recipe with a step that takes it (quantize(mode=int8|dynamic|float16) works through a "
            "SavedModel's signature), or pass the Keras model (.keras) it was exported from.",
        )
    # A distill step trains a new student: the steps after it work on a model not known before it is
    # built, so only the steps up to the first distill are checked against the baseline.
    known = next((i + 1 for i, step in enumerate(planned) if step.technique.kind == "distill"), len(planned))
    for step in planned[:known]:
        step.technique.check(model, step.config)
    # A student keeps the baseline's inputs, so an input TFLite cannot take stays a problem after distill.
    if model.format == "keras" and any(step.output_format == "tflite" for step in planned):
        from .convert import tflite_problem

        problem = tflite_problem(model.keras())
        if problem:
            raise KfoptError(
                f"Recipe '{recipe.label}' ends in TFLite, but the model cannot be converted: {problem}.",
                "give the model's input a fixed sequence length (keras.Input(shape=(T, ...))), or use a recipe "
                "that keeps the Keras format.",
            )


def refuse_early(recipes: list[tuple[Recipe, list]]) -> Callable[[ModelInfo], None]:
    """A ``check`` for :func:`prepare`: raises when :func:`check_recipe` refuses every one of ``recipes``.

    With one recipe (``kfopt optimize``) its refusal is the run's error, before
    the baseline is measured; in a search the recipes it refuses become skipped
    candidates and the others run. A plugin whose ``check`` itself crashes is
    left for :func:`run_recipe`, which fails only that candidate.
    """

    def check(model: ModelInfo) -> None:
        refusals = []
        for recipe, planned in recipes:
            try:
                check_recipe(recipe, planned, model)
            except KfoptError as refused:
                refusals.append(refused)
            except Exception:
                return
        if refusals and len(refusals) == len(recipes):
            if len(refusals) == 1:
                raise refusals[0]
            raise KfoptError(
                f"No recipe of the search can run on this model ({model.kind}): "
                + "; ".join(r.message for r in refusals[:3])
                + (f" (and {len(refusals) - 3} more)" if len(refusals) > 3 else ""),
                refusals[0].fix,
            )

    return check


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
    output: str | int | None = None,
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
    ``output`` is the output the metric is computed on (a name or an index of the
    model's outputs; None: the first). ``tracking`` holds keyword arguments of :func:`kfopt.observers.observer_context`
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
    # The earlier run in ``out`` is replaced only once the model and data loaded: a wrong path loses nothing.
    with locked(out, "kfopt optimize", fresh=True, inputs=(model, data)) as out:
        settings = {**(tracking or {}), "max_accuracy_drop": max_accuracy_drop, "objective": objective}
        observers = Observers(techniques.pm, observer_context(out, **settings))
        observers.run_started(
            {"model": model, "data": describe(data), "seed": seed, "recipes": [parsed.label], "out": str(out)}
        )
        baseline, dataset = prepare(
            model,
            data,
            seed=seed,
            unsafe=unsafe,
            epochs=epochs,
            reporter=reporter,
            workdir=out,
            check=refuse_early([(parsed, planned)]),
        )
        clear_run(out)
        baseline.save(out / "baseline")
        evaluator = Evaluator(
            dataset, baseline, out / "baseline", metric=metric, metrics=techniques.metrics, output=output
        )
        check_budget(max_accuracy_drop, evaluator.metric)
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
    result = RunResult(
        model=model,
        data=data,
        seed=seed,
        splits=evaluator.data.splits.as_dict(),
        baseline=Baseline(artifact=str(baseline.path), **evaluator.baseline_metrics()),
    )
    accuracy, chance = result.baseline.accuracy, evaluator.majority_rate()
    if accuracy is not None and chance is not None and accuracy <= chance + CHANCE_MARGIN:
        result.warnings.append(
            f"the baseline's test accuracy {accuracy:.4f} is at chance level (always predicting the most frequent "
            f"label scores {chance:.4f}): an accuracy budget against it means little; train the model first"
        )
    return result


def finish_result(
    result: RunResult, evaluator: Evaluator, *, max_accuracy_drop: float | str, objective: str
) -> RunResult:
    """Record the baseline's references and decide the winner with :func:`kfopt.select.select`."""
    from .select import select

    result.baseline.references = evaluator.references
    result.settle_baseline_latency()
    return result.apply(select(result.candidates, max_accuracy_drop=max_accuracy_drop, objective=objective))
