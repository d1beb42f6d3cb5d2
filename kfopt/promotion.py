"""Registering a run's winner in the MLflow Model Registry and promoting it.

The winner becomes a new version of the registered model with alias
``challenger``. Alias ``champion`` moves to it only when it passes the gate
against the current champion; every decision is written as tags on the version
(``kfopt.decision``, ``kfopt.reason``, ``kfopt.previous_champion``,
``kfopt.objective``, ``kfopt.decided_at``, ``kfopt.decided_by``). Stages are
deprecated in MLflow 3 and never used.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from . import tracking
from .errors import KfoptError
from .observers import DEFAULT_EXPERIMENT, DEFAULT_MAX_ACCURACY_DROP
from .result import Candidate, Registration, RunResult, Tracking
from .select import (
    Budget,
    budget_value,
    check_goal,
    objective_metric,
    objective_value,
    quality,
    select,
    why_not_eligible,
    worse_than_champion,
)

CHAMPION = "champion"
CHALLENGER = "challenger"
#: MLflow has no compare-and-set for aliases. After moving ``champion`` a
#: promotion waits this long and reads it again: a concurrent promotion that
#: decided against an older champion has written by then, and the two are compared.
SETTLE_SECONDS = 1.0
MAX_ROUNDS = 5
#: Candidate metrics copied onto the model version as tags, so the registry alone
#: is enough to judge a later challenger against it.
VERSION_METRICS = ("accuracy", "accuracy_drop", "metric", "metric_drop", "gzip_bytes", "latency_p50_ms")


def promote_from(
    directory: str | os.PathLike,
    *,
    registered_model: str,
    tracking_uri: str | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    objective: str = "size",
    experiment: str = DEFAULT_EXPERIMENT,
) -> Registration:
    """Log a finished run's directory to MLflow (what is not logged yet), register its winner, promote it.

    ``directory`` holds ``metrics.json`` as ``optimize()`` writes it. Safe to
    call again: runs and the model version are created once (``tracking.json``
    in the directory records them), and a decision already taken is returned
    as it was. Returns the :class:`~kfopt.result.Registration` and writes it into
    metrics.json as ``registered_model``.
    Raises ``TrackingFailed`` (exit code 3) when MLflow cannot be reached.
    """
    directory = Path(directory)
    result = RunResult.load(directory)
    check_settings(registered_model, max_accuracy_drop, objective)
    _check_writable(directory)
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_uri(uri)
    try:
        logger = tracking.RunLogger(directory, uri, experiment)
        logger.log_result(result)
        decision = promote(logger, result, registered_model, max_accuracy_drop=max_accuracy_drop, objective=objective)
    except KfoptError:
        raise
    except tracking.mlflow_errors() as exc:
        raise tracking.failure(uri, exc, directory) from exc
    result.registered_model = decision
    result.tracking = Tracking(
        status="ok",
        uri=uri,
        experiment=experiment,
        run_id=logger.state.get("parent_run_id"),
        registered_model=registered_model,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
    )
    result.save(directory)
    return decision


def check_settings(registered_model: str, max_accuracy_drop: float, objective: str) -> None:
    if not registered_model or any(c in registered_model for c in "'\"`"):
        raise KfoptError(
            f"Registered model name {registered_model!r} is not usable.",
            "pass --registered-model a non-empty name without quotes, e.g. digits-classifier.",
        )
    check_goal(max_accuracy_drop, objective)


def _check_writable(directory: Path) -> None:
    if not os.access(directory, os.W_OK):
        raise KfoptError(
            f"'{directory}' is not writable; promotion records what it logged in {tracking.TRACKING_FILE} there.",
            "copy the run directory somewhere writable and promote from the copy.",
        )


# -- the gate -----------------------------------------------------------------------
def gate(
    challenger: dict,
    champion: dict | None,
    *,
    max_accuracy_drop: float,
    objective: str,
    champion_version: str | None = None,
) -> tuple[bool, str]:
    """Whether ``challenger`` should become champion, and why, in one sentence.

    It must be eligible by :func:`kfopt.select.why_not_eligible` (the budget
    against its own baseline, the same check that picked it); then it wins
    when there is no champion, or when its accuracy is at least the champion's
    minus the budget and it is strictly better on the objective.
    """
    key = objective_metric(objective)
    reason = why_not_eligible({"status": "ok", **challenger}, max_accuracy_drop=max_accuracy_drop, objective=objective)
    if reason:
        return False, reason
    if champion is None:
        return True, "no champion yet"
    name = f"champion v{champion_version}" if champion_version else "the champion"
    ours, theirs = objective_value(challenger, objective), objective_value(champion, objective)
    metric, mine, its = _budgeted(challenger, champion)
    missing = [k for k, a, b in ((metric, mine, its), (key, ours, theirs)) if a is None or b is None]
    if missing:
        return False, f"cannot compare with {name}: {', '.join(missing)} missing"
    budget = str(Budget.parse(max_accuracy_drop))
    if worse_than_champion(mine, its, max_accuracy_drop=max_accuracy_drop, higher_is_better=_higher_is_better(metric)):
        return False, f"{metric} {mine:.4f} is more than {budget} {_worse(metric)} {name}'s {its:.4f}"
    if not ours < theirs:
        return False, f"{key} {ours:g} is not below {name}'s {theirs:g}"
    return True, f"{key} {ours:g} < {name}'s {theirs:g}, {metric} {mine:.4f} vs {its:.4f} (budget {budget})"


def _budgeted(challenger: dict, champion: dict) -> tuple[str, float | None, float | None]:
    """(metric name, the challenger's value, the champion's value) of the challenger's budgeted metric.

    A champion registered with another metric (or before metrics had names) has no value to compare.
    """
    metric = quality(challenger).name
    if metric == "accuracy":
        return metric, challenger.get("accuracy"), champion.get("accuracy")
    same = champion.get("metric_name") == metric
    return metric, challenger.get("metric"), champion.get("metric") if same else None


def _budget_tag(max_accuracy_drop) -> str:
    value = budget_value(max_accuracy_drop)
    return value if isinstance(value, str) else repr(float(value))


def _higher_is_better(metric: str) -> bool:
    from .plugins.manager import registry

    found = registry().metrics.get(metric)
    return found.higher_is_better if found is not None else True


def _worse(metric: str) -> str:
    return "below" if _higher_is_better(metric) else "above"


# -- registry -----------------------------------------------------------------------
def promote(
    logger: tracking.RunLogger, result: RunResult, name: str, *, max_accuracy_drop: float, objective: str
) -> Registration:
    """Register the winner of ``result`` as a version of ``name`` and decide on it (once).

    The winner is decided again by :func:`kfopt.select.select` under this
    promotion's budget and objective (the one selection path): a candidate over
    the budget is never registered.
    """
    result.apply(select(result.candidates, max_accuracy_drop=max_accuracy_drop, objective=objective))
    candidate: Candidate | None = result.winning_candidate
    if candidate is None:
        why = "; ".join(f"{c.recipe}: {c.not_selected_because}" for c in result.candidates)
        return Registration(
            name=name, reason=f"no winner to register: no candidate is within the budget ({why})"[:5000]
        )
    winner = candidate.recipe
    logged = logger.logged(winner)
    if not logged or not logged.get("model_id"):
        raise KfoptError(
            f"The winner '{winner}' in {logger.directory}/metrics.json has no logged model.",
            "check that the candidate's status is ok and its model file is in the run directory.",
        )
    client = logger.client
    _ensure_registered_model(client, name)
    version = _version_of_run(client, name, logged["run_id"])
    if version is None:
        tags = {
            "kfopt.recipe": winner,
            "kfopt.format": str(candidate.format),
            "kfopt.run_dir": str(logger.directory.resolve()),
            **{f"kfopt.{k}": repr(float(candidate[k])) for k in VERSION_METRICS if candidate.get(k) is not None},
            **({"kfopt.metric_name": candidate.metric_name} if candidate.get("metric_name") else {}),
        }
        version = client.create_model_version(
            name,
            source=f"models:/{logged['model_id']}",
            run_id=logged["run_id"],
            model_id=logged["model_id"],
            tags=tags,
            description=f"kfopt: {winner}",
        )
    logger.state.setdefault("registered", {})[name] = str(version.version)
    logger.save()
    if "kfopt.decision" in version.tags:  # decided by an earlier attempt: report it again, change nothing
        return _summary(client, name, version.version)
    _set_alias(client, name, CHALLENGER, version.version)
    promoted, reason, previous = _decide(
        client, name, str(version.version), candidate, max_accuracy_drop=max_accuracy_drop, objective=objective
    )
    decision = {
        "kfopt.reason": reason[:5000],
        "kfopt.previous_champion": previous or "none",
        "kfopt.objective": objective,
        "kfopt.max_accuracy_drop": _budget_tag(max_accuracy_drop),
        "kfopt.decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kfopt.decided_by": _who(),
        # Last: its presence marks the decision as complete, and a re-run returns it unchanged.
        "kfopt.decision": "promoted" if promoted else "rejected",
    }
    for key, value in decision.items():
        client.set_model_version_tag(name, version.version, key, value)
    return _summary(client, name, version.version)


def _decide(
    client, name: str, version: str, candidate: dict, *, max_accuracy_drop: float, objective: str
) -> tuple[bool, str, str | None]:
    """Move ``champion`` to ``version`` if it passes the gate against the champion of the moment.

    The champion is read again right before the alias moves, and once more
    after SETTLE_SECONDS: if a concurrent promotion moved it meanwhile, the
    decision is taken again against that version, so two promotions at once
    leave the alias on the better one.
    """
    first_previous = None
    for round_ in range(MAX_ROUNDS):
        current = _champion(client, name)
        if round_ == 0:
            first_previous = current
        if current == version:
            return (
                True,
                _reason_promoted(first_previous, version, client, name, candidate, max_accuracy_drop, objective),
                first_previous,
            )
        champion_metrics = _metrics_of(client, name, current) if current else None
        ok, reason = gate(
            candidate,
            champion_metrics,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            champion_version=current,
        )
        if not ok:
            return False, reason, current
        _set_alias(client, name, CHAMPION, version)
        time.sleep(SETTLE_SECONDS)
        if _champion(client, name) == version:
            return True, reason, current
    return (
        False,
        f"champion kept moving during {MAX_ROUNDS} rounds; left to the concurrent promotion",
        _champion(client, name),
    )


def _reason_promoted(previous, version, client, name, candidate, max_accuracy_drop, objective) -> str:
    if previous == version:
        return "already champion"
    metrics = _metrics_of(client, name, previous) if previous else None
    return gate(
        candidate, metrics, max_accuracy_drop=max_accuracy_drop, objective=objective, champion_version=previous
    )[1]


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Registered by kfopt: versions carry kfopt.* decision tags.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _set_alias(client, name: str, alias: str, version, attempts: int = 5) -> None:
    """Point ``alias`` at ``version``, surviving another promotion setting the same alias at once.

    MLflow's SQL store inserts a new alias row without an upsert, so two
    processes creating the same alias together make one fail on the unique
    constraint; by then the row exists and setting it again is a plain update.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _version_of_run(client, name: str, run_id: str):
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _champion(client, name: str) -> str | None:
    aliases = client.get_registered_model(name).aliases or {}
    value = aliases.get(CHAMPION)
    return str(value) if value is not None else None


def _metrics_of(client, name: str, version: str) -> dict:
    """The champion's metrics: from its kfopt tags, else from the run that produced it."""
    mv = client.get_model_version(name, version)
    metrics = {k: float(mv.tags[f"kfopt.{k}"]) for k in VERSION_METRICS if f"kfopt.{k}" in mv.tags}
    if len(metrics) < len(VERSION_METRICS) and mv.run_id:
        try:
            run_metrics = client.get_run(mv.run_id).data.metrics
        except Exception:
            run_metrics = {}
        metrics = {**{k: run_metrics[k] for k in VERSION_METRICS if k in run_metrics}, **metrics}
    if "kfopt.metric_name" in mv.tags:
        metrics["metric_name"] = mv.tags["kfopt.metric_name"]
    return metrics


def _summary(client, name: str, version) -> Registration:
    mv = client.get_model_version(name, str(version))
    aliases = client.get_registered_model(name).aliases or {}
    previous = mv.tags.get("kfopt.previous_champion")
    return Registration(
        name=name,
        version=int(mv.version),
        aliases=sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
        promoted=mv.tags.get("kfopt.decision") == "promoted",
        reason=mv.tags.get("kfopt.reason"),
        previous_champion=None if previous in (None, "none") else previous,
    )


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# -- history ------------------------------------------------------------------------
def history(name: str, tracking_uri: str | None = None) -> list[dict]:
    """Every version of ``name``, newest first, with aliases, metrics and decision tags."""
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise KfoptError(
            f"Registered model '{name}' does not exist at {uri}: there is no database file there.",
            "run from the directory you ran kfopt in, or pass --tracking-uri (or set MLFLOW_TRACKING_URI).",
        )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for key, value in tracking.HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            from .errors import did_you_mean

            known = [m.name for m in client.search_registered_models(max_results=100)]
            raise KfoptError(
                f"Registered model '{name}' does not exist at {uri}.{did_you_mean(name, known)}"
                + (f" Known models: {', '.join(sorted(known)[:20])}." if known else " No models are registered there."),
                "check the name, or pass the --tracking-uri the model was registered at.",
            ) from None
        versions = client.search_model_versions(f"name='{name}'")
    except KfoptError:
        raise
    except tracking.mlflow_errors() as exc:
        raise tracking.TrackingFailed(
            f"MLflow at {uri} failed: {tracking.short_reason(exc)}.",
            "check the server, or --tracking-uri / MLFLOW_TRACKING_URI.",
        ) from exc
    by_version: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = mv.tags or {}
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "recipe": tags.get("kfopt.recipe"),
                "format": tags.get("kfopt.format"),
                **{k: float(tags[f"kfopt.{k}"]) if f"kfopt.{k}" in tags else None for k in VERSION_METRICS},
                "decision": tags.get("kfopt.decision"),
                "reason": tags.get("kfopt.reason"),
                "previous_champion": tags.get("kfopt.previous_champion"),
                "objective": tags.get("kfopt.objective"),
                "decided_at": tags.get("kfopt.decided_at"),
                "decided_by": tags.get("kfopt.decided_by"),
                "run_id": mv.run_id,
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(
                    timespec="seconds"
                ),
            }
        )
    return rows
