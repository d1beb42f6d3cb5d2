"""The Python API: ``kfopt.optimize`` and ``kfopt.search`` on a model object or a file, and arrays or datasets.

A notebook user hands over what they have in memory::

    import kfopt

    result = kfopt.optimize(model, (x_train, y_train, x_test, y_test), "prune(target_sparsity=0.8)>quantize(mode=int8)")
    result                       # the candidates table (HTML in Jupyter, a rich table in a terminal)
    result.winner_model()        # the winner, loaded (a Keras model, or TFLite bytes)

Both functions run the very code ``kfopt optimize`` and ``kfopt search`` run
(the CLI is a thin layer over them) and return the typed run record
:class:`kfopt.result.RunResult`, also written as ``OUT/metrics.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import KfoptError
from .result import RunResult
from .rundir import slug, writable_dir

#: Where a run goes when no ``out`` is given: ``runs/<model>-<time>`` under the current directory.
RUNS_DIR = "runs"
#: A model object is saved here inside the run directory, so the run can be repeated from its files.
INPUT_MODEL = "input/model.keras"


def optimize(
    model,
    data="digits",
    recipe: str = "quantize(mode=int8)",
    *,
    out: str | os.PathLike | None = None,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    metric: str | None = None,
    output: str | int | None = None,
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    registered_model: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    tracking: bool | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Run one recipe on ``model`` and measure it against the baseline on the test split.

    Args:
        model: a Keras model object (Keras 3 or tf_keras), a .keras/.h5 file, a SavedModel
            directory, or ``demo:mlp`` / ``demo:cnn``.
        data: ``(x_train, y_train, x_test, y_test)`` arrays, a dict of them (``x_val``/``y_val``
            optional), a ``(train, test[, validation])`` tuple of tf.data datasets, or a data spec
            (an .npz path, ``py:module:function``, ``digits``).
        recipe: inline (``prune(target_sparsity=0.8)>quantize(mode=int8)``) or a recipe YAML file.
        out: the run directory (default ``runs/<model>-<time>``).
        max_accuracy_drop: the budget: the largest drop of ``metric`` a winner may have, absolute
            (``0.01``) or relative to the baseline's value (``"1%"``). A drop is always a loss: for an
            error like ``mae`` it is the candidate's minus the baseline's.
        objective: what "best" means within the budget (``size``, ``latency``, ``mix:W``).
        metric: the budgeted metric (``accuracy``, ``binary_accuracy``, ``top_k_accuracy``, ``macro_f1``,
            ``auc``, ``mae``, ``rmse`` or a plugin's); None: the task's default (accuracy for a
            multi-class model, binary_accuracy for binary and multi-label, mae for regression).
        output: the output ``metric`` is computed on, for a model with several outputs (a name or an
            index; None: the first). Fine-tuning trains on that output's labels.
        registered_model, tracking_uri, experiment: log to MLflow and register the winner.
        tracking: False never logs to MLflow; None (default) logs when one of the three above is
            given or ``MLFLOW_TRACKING_URI`` is set.
        progress: progress bars on stderr (default: when stderr is a terminal).

    Returns:
        The run record: ``result.winner`` (None when the candidate missed the budget),
        ``result.candidates``, ``result.winner_model()``.
    """
    from .engine import optimize as run
    from .progress import Reporter

    _check_recipes([recipe])  # before the run folder is made and the model saved into it
    out = _run_dir(out, model)
    settings = {
        "registered_model": registered_model,
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "tracking": tracking,
    }
    return run(
        _model_spec(model, out),
        data,
        recipe,
        out,
        seed=seed,
        unsafe=unsafe,
        epochs=epochs,
        max_accuracy_drop=max_accuracy_drop,
        objective=objective,
        metric=metric,
        output=output,
        reporter=Reporter(enabled=progress, quiet=progress is False),
        tracking=settings,
    )


def search(
    model,
    data="digits",
    *,
    recipes: str | os.PathLike | list[str] | None = None,
    out: str | os.PathLike | None = None,
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    metric: str | None = None,
    output: str | int | None = None,
    rounds: int | None = None,
    max_trials: int = 4,
    max_time: float | None = None,
    time_budget: float | None = None,
    target: float | None = None,
    stop_when_met: bool = False,
    sensitivity: float | None = 0.9,
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Search for the smallest (or fastest) model within the budget: round 1, then refinement rounds.

    Args:
        model, data, out, max_accuracy_drop, objective, metric, output, seed, epochs, unsafe, progress: as in
            :func:`optimize`.
        recipes: the round-1 recipes (a list of inline recipes or a search YAML file; default: the
            built-in search space).
        rounds: refinement rounds after round 1, each at most ``max_trials`` recipes; None (default):
            refine while a round improves the best candidate within budget by more than a few percent,
            within ``time_budget``. ``max_time`` bounds the optimization seconds; ``target`` with
            ``stop_when_met`` stops at a ratio.
        time_budget: wall seconds the whole search may take; a refinement recipe starts only when its
            estimated time fits (None: 3x the time up to the end of round 1, at least 120 s, when
            ``rounds`` is None; no limit with ``rounds``).
        sensitivity: the sparsity of the layer-sensitivity pass that guides refinement (None: skip).

    Returns:
        The run record, with ``search``, ``search_trace`` and ``layer_sensitivity``.
    """
    from .progress import Reporter
    from .recipe_search import search as run

    _check_recipes(recipes)
    out = _run_dir(out, model)
    return run(
        _model_spec(model, out),
        data,
        out,
        recipes=recipes,
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        time_budget=time_budget,
        max_accuracy_drop=max_accuracy_drop,
        objective=objective,
        metric=metric,
        output=output,
        target=target,
        stop_when_met=stop_when_met,
        seed=seed,
        epochs=epochs,
        unsafe=unsafe,
        reporter=Reporter(enabled=progress, quiet=progress is False),
        sensitivity=sensitivity or None,
    )


def _check_recipes(recipes) -> None:
    """Plan the recipes (techniques, configs, formats) now: a mistake costs no folder and no saved model."""
    from .plugins.manager import registry
    from .recipe import parse_recipe, plan
    from .recipe_search import load_search

    if isinstance(recipes, list) and len(recipes) == 1 and not isinstance(recipes[0], list):
        plan(parse_recipe(recipes[0]), registry())
    else:
        load_search(recipes, registry())


def _run_dir(out, model) -> Path:
    if out is not None:
        return writable_dir(out)
    name = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name", None) or "model"
    stem = Path(str(name).rstrip("/")).stem.replace("demo:", "demo-")
    return writable_dir(Path(RUNS_DIR) / f"{slug(stem)}-{time.strftime('%Y%m%d-%H%M%S')}")


def _model_spec(model, out: Path) -> str:
    """A path or demo name for ``model``; a model object is saved into the run directory first.

    Saving keeps one code path (the loader proves a Keras 3 model's conversion
    to tf_keras numerically) and leaves the run repeatable from its files.
    """
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if not (hasattr(model, "save") and hasattr(model, "get_config")):
        raise KfoptError(
            f"The model is a {type(model).__name__}, not a Keras model.",
            "pass a Keras model object, a .keras/.h5 file, a SavedModel directory, or demo:mlp / demo:cnn.",
        )
    path = out / INPUT_MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return str(path)
