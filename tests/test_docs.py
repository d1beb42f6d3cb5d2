"""docs/plugins.md documents every hook, with its signature, and the kit (datasette's pattern).

What plugin authors are shown (this guide, the examples, the ``kfopt new-plugin``
template) imports kfopt only through its public surface: ``kfopt.plugins`` and
``kfopt.testing``, and plain ``kfopt``'s top-level API.
"""

import ast
import re
from pathlib import Path

import pytest

import kfopt
import kfopt.plugins
import kfopt.testing
from kfopt.plugins import spec
from kfopt.plugins.manager import build_manager
from kfopt.scaffold import create_plugin

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
EXAMPLES = ROOT / "examples"
#: The modules a plugin author may import from kfopt.
PUBLIC_MODULES = {"kfopt", "kfopt.plugins", "kfopt.testing"}


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


# -- plugin authors see only the public import surface ------------------------------------
def docs_python_blocks() -> list[tuple[str, str]]:
    """``(label, code)`` of every ```python block in docs/plugins.md."""
    text = DOCS.read_text()
    return [
        (f"docs/plugins.md:{text.count(chr(10), 0, match.start()) + 2}", match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    ]


def example_files() -> list[Path]:
    """Every Python file of the examples (not build output)."""
    skip = {"build", "__pycache__"}
    return sorted(
        path
        for path in EXAMPLES.rglob("*.py")
        if not any(part in skip or part.endswith(".egg-info") for part in path.relative_to(EXAMPLES).parts)
    )


def kfopt_imports(code: str) -> list[str]:
    """The kfopt modules ``code`` imports; ``from kfopt import x`` counts as ``kfopt.x`` unless x is top-level API."""
    top_level = set(getattr(kfopt, "__all__", ())) | {"__version__"}
    try:
        tree = ast.parse(code)
    except SyntaxError:
        tree = ast.parse(code.rstrip() + ": ...")  # a hook's signature, shown without a body
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
            if node.module == "kfopt":
                found += [f"kfopt.{alias.name}" for alias in node.names if alias.name not in top_level]
    return [name for name in found if name == "kfopt" or name.startswith("kfopt.")]


def test_the_examples_and_the_guide_have_python_to_check():
    assert len(docs_python_blocks()) >= 4
    assert EXAMPLES / "kfopt-cluster" / "kfopt_cluster" / "__init__.py" in example_files()
    assert kfopt_imports("from kfopt import _tf\nimport kfopt.models") == ["kfopt", "kfopt._tf", "kfopt.models"]


@pytest.mark.parametrize("label, code", docs_python_blocks(), ids=[label for label, _ in docs_python_blocks()])
def test_the_guide_imports_only_the_public_modules(label, code):
    private = sorted(set(kfopt_imports(code)) - PUBLIC_MODULES)
    assert not private, f"{label} imports {', '.join(private)}: import it from kfopt.plugins (or kfopt.testing)"


@pytest.mark.parametrize("path", example_files(), ids=lambda path: str(path.relative_to(EXAMPLES)))
def test_the_examples_import_only_the_public_modules(path):
    private = sorted(set(kfopt_imports(path.read_text())) - PUBLIC_MODULES)
    assert not private, f"{path.relative_to(ROOT)} imports {', '.join(private)}: import it from kfopt.plugins"


def test_the_new_plugin_template_imports_only_the_public_modules(tmp_path):
    root = create_plugin("low_bits", tmp_path)
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 2  # the module and its tests
    for path in files:
        private = sorted(set(kfopt_imports(path.read_text())) - PUBLIC_MODULES)
        assert not private, f"kfopt new-plugin writes {path.relative_to(root)} importing {', '.join(private)}"


@pytest.mark.parametrize("name", kfopt.plugins.__all__)
def test_every_public_name_is_in_the_guide(name):
    assert f"`{name}" in DOCS.read_text(), f"docs/plugins.md does not mention kfopt.plugins.{name}"


def test_the_guides_observer_example_works(tmp_path, monkeypatch):
    """The observer shown with RunContext runs as documented: its own typed state, a field added to the result."""
    import types

    from kfopt.observers import Observers, observer_context

    [code] = [code for _, code in docs_python_blocks() if "context.state(" in code]
    example = types.ModuleType("kfopt_tally")
    exec(compile(code, "docs/plugins.md", "exec"), example.__dict__)
    monkeypatch.setenv("KFOPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    observers = Observers(build_manager([example]), observer_context(tmp_path, tracking=False))
    for status in ("ok", "failed", "ok"):
        observers.candidate_finished({"status": status})
    assert observers.run_finished({}) == {"tally": {"failed": 1, "ok": 2}}
