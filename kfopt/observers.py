"""Calling the observer hooks (tracking, progress display) for one run.

``kfopt optimize`` and the pipeline's components call them the same way::

    observers = Observers(registry().pm, observer_context(out, registered_model="digits"))
    observers.run_started({"model": ..., "data": ..., "seed": 0, "recipes": [...], "out": str(out)})
    observers.candidate_finished(candidate)          # once per candidate
    result.update(observers.run_finished(result))    # after metrics.json is written
"""

from __future__ import annotations

import os
import warnings

from .errors import KfoptError
from .select import check_goal

DEFAULT_EXPERIMENT = "kfopt"
DEFAULT_MAX_ACCURACY_DROP = 0.01


class ObserverWarning(UserWarning):
    """An observer hook raised; the run went on without it."""


def observer_context(
    out: str | os.PathLike,
    *,
    tracking: bool | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    registered_model: str | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    objective: str = "size",
) -> dict:
    """The ``context`` dict the observer hooks get, with the user's tracking settings.

    ``tracking=None`` means: track when asked for, i.e. when ``registered_model``,
    ``tracking_uri`` or ``experiment`` is given or ``MLFLOW_TRACKING_URI`` is set.
    """
    check_goal(max_accuracy_drop, objective)
    if tracking is False and registered_model:
        raise KfoptError(
            f"Registering '{registered_model}' needs MLflow, but tracking is turned off.",
            "drop --no-tracking, or drop --registered-model.",
        )
    asked = bool(registered_model or tracking_uri or experiment or os.environ.get("MLFLOW_TRACKING_URI"))
    return {
        "out": str(out),
        "tracking": asked if tracking is None else tracking,
        "tracking_uri": tracking_uri,
        "experiment": experiment or DEFAULT_EXPERIMENT,
        "registered_model": registered_model,
        "max_accuracy_drop": float(max_accuracy_drop),
        "objective": objective,
    }


class Observers:
    """Calls the observer hooks of a plugin manager with one run's context.

    A ``KfoptError`` (a setting the user got wrong, e.g. a bad tracking URI)
    propagates; any other exception from an observer becomes a warning.
    """

    def __init__(self, pm, context: dict):
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
