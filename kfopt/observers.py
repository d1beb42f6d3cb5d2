"""Calling the observer hooks (tracking, progress display) for one run.

``kfopt optimize`` and the pipeline's components call them the same way::

    observers = Observers(registry().pm, observer_context(out, registered_model="digits"))
    observers.run_started({"model": ..., "data": ..., "seed": 0, "recipes": [...], "out": str(out)})
    observers.candidate_finished(candidate)          # once per candidate
    result.update(observers.run_finished(result))    # after metrics.json is written

Every hook gets the same :class:`RunContext`: the run's settings, read-only,
and a state area per observer (``context.state("my_observer")``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .errors import KfoptError
from .select import budget_value, check_goal

DEFAULT_EXPERIMENT = "kfopt"
DEFAULT_MAX_ACCURACY_DROP = 0.01

_State = TypeVar("_State")


class ObserverWarning(UserWarning):
    """An observer hook raised; the run went on without it."""


@dataclass(frozen=True)
class RunContext:
    """The ``context`` every observer hook of one run gets: the run's settings and each observer's own state.

    The settings are read-only, so no observer can change what another one
    sees. What an observer keeps between its hooks goes in
    :meth:`state`, under its own name. Build one with :func:`observer_context`.
    """

    out: str
    """The run directory (``metrics.json``, the baseline and candidates are written under it)."""
    tracking: bool
    """Whether this run is logged to MLflow (asked for explicitly, or implied by the other tracking settings)."""
    tracking_uri: str | None
    """MLflow tracking URI as the user gave it; None: ``MLFLOW_TRACKING_URI``, else kfopt's local default."""
    experiment: str
    """MLflow experiment name."""
    registered_model: str | None
    """Registered model the winner becomes a version of; None: nothing is registered."""
    max_accuracy_drop: float | str
    """The budget: largest drop of the budgeted metric allowed (a float, or ``"N%"`` of the baseline's value)."""
    objective: str
    """What "better" means: ``size``, ``latency`` or ``mix:W``."""
    _states: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def state(self, observer: str, factory: Callable[[], _State] = dict) -> _State:
        """``observer``'s own state for this run: ``factory()`` on the first call, the same object afterwards.

        Name it after the plugin (e.g. its entry-point name), so observers never
        see each other's state. ``factory`` may be a dataclass for typed state.
        """
        if observer not in self._states:
            self._states[observer] = factory()
        return self._states[observer]

    # Observers written when the context was a dict read settings as context["tracking"]; keep that
    # working (like kfopt's result records, which read as the JSON they are written as).
    def __getitem__(self, key: str) -> Any:
        if key not in _SETTINGS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """A setting by name, as ``context.get("tracking_uri")`` read the former dict; prefer the attribute."""
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(
            f"the observer context is read-only (context[{key!r}] = ...): "
            f"keep an observer's own data in context.state({key!r}) instead"
        )


_SETTINGS = frozenset(f.name for f in fields(RunContext) if not f.name.startswith("_"))


def observer_context(
    out: str | os.PathLike,
    *,
    tracking: bool | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    registered_model: str | None = None,
    max_accuracy_drop: float | str = DEFAULT_MAX_ACCURACY_DROP,
    objective: str = "size",
) -> RunContext:
    """The :class:`RunContext` the observer hooks get, with the user's tracking settings.

    ``tracking=None`` means: track when asked for, i.e. when ``registered_model``,
    ``tracking_uri`` or ``experiment`` is given or ``MLFLOW_TRACKING_URI`` is set.
    """
    check_goal(max_accuracy_drop, objective)
    from .promotion import check_model_name  # the one check of registered model names (promotion imports this)

    check_model_name(registered_model)
    if tracking is False and registered_model:
        raise KfoptError(
            f"Registering '{registered_model}' needs MLflow, but tracking is turned off.",
            "drop --no-tracking, or drop --registered-model.",
        )
    asked = bool(registered_model or tracking_uri or experiment or os.environ.get("MLFLOW_TRACKING_URI"))
    return RunContext(
        out=str(out),
        tracking=asked if tracking is None else tracking,
        tracking_uri=tracking_uri,
        experiment=experiment or DEFAULT_EXPERIMENT,
        registered_model=registered_model,
        max_accuracy_drop=budget_value(max_accuracy_drop),
        objective=objective,
    )


class Observers:
    """Calls the observer hooks of a plugin manager with one run's context.

    A ``KfoptError`` (a setting the user got wrong, e.g. a bad tracking URI)
    propagates; any other exception from an observer becomes a warning.
    """

    def __init__(self, pm, context: RunContext):
        self.pm = pm
        self.context = context

    def run_started(self, run: dict) -> None:
        self._call("kfopt_run_started", run=run)

    def candidate_finished(self, candidate: dict) -> None:
        self._call("kfopt_candidate_finished", candidate=candidate)

    def run_finished(self, result: dict) -> dict:
        """Fields the observers add to the result (merged in hook order)."""
        updates: dict = {}
        for returned in self._call("kfopt_run_finished", result=result):
            if isinstance(returned, dict):
                updates.update(returned)
        return updates

    def _call(self, name: str, **kwargs) -> list:
        results = []
        kwargs["context"] = self.context
        # Each implementation separately, so one broken observer does not silence the others.
        for impl in reversed(getattr(self.pm.hook, name).get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            try:  # like pluggy: an implementation may take a subset of the arguments
                results.append(impl.function(**{arg: kwargs[arg] for arg in impl.argnames}))
            except KfoptError:
                raise
            except Exception as exc:
                plugin = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                warnings.warn(
                    f"observer {plugin}.{name} failed and was skipped: {type(exc).__name__}: {exc}",
                    ObserverWarning,
                    stacklevel=3,
                )
        return results
