"""The accuracy-aware search: which recipes to try, and how each round refines the last.

- :mod:`~kfopt.recipe_search.space`: the search space, round 1 (``load_search``,
  ``SearchRecipe``, ``split_by_pool``, the built-in ``default.yaml``);
- :mod:`~kfopt.recipe_search.sensitivity`: what each layer alone costs when pruned or
  int8-rounded (``layer_sensitivity``);
- :mod:`~kfopt.recipe_search.proposals`: the recipes of the next round from every
  candidate so far (``propose``, ``next_round``), chosen on the validation split;
- :mod:`~kfopt.recipe_search.driver`: ``search`` in-process (``kfopt search``), and
  the round bookkeeping the pipeline shares with it (``best_same_architecture``:
  the best candidate that keeps the user's architecture, beside the winner).

Importing this package does not import TensorFlow.
"""

from .driver import (
    ALL_ROUNDS_DONE,
    ROUND_ONE_WHY,
    best_of_round,
    best_same_architecture,
    keeps_architecture,
    optimization_seconds,
    search,
    search_outcome,
    search_settings,
    trace_entry,
)
from .proposals import Proposal, best_feasible, next_round, propose, round_gain, target_met, val_feasible
from .sensitivity import layer_sensitivity
from .space import DEFAULT_SEARCH, SearchRecipe, default_search_path, load_search, split_by_pool

__all__ = [
    "ALL_ROUNDS_DONE",
    "DEFAULT_SEARCH",
    "ROUND_ONE_WHY",
    "Proposal",
    "SearchRecipe",
    "best_feasible",
    "best_of_round",
    "best_same_architecture",
    "default_search_path",
    "keeps_architecture",
    "layer_sensitivity",
    "load_search",
    "next_round",
    "optimization_seconds",
    "propose",
    "round_gain",
    "search",
    "search_outcome",
    "search_settings",
    "split_by_pool",
    "target_met",
    "trace_entry",
    "val_feasible",
]
