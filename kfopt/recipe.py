"""Recipes: ordered steps of techniques, parsed, validated and format-checked before any work.

Inline form: ``prune(target_sparsity=0.8)>quantize(mode=int8)``; a list value
is written in brackets: ``prune(keep_dense=[conv2d,dense_1])``.
YAML form::

    name: prune-int8          # optional
    steps:
      - prune: {target_sparsity: 0.8}
      - quantize: {mode: int8}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from .errors import KfoptError, did_you_mean

_STEP = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(?:\((.*)\))?\s*$", re.S)


@dataclass
class Step:
    """One technique and its config as the user wrote it."""

    technique: str
    config: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.config:
            return self.technique
        args = ",".join(f"{k}={_format_value(v)}" for k, v in self.config.items())
        return f"{self.technique}({args})"


@dataclass
class Recipe:
    """An ordered list of steps; its name defaults to its inline form."""

    steps: list[Step]
    name: str | None = None

    def __str__(self) -> str:
        return ">".join(str(s) for s in self.steps)

    @property
    def label(self) -> str:
        return self.name or str(self)

    def to_dict(self) -> dict:
        return {"name": self.label, "steps": [{s.technique: dict(s.config)} for s in self.steps]}

    @property
    def short(self) -> str:
        """A few characters for a plot point: the values without their keys, a mode or backend alone.

        ``prune(target_sparsity=0.8)>quantize(mode=int8)`` is ``prune .8>int8``;
        lists count their items (``keep_dense=[a,b]`` is ``2 dense``).
        """
        if self.name:
            return self.name

        def value(key: str, item: Any) -> str:
            if isinstance(item, (list, tuple)):
                return f"{len(item)} {key.split('_')[-1]}"
            if isinstance(item, float) and 0 < abs(item) < 1:
                return f"{item:g}".replace("0.", ".", 1)
            return str(item)

        steps = []
        for step in self.steps:
            values = [value(k, v) for k, v in step.config.items()]
            if set(step.config) <= {"mode", "backend"} and values:
                steps.append(" ".join(values))  # quantize(mode=int8) is int8, accelerate(backend=xla) is xla
            else:
                steps.append(" ".join([step.technique, *values]))
        return ">".join(steps)


@dataclass
class PlannedStep:
    """A step whose technique was found and whose config validated."""

    technique: Any
    config: pydantic.BaseModel
    input_format: str
    output_format: str

    def as_dict(self) -> dict:
        return {"technique": self.technique.name, "config": self.config.model_dump(mode="json")}


def parse_recipe(text: str | Recipe | dict | list) -> Recipe:
    """Parse an inline recipe, a YAML file path, or an already-loaded dict/list."""
    if isinstance(text, Recipe):
        return text
    if isinstance(text, (dict, list)):
        return _from_data(text, "recipe")
    path = Path(text)
    if text.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise KfoptError(
                f"Recipe file '{text}' does not exist.",
                "check the path, or write the recipe inline, e.g. 'prune>quantize(mode=int8)'.",
            )
        from .limits import load_yaml

        return _from_data(load_yaml(path, "Recipe file"), text)
    return _inline(text)


def _inline(text: str) -> Recipe:
    parts = [p for p in _split_top(text, ">")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise KfoptError(
            f"Recipe '{text}' has an empty step.",
            "write steps joined by '>', e.g. 'prune(target_sparsity=0.8)>quantize(mode=int8)'.",
        )
    steps = []
    for part in parts:
        match = _STEP.match(part)
        if not match:
            raise KfoptError(
                f"Recipe step '{part.strip()}' is not of the form name(key=value, ...).", "e.g. 'quantize(mode=int8)'."
            )
        name, args = match.group(1), match.group(2)
        config = {}
        for arg in _split_top(args or "", ","):
            if not arg.strip():
                continue
            key, eq, value = arg.partition("=")
            if not eq or not key.strip():
                raise KfoptError(
                    f"Recipe step '{part.strip()}': argument '{arg.strip()}' is not key=value.",
                    f"e.g. '{name}(key=value)'.",
                )
            config[key.strip()] = _parse_value(value.strip())
        steps.append(Step(name, config))
    return Recipe(steps)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses, brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _parse_value(raw: str) -> Any:
    # Deliberately not YAML: YAML 1.1 reads "2:4" as the number 124.
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    if raw.startswith("[") and raw.endswith("]"):
        return [_parse_value(item.strip()) for item in _split_top(raw[1:-1], ",") if item.strip()]
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in ",()[]>= "):
        return repr(value)
    return str(value)


def _from_data(data: Any, where: str) -> Recipe:
    name = None
    if isinstance(data, dict):
        name = data.get("name")
        unknown = set(data) - {"name", "steps"}
        if unknown or "steps" not in data:
            raise KfoptError(
                f"Recipe '{where}' must have 'steps' (and optionally 'name'); found keys {sorted(data)}.",
                "see the recipe example in the README.",
            )
        data = data["steps"]
    if not isinstance(data, list) or not data:
        raise KfoptError(f"Recipe '{where}' has no steps.", "list steps like '- quantize: {mode: int8}'.")
    steps = []
    for item in data:
        if isinstance(item, str):
            steps.extend(_inline(item).steps)
        elif isinstance(item, dict) and len(item) == 1:
            technique, config = next(iter(item.items()))
            if config is not None and not isinstance(config, dict):
                raise KfoptError(
                    f"Recipe '{where}': the config of step '{technique}' must be a mapping, got {config!r}.",
                    f"write '- {technique}: {{key: value}}'.",
                )
            steps.append(Step(str(technique), dict(config or {})))
        else:
            raise KfoptError(
                f"Recipe '{where}': step {item!r} must be 'technique' or '{{technique: {{key: value}}}}'.",
                "see the recipe example in the README.",
            )
    return Recipe(steps, name=name)


def plan(recipe: Recipe, registry, input_format: str = "keras") -> list[PlannedStep]:
    """Validate every step's technique, config and formats; fail before any work is done."""
    planned: list[PlannedStep] = []
    current = input_format
    for index, step in enumerate(recipe.steps, start=1):
        technique = registry.get(step.technique)
        config = validate_config(technique, step.config)
        if current not in technique.accepts:
            raise KfoptError(
                _format_mismatch(recipe, index, step, technique, current, planned),
                _format_fix(recipe, technique, planned),
            )
        output = technique.produces_for(config)
        planned.append(PlannedStep(technique, config, current, output))
        current = output
    return planned


def validate_config(technique, config: dict):
    """Build the technique's Config, turning pydantic errors into one readable line."""
    try:
        return technique.Config(**config)
    except pydantic.ValidationError as exc:
        fields = technique.Config.model_fields
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]) or "config"
            if error["type"] == "extra_forbidden":
                problems.append(
                    f"unknown config key '{key}'.{did_you_mean(key, fields)} Valid keys: {', '.join(fields)}"
                )
            else:
                given = config.get(key, error.get("input"))
                problems.append(f"{key}={given!r} is invalid: {error['msg']}")
        raise KfoptError(
            f"Step '{technique.name}': " + "; ".join(problems) + ".",
            f"see `kfopt plugins` for {technique.name}'s config keys and their ranges.",
        ) from None


def _format_mismatch(recipe, index, step, technique, current, planned) -> str:
    producer = planned[-1].technique.name if planned else None
    source = (
        f"step {index - 1} '{producer}' produces a {current} model" if producer else f"the input model is {current}"
    )
    return f"Recipe '{recipe}': step {index} '{step.technique}' needs a {' or '.join(sorted(technique.accepts))} model, but {source}."


def _format_fix(recipe, technique, planned) -> str:
    if planned:
        return f"put '{technique.name}' before '{planned[-1].technique.name}' (techniques that train on Keras models come first, conversion last)."
    return f"pass a model in one of the formats '{technique.name}' accepts: {', '.join(sorted(technique.accepts))}."
