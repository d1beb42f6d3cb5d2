"""The kit for plugin authors: pytest fixtures and ``check_technique``.

kfopt registers this module as a pytest plugin (entry point ``pytest11``,
name ``kfopt``), so a plugin package's own tests get these fixtures just by
having kfopt installed::

    from kfopt.testing import check_technique
    from my_package import MyTechnique

    def test_contract():
        check_technique(MyTechnique(), {"strength": 2})

    def test_listed(kfopt_registry):
        import my_package
        assert "mine" in [t.name for t in kfopt_registry(my_package)]

Fixtures (all cheap: the tiny model trains once per process in about a second):

- ``kfopt_registry``: a factory ``kfopt_registry(*plugins, entry_points=False)``
  returning the technique registry with the built-ins and ``plugins``
  (modules, objects with ``@hookimpl`` methods, or bare ``Technique`` instances).
- ``kfopt_digits``: the tiny dataset (scikit-learn's digits as 64-vectors,
  seeded train/validation/test splits), a :class:`kfopt.data.Data`.
- ``kfopt_keras_model``, ``kfopt_tflite_model``, ``kfopt_saved_model``: a tiny
  trained classifier (64 -> 32 -> 10) on digits as a fresh
  :class:`~kfopt.plugins.ModelHandle` in each format, for every test.
- ``kfopt_ctx``: a :class:`~kfopt.plugins.StepContext` on that data, in a
  temporary directory, seed 0, on the CPU.
- ``kfopt_evaluator``: the standard :class:`kfopt.evaluate.Evaluator` with the
  tiny Keras model as the baseline.

This module must stay importable without TensorFlow: pytest loads it in every
run of every project that has kfopt installed. TensorFlow is imported only when
a fixture or check is used.
"""

from __future__ import annotations

import atexit
import hashlib
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "check_technique",
    "TechniqueCheck",
    "TechniqueContractError",
    "TechniqueContractWarning",
    "make_context",
    "tiny_data",
    "tiny_model",
    "plugin_registry",
]

#: Seed of the tiny model and of the data splits.
SEED = 0
#: The tiny model: 64 -> HIDDEN (relu) -> 10 (softmax); ~2.4k parameters, ~90% on digits.
HIDDEN = 32
TINY_EPOCHS = 8
#: Batch-1 runs the kit's evaluator times; enough to prove the model runs, not a benchmark.
LATENCY_RUNS = 10
#: A config key no technique can have, used to prove that unknown keys are refused.
UNKNOWN_KEY = "kfopt_no_such_key"


class TechniqueContractError(AssertionError):
    """A technique breaks the plugin contract; the message says which rule and how to fix it."""


class TechniqueContractWarning(UserWarning):
    """A technique works but misses a convention (e.g. a config field without a description)."""


# -- the tiny data and model, built once per process ------------------------------
_lock = threading.RLock()
_cache: dict[str, Any] = {}


def _cache_dir() -> Path:
    if "dir" not in _cache:
        path = Path(tempfile.mkdtemp(prefix="kfopt-testing-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _cache["dir"] = path
    return _cache["dir"]


def tiny_data():
    """Digits as 64-vectors in [0, 1]: ~1300 train, ~140 validation, 360 test samples (seeded)."""
    with _lock:
        if "data" not in _cache:
            from kfopt.data import load_data

            _cache["data"] = load_data("digits", input_shape=(64,), seed=SEED, validation_from="train")
        return _cache["data"]


def make_context(data=None, workdir=None, *, seed: int = SEED, device: str = "cpu"):
    """A :class:`~kfopt.plugins.StepContext` like the one kfopt hands techniques (train and validation only)."""
    from kfopt.plugins import StepContext

    data = data if data is not None else tiny_data()
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(dir=_cache_dir(), prefix="work-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return StepContext(
        train=data.train,
        validation=data.validation,
        workdir=workdir,
        seed=seed,
        device=device,
        num_classes=data.num_classes,
    )


def _trained_keras():
    with _lock:
        if "keras" not in _cache:
            from kfopt import plugins

            keras = plugins.keras()
            data = tiny_data()
            keras.utils.set_random_seed(SEED)
            model = keras.Sequential(
                [
                    keras.Input(shape=(64,)),
                    keras.layers.Dense(HIDDEN, activation="relu"),
                    keras.layers.Dense(data.num_classes, activation="softmax"),
                ],
                name="kfopt_tiny_mlp",
            )
            ctx = make_context(data, _cache_dir() / "train")
            plugins.fine_tune(model, ctx, epochs=TINY_EPOCHS, learning_rate=1e-2, description="kfopt tiny model")
            _cache["keras"] = model
        return _cache["keras"]


def tiny_model(format: str = "keras"):
    """A fresh :class:`~kfopt.plugins.ModelHandle` of the tiny trained digits model in ``format``.

    The model trains once per process (seeded, about a second); each call
    returns an independent copy, so a test may change it freely.
    """
    from kfopt.plugins import FORMATS, ModelHandle, copy_model

    if format not in FORMATS:
        raise ValueError(f"unknown model format {format!r}; known: {', '.join(FORMATS)}")
    trained = _trained_keras()
    if format == "keras":
        return ModelHandle.from_keras(copy_model(trained))
    with _lock:
        if format == "tflite":
            if "tflite" not in _cache:
                from kfopt.convert import to_tflite

                _cache["tflite"] = to_tflite(trained, "fp32")
            return ModelHandle.from_tflite(_cache["tflite"])
        if "saved_model" not in _cache:
            from kfopt.convert import to_saved_model

            _cache["saved_model"] = to_saved_model(trained, _cache_dir() / "saved_model")
        copy = Path(tempfile.mkdtemp(dir=_cache_dir(), prefix="saved_model-"))
        shutil.copytree(_cache["saved_model"], copy, dirs_exist_ok=True)
        return ModelHandle.from_saved_model(copy)


# -- registries with the author's plugins -------------------------------------------
def _as_plugin(plugin):
    from kfopt.plugins import Technique, hookimpl

    if not isinstance(plugin, Technique):
        return plugin

    class _Registers:
        @hookimpl
        def kfopt_register_techniques(self, register):
            register(plugin)

    return _Registers()


def plugin_registry(*plugins, entry_points: bool = False):
    """The technique registry with the built-ins plus ``plugins``, exactly as kfopt builds it.

    ``plugins`` are plugin modules, objects with ``@hookimpl`` methods, or
    ``Technique`` instances. Installed entry-point plugins are left out unless
    ``entry_points=True`` (then ``KFOPT_PLUGINS`` applies as usual), so other
    installed plugins cannot change the outcome of a test. A misspelt hook
    name raises here, as it does when kfopt loads the plugin.
    """
    import os

    from kfopt.plugins.manager import Registry, build_manager

    saved = os.environ.get("KFOPT_DISABLE_PLUGIN_AUTOLOAD")
    if entry_points:
        os.environ.pop("KFOPT_DISABLE_PLUGIN_AUTOLOAD", None)
    else:
        os.environ["KFOPT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    try:
        pm = build_manager()
    finally:
        if saved is None:
            os.environ.pop("KFOPT_DISABLE_PLUGIN_AUTOLOAD", None)
        else:
            os.environ["KFOPT_DISABLE_PLUGIN_AUTOLOAD"] = saved
    for plugin in map(_as_plugin, plugins):
        if not pm.is_registered(plugin):  # already loaded through its entry point
            pm.register(plugin)
    pm.check_pending()
    return Registry(pm)


# -- the contract checks ---------------------------------------------------------------
@dataclass
class TechniqueCheck:
    """What :func:`check_technique` ran and measured, for further assertions of your own."""

    technique: Any
    config: Any
    input: Any
    result: Any
    metrics: dict
    passed: list[str] = field(default_factory=list)


def _fail(technique, rule: str, fix: str) -> None:
    name = getattr(technique, "name", type(technique).__name__)
    raise TechniqueContractError(f"technique '{name}': {rule}. Fix: {fix}")


def _check_declaration(technique) -> None:
    import pydantic

    from kfopt.plugins import FORMATS, Technique

    if not isinstance(technique, Technique):
        raise TechniqueContractError(
            f"{technique!r} is not a kfopt Technique. Fix: subclass kfopt.plugins.Technique and pass an instance."
        )
    problems = []
    name = getattr(technique, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
        problems.append(f"name {name!r} must be a non-empty identifier-like string (it is written in recipes)")
    if not isinstance(getattr(technique, "kind", None), str) or not technique.kind:
        problems.append("kind must be a non-empty string (prune, quantize, distill, accelerate, or a new word)")
    accepts = getattr(technique, "accepts", None)
    if not isinstance(accepts, (set, frozenset)) or not accepts or not set(accepts) <= set(FORMATS):
        problems.append(f"accepts {accepts!r} must be a non-empty set of formats from {FORMATS}")
    if getattr(technique, "produces", None) not in FORMATS:
        problems.append(f"produces {getattr(technique, 'produces', None)!r} must be one of {FORMATS}")
    config_cls = getattr(technique, "Config", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, pydantic.BaseModel)):
        problems.append("Config must be a pydantic model (subclass Technique.Config)")
    if type(technique).apply is Technique.apply:
        problems.append("apply(model, config, ctx) is not implemented")
    if problems:
        _fail(
            technique,
            "; ".join(problems),
            "declare name, kind, accepts, produces, Config and apply as in docs/plugins.md",
        )
    undocumented = [k for k, f in config_cls.model_fields.items() if not f.description]
    if undocumented:
        warnings.warn(
            f"technique '{name}': config field(s) {', '.join(undocumented)} have no description; "
            "`kfopt plugins --json` shows descriptions as help. Use pydantic.Field(default, description=...).",
            TechniqueContractWarning,
            stacklevel=3,
        )


def _check_config(technique, config, bad_configs) -> Any:
    import pydantic

    from kfopt.plugins import KfoptError
    from kfopt.recipe import validate_config

    if isinstance(config, pydantic.BaseModel):
        validated = config
        given = config.model_dump(exclude_unset=True)
    else:
        given = dict(config or {})
        try:
            validated = validate_config(technique, given)
        except KfoptError as exc:
            _fail(technique, f"the config {given!r} is rejected: {exc}", "pass a config the technique accepts")
    try:
        validate_config(technique, {**given, UNKNOWN_KEY: 1})
    except KfoptError as exc:
        if UNKNOWN_KEY not in str(exc):
            _fail(
                technique,
                f"an unknown config key is refused, but the error does not name it: {exc}",
                "let Config be validated by kfopt (subclass Technique.Config)",
            )
    else:
        _fail(
            technique,
            f"an unknown config key '{UNKNOWN_KEY}' was silently accepted",
            "subclass Technique.Config, which forbids extra keys (model_config extra='forbid')",
        )
    for bad in bad_configs:
        try:
            validate_config(technique, dict(bad))
        except KfoptError as exc:
            keys = [k for k in bad]
            if keys and not any(k in str(exc) for k in keys):
                _fail(
                    technique,
                    f"bad config {bad!r} is refused, but the error does not name the key: {exc}",
                    "raise ValueError from a pydantic validator of that field",
                )
        else:
            _fail(
                technique,
                f"bad config {bad!r} was accepted",
                "constrain the field (pydantic Field(gt=..., le=...), Literal[...], or a validator)",
            )
    return validated


def _check_recipe(technique, config, input_format: str) -> None:
    from kfopt.plugins import KfoptError
    from kfopt.recipe import Recipe, Step, plan

    try:
        registry = plugin_registry(technique)
        step = Step(technique.name, config.model_dump(exclude_unset=True))
        planned = plan(Recipe([step]), registry, input_format)
    except KfoptError as exc:
        _fail(
            technique,
            f"it cannot be planned in a recipe next to the built-ins: {exc}",
            "pick a name no built-in uses, and make accepts include the input model's format",
        )
    if planned[0].output_format != technique.produces_for(config):
        _fail(technique, "the recipe planner and produces_for disagree", "override produces_for only")


def _fingerprint(handle) -> str:
    """A digest of everything a model is: weights (Keras), bytes (TFLite) or files (SavedModel)."""
    digest = hashlib.sha256()
    if handle.format == "keras":
        for weight in handle.keras().get_weights():
            digest.update(str(weight.shape).encode())
            digest.update(weight.tobytes())
    elif handle.format == "tflite":
        digest.update(handle.tflite())
    else:
        root = Path(handle.saved_model_path())
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _copy_handle(handle, workdir: Path):
    """An independent copy of ``handle``, so a second run cannot see what the first one did."""
    from kfopt.plugins import ModelHandle, copy_model

    if handle.format == "keras":
        return ModelHandle.from_keras(copy_model(handle.keras()), info=handle.info)
    if handle.format == "tflite":
        return ModelHandle.from_tflite(handle.tflite(), info=handle.info)
    target = Path(tempfile.mkdtemp(dir=workdir, prefix="input-"))
    shutil.copytree(handle.saved_model_path(), target, dirs_exist_ok=True)
    return ModelHandle.from_saved_model(target, info=handle.info)


def _apply(technique, handle, config, ctx, seed: int):
    from kfopt.plugins import ModelHandle, TechniqueSkipped, keras

    keras().utils.set_random_seed(seed)  # as kfopt does before every step
    try:
        result = technique.apply(handle, config, ctx)
    except TechniqueSkipped as skip:
        pytest.skip(f"{technique.name} cannot run on this host: {skip.reason}")
    expected = technique.produces_for(config)
    if not isinstance(result, ModelHandle):
        _fail(
            technique,
            f"apply returned {type(result).__name__}, not a ModelHandle",
            "return ModelHandle.from_keras(...), .from_tflite(bytes) or .from_saved_model(path)",
        )
    if result.format != expected:
        _fail(
            technique,
            f"apply returned a {result.format} model, but produces_for(config) says {expected}",
            "return the declared format, or override produces_for(config)",
        )
    if result is handle:
        _fail(technique, "apply returned its input model", "return a new ModelHandle (or raise TechniqueSkipped)")
    return result


def _predictions(handle, x):
    import numpy as np

    from kfopt.evaluate import runner_for

    runner = runner_for(handle)
    return np.concatenate([runner(x[i : i + 256]) for i in range(0, len(x), 256)])


def check_technique(
    technique,
    config=None,
    *,
    model=None,
    data=None,
    baseline=None,
    workdir=None,
    seed: int = SEED,
    bad_configs=(),
    deterministic: bool = True,
    atol: float = 1e-6,
    max_accuracy_drop: float | None = None,
) -> TechniqueCheck:
    """Run the plugin contract checks on ``technique`` with ``config``; raise :class:`TechniqueContractError`.

    Checks, in order: ``name``/``kind``/``accepts``/``produces``/``Config``/``apply``
    are declared; ``config`` (a dict, or a Config instance) validates and an
    unknown key is refused with a :class:`~kfopt.plugins.KfoptError` naming it
    (so is every dict in ``bad_configs``, e.g. ``[{"clusters": 0}]``); the
    technique registers next to the built-ins and plans in a recipe; ``apply``
    returns a new ``ModelHandle`` in ``technique.produces_for(config)``'s format;
    the input model is not changed; the result evaluates with kfopt's standard
    :class:`~kfopt.evaluate.Evaluator` (and loses at most ``max_accuracy_drop``
    of accuracy, when given); and, with ``deterministic``, a second run with
    the same ``seed`` on a copy of the input gives the same predictions
    (within ``atol``) and, for Keras results, the same weights.

    ``model`` defaults to the tiny digits model in the first format the
    technique accepts (keras, then saved_model, then tflite), ``data`` to the
    tiny digits data, ``baseline`` (the Keras model accuracy is compared with)
    to ``model`` when it is Keras, else the tiny Keras model. Pass ``workdir``
    (e.g. pytest's ``tmp_path``) to keep what was written. A technique that
    raises ``TechniqueSkipped`` skips the calling test. Returns a
    :class:`TechniqueCheck` with the result and its metrics.
    """
    import numpy as np

    from kfopt.evaluate import Evaluator

    _check_declaration(technique)
    passed = ["declaration"]
    validated = _check_config(technique, config, bad_configs)
    passed.append("config")

    if model is None:
        fmt = next(f for f in ("keras", "saved_model", "tflite") if f in technique.accepts)
        model = tiny_model(fmt)
    elif model.format not in technique.accepts:
        raise ValueError(
            f"check_technique: the {model.format} model passed is not in "
            f"{technique.name}.accepts ({sorted(technique.accepts)})"
        )
    data = data if data is not None else tiny_data()
    if baseline is None:
        baseline = model if model.format == "keras" else tiny_model("keras")
    _check_recipe(technique, validated, model.format)
    passed.append("recipe")

    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(dir=_cache_dir(), prefix="check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spare = _copy_handle(model, workdir) if deterministic else None
    before, info_before = _fingerprint(model), dict(model.info)

    result = _apply(technique, model, validated, make_context(data, workdir / "run-1", seed=seed), seed)
    passed.append("apply returns the declared format")
    if _fingerprint(model) != before or model.info != info_before:
        _fail(
            technique,
            "apply changed its input model",
            "work on a copy: kfopt.plugins.copy_model(model.keras()) before training or wrapping layers",
        )
    passed.append("input unchanged")

    evaluator = Evaluator(data, baseline, workdir / "evaluate", latency_runs=LATENCY_RUNS)
    try:
        metrics = evaluator.evaluate(result)
    except Exception as exc:
        _fail(
            technique,
            f"its result does not evaluate with kfopt's Evaluator ({type(exc).__name__}: {exc})",
            "return a model that takes the input model's inputs and returns class scores",
        )
    if not 0.0 <= metrics["accuracy"] <= 1.0 or metrics["size_bytes"] <= 0:
        _fail(technique, f"its result measured nonsense: {metrics}", "check the model the technique returns")
    passed.append("evaluates")
    if max_accuracy_drop is not None and metrics["accuracy_drop"] > max_accuracy_drop:
        _fail(
            technique,
            f"accuracy dropped by {metrics['accuracy_drop']:.4f} "
            f"(from {metrics['accuracy'] + metrics['accuracy_drop']:.4f} to {metrics['accuracy']:.4f}), "
            f"more than max_accuracy_drop={max_accuracy_drop}",
            "check the technique, or fine-tune longer in the test's config",
        )
    if max_accuracy_drop is not None:
        passed.append("accuracy")

    if deterministic:
        again = _apply(technique, spare, validated, make_context(data, workdir / "run-2", seed=seed), seed)
        x = evaluator.x_test
        first, second = _predictions(result, x), _predictions(again, x)
        if first.shape != second.shape or not np.allclose(first, second, atol=atol, rtol=0):
            worst = float(np.max(np.abs(first - second))) if first.shape == second.shape else "shape"
            _fail(
                technique,
                f"two runs with seed {seed} predict differently (largest difference {worst})",
                "seed every source of randomness from ctx.seed (kfopt seeds Python, NumPy and TensorFlow "
                "with it before apply), or pass deterministic=False with a reason",
            )
        if result.format == "keras":
            w1, w2 = result.keras().get_weights(), again.keras().get_weights()
            if len(w1) != len(w2) or not all(
                a.shape == b.shape and np.allclose(a, b, atol=atol, rtol=0) for a, b in zip(w1, w2)
            ):
                _fail(
                    technique,
                    f"two runs with seed {seed} give different weights",
                    "seed every source of randomness from ctx.seed",
                )
        passed.append("deterministic")
    return TechniqueCheck(technique, validated, model, result, metrics, passed)


# -- pytest fixtures ---------------------------------------------------------------------
@pytest.fixture
def kfopt_registry():
    """Factory: ``kfopt_registry(*plugins, entry_points=False)`` -> the technique registry (see plugin_registry)."""
    return plugin_registry


@pytest.fixture(scope="session")
def kfopt_digits():
    """The tiny dataset: digits as 64-vectors with seeded train/validation/test splits (kfopt.data.Data)."""
    return tiny_data()


@pytest.fixture
def kfopt_keras_model():
    """A fresh copy of the tiny trained digits model as a Keras ModelHandle."""
    return tiny_model("keras")


@pytest.fixture
def kfopt_tflite_model():
    """The tiny trained digits model as an fp32 TFLite ModelHandle."""
    return tiny_model("tflite")


@pytest.fixture
def kfopt_saved_model():
    """A fresh copy of the tiny trained digits model as a SavedModel ModelHandle."""
    return tiny_model("saved_model")


@pytest.fixture
def kfopt_ctx(kfopt_digits, tmp_path):
    """A StepContext on the tiny dataset, in a temporary directory, seed 0, on the CPU."""
    return make_context(kfopt_digits, tmp_path / "kfopt-work", seed=SEED, device="cpu")


@pytest.fixture
def kfopt_evaluator(kfopt_digits, tmp_path):
    """kfopt's standard Evaluator on the tiny dataset, with the tiny Keras model as the baseline."""
    from kfopt.evaluate import Evaluator

    return Evaluator(kfopt_digits, tiny_model("keras"), tmp_path / "kfopt-evaluate", latency_runs=LATENCY_RUNS)
