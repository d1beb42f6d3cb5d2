"""``kfopt new-plugin``: a new plugin package that installs, registers and passes its tests as created.

The package has one real technique (weight rounding to fewer mantissa bits,
float16 precision by default: keras in, keras out), the entry point that makes
kfopt find it, and tests that use the kit in :mod:`kfopt.testing`. The files
are templates in this module (``string.Template``: ``$name`` placeholders).
"""

from __future__ import annotations

import keyword
import os
import re
from pathlib import Path
from string import Template

from . import __version__
from .errors import KfoptError

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "kfopt plugin: the $name technique."
readme = "README.md"
requires-python = ">=3.10"
license = "Apache-2.0"
dependencies = ["$kfopt_requirement"]  # the kfopt versions this plugin is tested with

[project.optional-dependencies]
test = ["pytest>=8"]

# This entry point is how kfopt finds the plugin once the package is installed.
[project.entry-points.kfopt]
$name = "$module"

[tool.setuptools]
packages = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["slow: trains or converts a real model for more than a few seconds"]
filterwarnings = ["ignore::DeprecationWarning"]
"""

_README = """\
# $dist

A [kfopt](https://pypi.org/project/kfopt/) plugin providing the `$name` technique.

```bash
pip install -e .                  # kfopt finds it through the `kfopt` entry point
kfopt plugins                     # lists $name, package $dist
kfopt optimize --model demo:mlp --data digits --recipe '$name(mantissa_bits=7)>quantize(mode=dynamic)' --out runs/$name
pytest                            # tests/ use kfopt's kit: kfopt.testing fixtures and check_technique
```

`$name` rounds every weight to `mantissa_bits` bits of mantissa (10 = float16
precision, 7 = bfloat16). The model stays float32 and runs as before; the
zeroed low bits make the saved model compress better. Replace it with your
technique: see kfopt's docs/plugins.md for the contract, the hooks and how to
publish.
"""

_MODULE = '''\
"""kfopt plugin: the $name technique.

kfopt loads this module through the ``kfopt`` entry point in pyproject.toml and
calls ``kfopt_register_techniques``. Everything from kfopt comes from
``kfopt.plugins`` (its other modules are internal). Reach TensorFlow only inside
``apply``, through ``kfopt.plugins.tf()``, ``keras()`` or ``tfmot()`` (they select
Keras 2 first), so ``kfopt plugins`` stays fast.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from kfopt.plugins import ModelHandle, StepContext, Technique, copy_model, hookimpl

__version__ = "0.1.0"


class $cls(Technique):
    """Round every weight to ``mantissa_bits`` bits of mantissa (10 = float16 precision, 7 = bfloat16).

    The model stays float32, so it runs anywhere it ran before; the dropped low
    bits are zeros, so the saved model compresses better. The input model is
    never modified.
    """

    name = "$name"  # what recipes call it: '$name(mantissa_bits=7)>quantize(mode=int8)'
    kind = "compress"  # prune, quantize, distill, accelerate, or a new word
    accepts = {"keras"}  # formats apply() takes
    produces = "keras"  # format apply() returns (override produces_for if it depends on the config)

    class Config(Technique.Config):  # Technique.Config refuses unknown keys
        mantissa_bits: int = Field(
            10, ge=1, le=22,
            description="Mantissa bits kept per weight: float32 has 23, float16 10, bfloat16 7.",
        )

    def apply(self, model: ModelHandle, config: "$cls.Config", ctx: StepContext) -> ModelHandle:
        rounded = copy_model(model.keras())  # work on a copy: never change the caller's model
        rounded.set_weights([round_mantissa(w, config.mantissa_bits) for w in rounded.get_weights()])
        return ModelHandle.from_keras(rounded, info=dict(model.info))


def round_mantissa(weights: np.ndarray, bits: int) -> np.ndarray:
    """``weights`` rounded to the nearest float32 with only ``bits`` mantissa bits (the rest zero)."""
    drop = 23 - bits
    raw = np.asarray(weights, np.float32).view(np.uint32).astype(np.uint64)
    raw = (raw + (1 << (drop - 1))) >> drop << drop  # round half away from zero, on the magnitude
    return raw.astype(np.uint32).view(np.float32).reshape(np.shape(weights))


@hookimpl
def kfopt_register_techniques(register):
    """Called by kfopt when it builds its plugin manager."""
    register($cls())
'''

_TEST = '''\
"""Tests for the $name technique, with the kit kfopt ships: kfopt.testing fixtures and check_technique."""

import numpy as np

import $module
from kfopt.testing import check_technique
from $module import $cls, round_mantissa


def test_meets_the_plugin_contract(tmp_path):
    """Declared, validated, right format, input untouched, evaluates with kfopt's Evaluator, deterministic."""
    check = check_technique(
        $cls(), {"mantissa_bits": 7},
        bad_configs=[{"mantissa_bits": 0}, {"mantissa_bits": 23}],
        max_accuracy_drop=0.02, workdir=tmp_path,
    )
    assert check.metrics["compression_ratio"] > 1.0  # fewer mantissa bits gzip smaller


def test_is_registered_next_to_the_builtins(kfopt_registry):
    techniques = kfopt_registry($module)
    assert techniques.get("$name").kind == "compress"
    assert "quantize" in [t.name for t in techniques]


def test_rounds_every_weight(kfopt_keras_model, kfopt_ctx):
    result = $cls().apply(kfopt_keras_model, $cls.Config(mantissa_bits=10), kfopt_ctx)
    for weight in result.keras().get_weights():
        assert not (weight.view(np.uint32) & 0x1FFF).any()  # the 13 low mantissa bits are zero


def test_float16_precision_matches_numpy():
    values = np.float32([0.1, -0.3, 1.0009, 3.14159, -2.5e-3])
    np.testing.assert_array_equal(round_mantissa(values, 10), values.astype(np.float16).astype(np.float32))
'''

FILES = {
    "pyproject.toml": _PYPROJECT,
    "README.md": _README,
    "$module/__init__.py": _MODULE,
    "tests/test_$name.py": _TEST,
}


def plugin_names(name: str) -> dict[str, str]:
    """The names a plugin called ``name`` gets: technique, module, distribution, class."""
    technique = name.strip().lower().replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", technique) or keyword.iskeyword(technique):
        raise KfoptError(
            f"Plugin name '{name}' is not usable as a technique name.",
            "use letters, digits and underscores or dashes, starting with a letter, e.g. 'cluster' or 'low_rank'.",
        )
    return {
        "name": technique,
        "module": f"kfopt_{technique}",
        "dist": f"kfopt-{technique.replace('_', '-')}",
        "cls": "".join(part.capitalize() for part in technique.split("_") if part),
        "kfopt_requirement": _compatible(__version__),
    }


def _compatible(version: str) -> str:
    """``kfopt>=X.Y,<...``: this kfopt and later releases without breaking changes (semver; 0.x minors break)."""
    major, minor = (int(part) for part in version.split(".")[:2])
    upper = f"0.{minor + 1}" if major == 0 else str(major + 1)
    return f"kfopt>={major}.{minor},<{upper}"


def create_plugin(name: str, directory: str | os.PathLike = ".") -> Path:
    """Write the package ``kfopt-NAME/`` under ``directory``; return its path.

    Refuses a name an installed technique already has, and a folder that exists.
    """
    names = plugin_names(name)
    from .plugins.manager import registry

    techniques = registry()
    if names["name"] in techniques.techniques:
        raise KfoptError(
            f"A technique named '{names['name']}' already exists (from {techniques.owners[names['name']]}).",
            "pick another name: `kfopt plugins` lists the names taken.",
        )
    root = Path(directory) / names["dist"]
    if root.exists():
        raise KfoptError(f"'{root}' already exists.", "pick another --dir or name, or remove the folder.")
    for template_path, template in FILES.items():
        path = root / Template(template_path).substitute(names)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(names))
    return root
