"""Hook specifications: the contract between kfopt and its plugins.

Built-in techniques implement these hooks exactly like third-party packages do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kfopt.observers import RunContext
    from kfopt.result import Candidate, RunResult
    from kfopt.task import Metric

    from .technique import Technique

hookspec = pluggy.HookspecMarker("kfopt")
hookimpl = pluggy.HookimplMarker("kfopt")


@hookspec
def kfopt_register_techniques(register: Callable[[Technique], None]) -> None:
    """Register optimization techniques by calling ``register(technique_instance)``.

    Called once when the plugin manager is built. Return value is ignored.
    Registering a name that is already taken raises an error naming both owners.
    """


@hookspec
def kfopt_register_metrics(register: Callable[[Metric], None]) -> None:
    """Register quality metrics by calling ``register(metric)`` with a :class:`kfopt.plugins.Metric`.

    A metric is what ``--metric NAME`` budgets: its ``name``, ``higher_is_better``,
    the ``tasks`` it fits (multiclass, binary, multilabel, regression) and
    ``compute(y_true, y_score) -> float``. Called once when the plugin manager
    is built. Return value is ignored. Registering a name that is already taken
    raises an error naming both owners.
    """


# -- observer hooks: tracking and progress display ----------------------------------
# ``context`` is the run's RunContext (kfopt.plugins.RunContext, built by
# kfopt.observers.observer_context), the same object in all three calls. Its
# attributes are the run's settings, read-only: ``out`` (the run directory),
# ``tracking`` (whether the run is logged to MLflow), ``tracking_uri``,
# ``experiment``, ``registered_model``, ``max_accuracy_drop`` and ``objective``.
# An observer keeps its own state in ``context.state("its_name")``, never shared.
# A KfoptError raised by an observer stops the run (a setting the user must fix);
# any other exception is reported as a warning and never fails the run.


@hookspec
def kfopt_run_started(run: dict, context: RunContext) -> None:
    """Called once before any work: ``run`` names the ``model``, ``data``, ``seed``,
    ``recipes`` (labels) and ``out`` directory. Return value is ignored."""


@hookspec
def kfopt_candidate_finished(candidate: Candidate, context: RunContext) -> None:
    """Called once per candidate after it is saved and measured, whatever its
    ``status`` (ok, skipped, failed); ``candidate`` is its typed record
    (:class:`kfopt.result.Candidate`, readable like its metrics.json entry).
    Read it, don't change it. Return value is ignored."""


@hookspec
def kfopt_run_finished(result: RunResult, context: RunContext) -> dict | None:
    """Called once after ``metrics.json`` is written; ``result`` is the run record
    (:class:`kfopt.result.RunResult`, readable like metrics.json). Read it, don't change it.

    Return a dict of fields to add to the result (e.g. ``registered_model``,
    ``tracking``, as records or dicts), or None. Returned fields are written back
    to metrics.json; what the run measured and decided (baseline, candidates,
    winner, selection, ...) cannot be changed this way.
    """
