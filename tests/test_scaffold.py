"""`kfopt new-plugin`: the generated package is complete and passes its own tests as created."""

import ast
import os
import re
import subprocess
import sys

import pytest
import tomllib
from click.testing import CliRunner

from kfopt.cli import main
from kfopt.errors import KfoptError
from kfopt.scaffold import create_plugin


def test_creates_an_installable_package_with_its_entry_point(tmp_path):
    root = create_plugin("low-bits", tmp_path)
    assert root == tmp_path / "kfopt-low-bits"
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "kfopt-low-bits"
    assert project["project"]["entry-points"]["kfopt"] == {"low_bits": "kfopt_low_bits"}
    assert project["tool"]["setuptools"]["packages"] == ["kfopt_low_bits"]
    [requirement] = project["project"]["dependencies"]
    assert re.fullmatch(r"kfopt>=\d+\.\d+,<\d+(\.\d+)?", requirement)  # the kfopt range it was made for
    module = (root / "kfopt_low_bits" / "__init__.py").read_text()
    tests = (root / "tests" / "test_low_bits.py").read_text()
    for source in (module, tests):
        ast.parse(source)  # valid Python, every placeholder filled
        assert "$" not in source
    assert 'name = "low_bits"' in module and "class LowBits(Technique)" in module
    assert "check_technique(" in tests and "kfopt_registry" in tests


def test_generated_module_registers_a_working_technique(tmp_path, monkeypatch, kfopt_registry):
    create_plugin("low_bits", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "kfopt-low-bits"))
    import kfopt_low_bits

    try:
        techniques = kfopt_registry(kfopt_low_bits)
        technique = techniques.get("low_bits")
        assert (technique.kind, technique.accepts, technique.produces) == ("compress", {"keras"}, "keras")
        assert set(technique.Config.model_fields) == {"mantissa_bits"}
    finally:
        sys.modules.pop("kfopt_low_bits", None)


@pytest.mark.parametrize(
    "name, message",
    [
        ("9lives", "is not usable as a technique name"),
        ("two words", "is not usable as a technique name"),
        ("class", "is not usable as a technique name"),
        ("quantize", "already exists (from kfopt)"),
    ],
)
def test_refuses_names_that_cannot_work(tmp_path, name, message):
    with pytest.raises(KfoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_plugin(name, tmp_path)
    assert not any(tmp_path.iterdir())


def test_refuses_to_overwrite_a_folder(tmp_path):
    create_plugin("low_bits", tmp_path)
    with pytest.raises(KfoptError, match="already exists"):
        create_plugin("low_bits", tmp_path)


def test_cli_creates_the_package_and_says_what_next(tmp_path):
    result = CliRunner().invoke(main, ["new-plugin", "low_bits", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "kfopt-low-bits" / "kfopt_low_bits" / "__init__.py").is_file()
    assert f"pip install -e {tmp_path / 'kfopt-low-bits'}" in result.output

    again = CliRunner().invoke(main, ["new-plugin", "low_bits", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.slow
def test_generated_tests_pass_as_created(tmp_path):
    root = create_plugin("low_bits", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFOPT_")}
    env["PYTHONPATH"] = str(root)  # as if installed, without touching this environment
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout
