"""The plugin contract: third-party techniques register through the same hook as built-ins."""

import sys
import warnings

import pytest
from conftest import RoundWeights

from kfopt.errors import KfoptError
from kfopt.optimize import optimize
from kfopt.plugins import hookimpl
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
