"""The plugin contract: third-party techniques register through the same hook as built-ins."""

import dataclasses
import subprocess
import sys
import warnings

import pytest
from conftest import RoundWeights

from kfopt.engine import optimize
from kfopt.errors import KfoptError
from kfopt.observers import Observers, observer_context
from kfopt.plugins import RunContext, hookimpl
from kfopt.plugins.manager import PluginLoadWarning, build_manager, registry


class Explodes(RoundWeights):
    name = "explodes"

    def apply(self, model, config, ctx):
        raise RuntimeError("boom inside the plugin")


class TestPlugin:
    @hookimpl
    def kfopt_register_techniques(self, register):
        register(RoundWeights())
        register(Explodes())


def test_builtins_are_listed_with_kfopt_as_owner():
    techniques = registry()
    assert {t.name: t.kind for t in techniques} == {
        "accelerate": "accelerate",
        "distill": "distill",
        "prune": "prune",
        "quantize": "quantize",
    }
    assert set(techniques.owners.values()) == {"kfopt"}


def test_test_local_plugin_is_listed_and_usable_in_a_recipe(tmp_path):
    techniques = registry([TestPlugin()])
    assert "round_weights" in [t.name for t in techniques]
    result = optimize(
        "demo:mlp",
        "digits",
        "round_weights(decimals=1)>quantize(mode=dynamic)",
        tmp_path,
        epochs=3,
        extra_plugins=[TestPlugin()],
    )
    candidate = result["candidates"][0]
    assert candidate["status"] == "ok", candidate.get("reason")
    assert candidate["format"] == "tflite" and candidate["accuracy"] > 0.5
    assert (tmp_path / "candidate" / "model.tflite").is_file()


def test_plugin_error_fails_its_candidate_with_its_name(tmp_path):
    result = optimize("demo:mlp", "digits", "explodes", tmp_path, epochs=1, extra_plugins=[TestPlugin()])
    candidate = result["candidates"][0]
    assert candidate["status"] == "failed"
    assert "technique 'explodes' failed: RuntimeError: boom inside the plugin" in candidate["reason"]
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "baseline" / "model.keras").is_file()


def test_plugin_that_raises_while_registering_warns_and_is_skipped():
    class Broken:
        @hookimpl
        def kfopt_register_techniques(self, register):
            raise ImportError("needs a library that is not installed")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        techniques = registry([Broken()])
    assert "prune" in [t.name for t in techniques]
    assert any("failed to register its techniques" in str(w.message) for w in caught)


def test_duplicate_name_is_refused():
    class Dup:
        @hookimpl
        def kfopt_register_techniques(self, register):
            register(RoundWeights())

    with pytest.raises(KfoptError, match="registered twice"):
        registry([TestPlugin(), Dup()])


def test_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def kfopt_register_technique(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="kfopt_register_technique"):
        build_manager([Typo()])


def _fake_distribution(tmp_path, name, entry_point):
    dist = tmp_path / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[kfopt]\n{entry_point}\n")


def test_entry_point_plugin_loads_with_its_package_name(tmp_path, monkeypatch):
    (tmp_path / "kfopt_roundplugin.py").write_text(
        "from kfopt.plugins import hookimpl\n"
        "from tests_plugin_helpers import RoundWeights\n"
        "@hookimpl\n"
        "def kfopt_register_techniques(register):\n"
        "    register(RoundWeights())\n"
    )
    (tmp_path / "tests_plugin_helpers.py").write_text(
        "from kfopt.plugins import Technique, ModelHandle\n"
        "class RoundWeights(Technique):\n"
        "    name = 'round_weights'\n    kind = 'compress'\n    accepts = {'keras'}\n    produces = 'keras'\n"
        "    class Config(Technique.Config):\n        decimals: int = 2\n"
    )
    _fake_distribution(tmp_path, "kfopt-roundplugin", "round = kfopt_roundplugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    techniques = registry()
    assert techniques.owners["round_weights"] == "kfopt-roundplugin"

    monkeypatch.setenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "round_weights" not in [t.name for t in registry()]

    monkeypatch.delenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("KFOPT_PLUGINS", "someotherplugin")
    assert "round_weights" not in [t.name for t in registry()]


def test_broken_plugin_warns_and_is_skipped(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "kfopt-broken", "broken = kfopt_module_that_does_not_exist")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("KFOPT_PLUGINS", "broken")  # leave out plugins installed here (examples/kfopt-cluster)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        techniques = registry()
    assert len(list(techniques)) == 4
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert any("'broken'" in m and "failed to import and was skipped" in m for m in messages)
    sys.modules.pop("kfopt_module_that_does_not_exist", None)


# -- the public import surface --------------------------------------------------------------
def test_the_public_surface_is_listed_and_imports_no_tensorflow():
    import kfopt.plugins

    code = "import sys, kfopt.plugins; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "import kfopt.plugins imported TensorFlow"
    for name in kfopt.plugins.__all__:
        assert hasattr(kfopt.plugins, name), name
        assert f"``{name}" in kfopt.plugins.__doc__, f"the kfopt.plugins docstring does not list {name}"


def test_the_public_helpers_are_kfopts_own_not_copies():
    import kfopt.plugins
    from kfopt import _tf, errors, models, observers, sparsity, training

    # kfopt._tf stays the one place that selects Keras 2 before TensorFlow is imported.
    assert (kfopt.plugins.tf, kfopt.plugins.keras, kfopt.plugins.tfmot) == (_tf.tf, _tf.keras, _tf.tfmot)
    assert kfopt.plugins.copy_model is models.copy_model
    assert (kfopt.plugins.fine_tune, kfopt.plugins.classifier_loss) == (training.fine_tune, training.classifier_loss)
    assert kfopt.plugins.weight_sparsity is sparsity.weight_sparsity
    assert (kfopt.plugins.KfoptError, kfopt.plugins.TechniqueSkipped) == (errors.KfoptError, errors.TechniqueSkipped)
    assert kfopt.plugins.RunContext is observers.RunContext


# -- the observer context ---------------------------------------------------------------------
def test_observer_context_is_a_typed_read_only_record(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = observer_context(tmp_path, registered_model="digits", max_accuracy_drop=0.02, objective="latency")
    assert isinstance(context, RunContext)
    assert (context.out, context.tracking, context.tracking_uri, context.experiment) == (
        str(tmp_path),
        True,  # registering needs MLflow: asked for
        None,
        "kfopt",
    )
    assert (context.registered_model, context.max_accuracy_drop, context.objective) == ("digits", 0.02, "latency")
    assert observer_context(tmp_path).tracking is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.tracking = False  # one observer cannot change what the others see
    with pytest.raises(TypeError, match=r"context.state\('mine'\)"):
        context["mine"] = {}
    # Observers written against the former dict still read their settings.
    assert (context["objective"], context.get("tracking_uri", "x"), context.get("mine", "x")) == ("latency", None, "x")


def test_each_observer_keeps_its_own_state_for_the_run(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class Seen:
        statuses: list = dataclasses.field(default_factory=list)

    class Counter:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def kfopt_candidate_finished(self, candidate, context: RunContext):
            context.state(self.name, Seen).statuses.append(candidate["status"])

        @hookimpl
        def kfopt_run_finished(self, result, context: RunContext):
            return {self.name: context.state(self.name, Seen).statuses}

    monkeypatch.setenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = build_manager([Counter("first"), Counter("second")])
    observers = Observers(pm, observer_context(tmp_path, tracking=False))
    for status in ("ok", "failed"):
        observers.candidate_finished({"status": status})
    assert observers.run_finished({}) == {"first": ["ok", "failed"], "second": ["ok", "failed"]}
    first, second = observers.context.state("first"), observers.context.state("second")
    assert first is not second and first.statuses is not second.statuses
    assert observers.context.state("first") is first  # the same object in every hook of the run
    assert observer_context(tmp_path, tracking=False).state("first") == {}  # a new run starts empty


def test_the_mlflow_tracker_keeps_its_state_in_its_own_area(tmp_path, monkeypatch):
    from kfopt.plugins import mlflow_tracker

    monkeypatch.setenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    observers = Observers(build_manager(), observer_context(tmp_path, tracking_uri=uri))
    observers.run_started({"model": "demo:mlp", "data": "digits", "seed": 0, "recipes": [], "out": str(tmp_path)})
    state = observers.context.state(mlflow_tracker.STATE)
    assert (state.uri, state.logger, state.error) == (uri, None, None)  # MLflow is not contacted before a candidate


class NoConv(RoundWeights):
    """Refuses any model with a Conv2D layer: a structure check a distilled dense student passes."""

    name = "no_conv"

    def check(self, model, config):
        if "Conv2D" in model.layers:
            raise KfoptError("no_conv cannot work on Conv2D layers.", "distill to a dense student first.")


class NoConvPlugin:
    @hookimpl
    def kfopt_register_techniques(self, register):
        register(NoConv())


def test_steps_after_distill_are_not_checked_against_the_teacher():
    """A step after distill gets the student, so the baseline's structure cannot refuse it before any work."""
    from kfopt import _tf
    from kfopt.engine import check_recipe
    from kfopt.plugins import ModelHandle
    from kfopt.recipe import parse_recipe, plan
    from kfopt.signature import model_info

    keras = _tf.keras()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    cnn = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x)))
    info = model_info(ModelHandle.from_keras(cnn))
    techniques = registry([NoConvPlugin()])

    def check(text):
        recipe = parse_recipe(text)
        check_recipe(recipe, plan(recipe, techniques), info)

    with pytest.raises(KfoptError, match="no_conv cannot work on Conv2D layers"):
        check("no_conv")
    check("distill(architecture=dense)>no_conv")  # the student has no Conv2D: decided when it exists
    with pytest.raises(KfoptError, match="no_conv cannot work on Conv2D layers"):
        check("no_conv>distill(architecture=dense)")  # before the distill step it is still the baseline
