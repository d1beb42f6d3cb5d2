"""The search space: which recipes round 1 tries, and which node pool each needs.

A search file is a YAML list of recipes, each inline or as a mapping::

    - quantize(mode=int8)
    - prune(target_sparsity=0.8)>quantize(mode=int8)
    - name: small-student
      steps:
        - distill: {width: 0.25}
        - quantize: {mode: int8}

Every recipe is parsed and planned (techniques, configs, formats) when the
search is loaded, so a mistake stops the run before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import KfoptError
from ..recipe import PlannedStep, Recipe, parse_recipe, plan

#: The built-in search space (package data next to this module), used when no --search is given.
DEFAULT_SEARCH = "default.yaml"


@dataclass
class SearchRecipe:
    """A planned recipe of a search, and whether any of its steps fine-tunes."""

    recipe: Recipe
    planned: list[PlannedStep]

    @property
    def label(self) -> str:
        return self.recipe.label

    @property
    def trains(self) -> bool:
        """True when a step fine-tunes (``Technique.trains_for``): it belongs on the accelerator pool."""
        return any(step.technique.trains_for(step.config) for step in self.planned)

    def to_dict(self) -> dict:
        """The recipe as data a pipeline passes to a component (labels survive the trip)."""
        return self.recipe.to_dict()


def default_search_path() -> Path:
    """Where the built-in search space is installed."""
    return Path(str(resources.files(__package__).joinpath(DEFAULT_SEARCH)))


def load_search(source: str | os.PathLike | list | None = None, registry=None) -> list[SearchRecipe]:
    """Load and plan a search space: a YAML file, a list of recipes, or None for the built-in one."""
    if registry is None:
        from ..plugins.manager import registry as build_registry

        registry = build_registry()
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the search space"
    items = _read(source) if not isinstance(source, list) else source
    if not isinstance(items, list) or not items:
        raise KfoptError(
            f"Search file '{where}' must be a non-empty YAML list of recipes.",
            "write one recipe per list item, e.g. '- quantize(mode=int8)'.",
        )
    recipes, seen = [], {}
    for index, item in enumerate(items, start=1):
        if not isinstance(item, (str, dict, list)):
            raise KfoptError(
                f"Search file '{where}': item {index} ({item!r}) is not a recipe.",
                "write an inline recipe like 'prune>quantize(mode=int8)' or a mapping with 'steps'.",
            )
        recipe = parse_recipe(item) if not isinstance(item, str) else _inline(item)
        try:
            planned = plan(recipe, registry)
        except KfoptError as exc:
            raise KfoptError(
                f"Search file '{where}', recipe {index} ('{recipe.label}'): {exc.message}", exc.fix
            ) from None
        if recipe.label in seen:
            raise KfoptError(
                f"Search file '{where}': recipes {seen[recipe.label]} and {index} are both called '{recipe.label}'.",
                "remove the duplicate, or give one of them a different 'name'.",
            )
        seen[recipe.label] = index
        recipes.append(SearchRecipe(recipe, planned))
    return recipes


def split_by_pool(recipes: list[SearchRecipe]) -> tuple[list[SearchRecipe], list[SearchRecipe]]:
    """(recipes that fine-tune -> accelerator pool, post-training recipes -> CPU pool), order kept."""
    return [r for r in recipes if r.trains], [r for r in recipes if not r.trains]


def _read(source) -> list:
    from ..limits import load_yaml

    path = default_search_path() if source is None else Path(source)
    if not path.is_file():
        raise KfoptError(
            f"Search file '{path}' does not exist.", "check the path, or leave out --search to use the built-in search."
        )
    return load_yaml(path, "Search file")


def _inline(text: str) -> Recipe:
    # parse_recipe would read a string ending in .yaml as a file name; a search item is always inline.
    return parse_recipe([text])
