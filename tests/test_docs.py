"""docs/plugins.md documents every hook, with its signature, and the kit (datasette's pattern)."""

import re
from pathlib import Path

import pytest

import kfopt.testing
from kfopt.plugins import spec
from kfopt.plugins.manager import build_manager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"


def hook_names() -> list[str]:
    """Every hook: the spec module's kfopt_* functions and the plugin manager's hooks."""
    in_spec = {name for name, value in vars(spec).items() if name.startswith("kfopt_") and callable(value)}
    in_manager = {name for name in dir(build_manager().hook) if name.startswith("kfopt_")}
    return sorted(in_spec | in_manager)


def sections() -> dict[str, str]:
    """Markdown heading -> the text under it, up to the next heading."""
    found, heading = {}, None
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            found[heading] = ""
        elif heading is not None:
            found[heading] += line + "\n"
    return found


def test_there_are_hooks_to_document():
    assert "kfopt_register_techniques" in hook_names()


@pytest.mark.parametrize("hook", hook_names())
def test_hook_is_documented_with_its_signature(hook):
    argnames = getattr(build_manager().hook, hook).spec.argnames
    heading = f"{hook}({', '.join(argnames)})"
    documented = sections()
    assert heading in documented, (
        f"docs/plugins.md has no heading '### {heading}': document the hook there "
        "(its typed signature, when it is called, what a return value means)."
    )
    body = documented[heading]
    assert f"def {hook}(" in body, f"the section '{heading}' does not show the typed signature"
    assert "Return value" in body, f"the section '{heading}' does not say what a return value means"


@pytest.mark.parametrize("fixture", sorted(n for n in vars(kfopt.testing) if n.startswith("kfopt_")))
def test_kit_fixture_is_documented(fixture):
    assert f"`{fixture}`" in DOCS.read_text()


@pytest.mark.parametrize(
    "term",
    [
        "KFOPT_PLUGINS",
        "KFOPT_DISABLE_PLUGIN_AUTOLOAD",
        "TechniqueSkipped",
        "check_technique",
        "[project.entry-points.kfopt]",
        "kfopt new-plugin",
    ],
)
def test_plugin_essentials_are_documented(term):
    assert term in DOCS.read_text()


def test_readme_links_the_plugin_guide():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"\]\(docs/plugins\.md\)", readme)
