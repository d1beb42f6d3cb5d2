"""The step functions: prepare a baseline, run one recipe into a measured candidate.

``kfopt optimize`` calls them in-process; the Kubeflow components call the
very same functions with artifact paths.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from .data import Data, load_data
from .errors import KfoptError, TechniqueSkipped
from .evaluate import Evaluator
from .models import DEMO_MODELS, load_keras, model_input_shape
from .plugins.technique import ModelHandle, StepContext
from .progress import Reporter
from .recipe import Recipe, parse_recipe, plan

METRICS_FILE = "metrics.json"


def writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kfopt-write-check"):
            pass
    except OSError as exc:
        raise KfoptError(
            f"Output directory '{path}' is not writable ({exc.strerror or exc}).",
            "pass --out a directory you can write to.",
        ) from None
    return path


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write JSON atomically: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def prepare(
    model: str,
    data: str,
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
    dataset = load_data(data, input_shape=shape, seed=seed)
    if model in DEMO_MODELS:
        from .training import train_demo

        ctx = context(dataset, workdir or tempfile.mkdtemp(prefix="kfopt-"), seed, reporter)
        reporter.say(f"Training baseline {model} on {dataset.source} ({len(dataset.train)} training samples)")
        keras_model = train_demo(model, ctx, epochs=epochs)
        return ModelHandle.from_keras(keras_model), dataset
    return ModelHandle.from_keras(load_keras(model, unsafe=unsafe)), dataset


def context(data: Data, workdir, seed: int, reporter: Reporter | None, device: str | None = None) -> StepContext:
    """The StepContext techniques get: train/validation only, never the test split."""
    from .device import detect_device

    return StepContext(
        train=data.train,
        validation=data.validation,
        workdir=Path(workdir),
        seed=seed,
        device=device or detect_device(),
        progress=reporter,
        num_classes=data.num_classes,
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
) -> dict:
    """Apply each step, save the candidate into the directory ``target``, and measure it.

    A technique that cannot run here gives status ``skipped``; one that raises
    gives ``failed`` with its name in the reason. Neither raises: a failed
    recipe is a failed candidate, not a failed run.
    """
    from . import _tf

    reporter = reporter or Reporter(enabled=False)
    candidate = {"recipe": recipe.label, "steps": [p.as_dict() for p in planned], "status": "ok", "reason": None}
    started = time.perf_counter()
    handle = baseline
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix=".work-", dir=target.parent) as workdir:
        ctx = context(data, workdir, seed, reporter)
        for index, step in enumerate(planned, start=1):
            name = step.technique.name
            reporter.say(f"[{recipe.label}] step {index}/{len(planned)}: {name} on {ctx.device}")
            _tf.keras().utils.set_random_seed(seed)
            try:
                result = step.technique.apply(handle, step.config, ctx)
            except TechniqueSkipped as skip:
                candidate.update(status="skipped", reason=f"{name}: {skip.reason}")
                break
            except KfoptError:
                raise
            except Exception as exc:  # a plugin's bug fails its candidate, never the run
                candidate.update(
                    status="failed",
                    reason=f"technique '{name}' failed: {type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )
                break
            if not isinstance(result, ModelHandle) or result.format != step.output_format:
                got = result.format if isinstance(result, ModelHandle) else type(result).__name__
                candidate.update(
                    status="failed",
                    reason=f"technique '{name}' returned {got}, but declares it produces {step.output_format}",
                )
                break
            if result is handle:
                candidate.update(status="failed", reason=f"technique '{name}' returned its input model unchanged")
                break
            handle = result
        if candidate["status"] == "ok":
            if target.exists():
                shutil.rmtree(target)
            path = handle.save(target)
            reporter.say(f"[{recipe.label}] evaluating {handle.format} candidate on {len(data.test)} test samples")
            candidate.update(artifact=str(path), **evaluator.evaluate(handle))
    candidate["seconds"] = round(time.perf_counter() - started, 2)
    return candidate


def optimize(
    model: str,
    data: str,
    recipe: str | Recipe,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    unsafe: bool = False,
    epochs: int = 40,
    extra_plugins=(),
    reporter: Reporter | None = None,
    tracking: dict | None = None,
) -> dict:
    """Run one recipe on one model in-process; write models and ``metrics.json`` under ``out``.

    Everything the user can get wrong (recipe, configs, formats, output dir,
    model, data, tracking URI) is checked before any training starts.
    ``tracking`` holds keyword arguments of :func:`kfopt.observers.observer_context`
    (``registered_model``, ``tracking_uri``, ``experiment``, ...); MLflow
    trouble never raises: it shows as ``result["tracking"]["status"] == "failed"``.
    """
    from .observers import Observers, observer_context
    from .plugins.manager import registry

    reporter = reporter or Reporter(enabled=False)
    parsed = parse_recipe(recipe)
    techniques = registry(extra_plugins)
    planned = plan(parsed, techniques)
    out = writable_dir(out)
    observers = Observers(techniques.pm, observer_context(out, **(tracking or {})))
    observers.run_started({"model": model, "data": data, "seed": seed, "recipes": [parsed.label], "out": str(out)})
    baseline, dataset = prepare(model, data, seed=seed, unsafe=unsafe, epochs=epochs, reporter=reporter, workdir=out)
    baseline.save(out / "baseline")
    evaluator = Evaluator(dataset, baseline, out / "baseline")
    reporter.say("Measuring the baseline")
    result = {
        "model": model,
        "data": data,
        "seed": seed,
        "baseline": {"artifact": str(baseline.path), **evaluator.baseline_metrics()},
        "candidates": [],
        "winner": None,
        "pareto": [],
        "registered_model": None,
    }
    candidate = run_recipe(
        parsed, planned, baseline, dataset, evaluator, out / "candidate", seed=seed, reporter=reporter
    )
    result["candidates"].append(candidate)
    observers.candidate_finished(candidate)
    if candidate["status"] == "ok":
        result["winner"] = candidate["recipe"]
        result["pareto"] = [candidate["recipe"]]
    result["baseline"]["references"] = evaluator.references
    write_json(out / METRICS_FILE, result)
    updates = observers.run_finished(result)
    if updates:
        result.update(updates)
        write_json(out / METRICS_FILE, result)
    return result
