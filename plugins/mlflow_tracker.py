"""Built-in observer: logs each run to MLflow, then registers and promotes the winner.

Active when the run's context asks for tracking (``context.tracking``, see
:func:`kfopt.observers.observer_context`). MLflow trouble never fails the run:
the result gets ``tracking.status = "failed"`` with the reason, everything
stays on disk, and ``kfopt promote --from DIR`` finishes the job later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfopt.errors import KfoptError
from kfopt.result import Registration, RunResult, Tracking

from .spec import hookimpl

if TYPE_CHECKING:
    from kfopt.observers import RunContext

#: Name of this observer's state in the run's context: ``context.state(STATE, _Tracking)``.
STATE = "mlflow_tracker"


@dataclass
class _Tracking:
    """What this observer keeps between the hooks of one run."""

    uri: str | None = None  # set by kfopt_run_started when the run is tracked; None: not tracked
    run: dict | None = None
    logger: Any = None  # a kfopt.tracking.RunLogger, started when there is something to log
    error: str | None = None  # why MLflow failed; nothing more is sent once it did


@hookimpl(trylast=True)
def kfopt_run_started(run: dict, context: RunContext) -> None:
    if not context.tracking:
        return
    from kfopt import tracking

    uri = tracking.resolve_uri(context.tracking_uri)
    tracking.check_uri(uri)  # a wrong URI is the user's to fix, before any work: exit 2
    # MLflow is first contacted when there is something to log: a run that stops
    # on bad input before its first candidate leaves no half-open run behind.
    state = context.state(STATE, _Tracking)
    state.uri, state.run = uri, run


@hookimpl(trylast=True)
def kfopt_candidate_finished(candidate: dict, context: RunContext) -> None:
    state = context.state(STATE, _Tracking)
    if state.uri is None or state.error:
        return
    try:
        _logger(state, context).log_candidate(candidate, state.run)
    except Exception as exc:  # MLflow down: optimize on, say so at the end
        state.error = _reason(exc)


@hookimpl(trylast=True)
def kfopt_run_finished(result: RunResult, context: RunContext) -> dict | None:
    state = context.state(STATE, _Tracking)
    if state.uri is None:
        return None
    name = context.registered_model
    registered = None
    if not state.error:
        from kfopt import promotion

        try:
            logger = _logger(state, context)
            logger.log_result(result)  # whatever the per-candidate hook could not log
            if name:
                registered = promotion.promote(
                    logger, result, name, max_accuracy_drop=context.max_accuracy_drop, objective=context.objective
                )
        except Exception as exc:
            state.error = _reason(exc)
    if name and registered is None:
        registered = Registration(name=name, reason=f"not registered: MLflow tracking failed ({state.error})")
    logger = state.logger
    tracked = Tracking(
        status="failed" if state.error else "ok",
        uri=state.uri,
        experiment=context.experiment,
        error=state.error,
        run_id=logger.state.get("parent_run_id") if logger else None,
        registered_model=name,
        objective=context.objective,
        max_accuracy_drop=context.max_accuracy_drop,
    )
    return {"tracking": tracked, "registered_model": registered}


def _logger(state: _Tracking, context: RunContext):
    if state.logger is None:
        from kfopt import tracking

        state.logger = tracking.RunLogger(state.run["out"], state.uri, context.experiment)
        state.logger.start(state.run)
    return state.logger


def _reason(exc: Exception) -> str:
    from kfopt import tracking

    if isinstance(exc, KfoptError):
        return exc.one_line()
    return tracking.short_reason(exc)
