"""Installed plugins are contained: an allow-list, loud failure on a misspelt hook, failures stay per candidate."""

import sys

import pytest
from click.testing import CliRunner

from kfopt.cli import main
from kfopt.engine import run_recipe
from kfopt.plugins import Technique, hookimpl
from kfopt.plugins.manager import registry
from kfopt.recipe import parse_recipe, plan

PLUGIN_MODULE = """\
from kfopt.plugins import Technique, hookimpl

class T(Technique):
    name = {technique!r}
    kind = "compress"
    class Config(Technique.Config):
        pass

@hookimpl
def {hook}(register):
    register(T())
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Fake-install a plugin distribution: a module plus a dist-info with its kfopt entry point."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("KFOPT_PLUGINS", raising=False)
    modules = []

    def install(entry_point: str, technique: str, hook: str = "kfopt_register_techniques"):
        module = f"kfopt_safety_{entry_point}"
        (tmp_path / f"{module}.py").write_text(PLUGIN_MODULE.format(technique=technique, hook=hook))
        dist = tmp_path / f"kfopt_safety_{entry_point}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kfopt-safety-{entry_point}\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(f"[kfopt]\n{entry_point} = {module}\n")
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def names():
    return {t.name for t in registry()}


def test_allow_list_loads_only_the_named_plugins(install, monkeypatch):
    install("a", "alpha")
    install("b", "beta")
    assert {"alpha", "beta"} <= names()
    monkeypatch.setenv("KFOPT_PLUGINS", "a")
    assert "alpha" in names() and "beta" not in names()
    monkeypatch.setenv("KFOPT_PLUGINS", " a , b ")
    assert {"alpha", "beta"} <= names()
    monkeypatch.setenv("KFOPT_PLUGINS", "c")
    assert not {"alpha", "beta"} & names()
    assert {"prune", "quantize", "distill", "accelerate"} <= names()  # built-ins are never filtered out
    monkeypatch.setenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("KFOPT_PLUGINS", "a,b")
    assert not {"alpha", "beta"} & names()


def test_misspelt_hook_in_an_installed_plugin_fails_loudly_at_load(install, monkeypatch):
    install("typo", "gamma", hook="kfopt_register_technique")  # missing "s": would silently never run
    monkeypatch.setenv("KFOPT_PLUGINS", "typo")
    with pytest.raises(Exception, match="unknown hook 'kfopt_register_technique' in plugin"):
        registry()
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 1
    assert "unknown hook 'kfopt_register_technique'" in result.output


class Explodes(Technique):
    name = "explodes"
    kind = "compress"

    class Config(Technique.Config):
        pass

    def apply(self, model, config, ctx):
        raise ZeroDivisionError("bug inside the plugin")


class ExplodesPlugin:
    @hookimpl
    def kfopt_register_techniques(self, register):
        register(Explodes())


def test_a_plugin_raising_in_apply_fails_its_candidate_with_its_name(tmp_path):
    from kfopt.evaluate import Evaluator
    from kfopt.testing import tiny_data, tiny_model

    data, baseline = tiny_data(), tiny_model("keras")
    evaluator = Evaluator(data, baseline, tmp_path / "baseline", latency_runs=5)
    techniques = registry([ExplodesPlugin()])
    for text in ("explodes", "quantize(mode=dynamic)"):  # the next recipe runs as usual
        recipe = parse_recipe(text)
        candidate = run_recipe(recipe, plan(recipe, techniques), baseline, data, evaluator, tmp_path / text)
        if text == "explodes":
            assert candidate["status"] == "failed"
            assert candidate["reason"] == "technique 'explodes' failed: ZeroDivisionError: bug inside the plugin"
            assert "ZeroDivisionError" in candidate["traceback"]
        else:
            assert candidate["status"] == "ok" and candidate["accuracy"] > 0.85
