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
import re
import shlex
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from . import lineage, rundir, tracking
from .errors import KfoptError
from .observers import DEFAULT_EXPERIMENT, DEFAULT_MAX_ACCURACY_DROP
from .result import Candidate, Registration, RunResult, Tracking
from .select import (
    MAX_TIE_WIDTH,
    Budget,
    budget_value,
    check_budget,
    check_goal,
    mix_weight,
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


#: How long a promotion waits for another one holding the same run directory. The lock serializes
#: them: the second finds the first one's version and reports it, so one version is registered.
LOCK_WAIT_SECONDS = 900.0
#: Latency is measured again only for objectives that decide on it, and is noisy: a recorded
#: latency may be this many times off the one measured now before the record is refused.
LATENCY_FACTOR = 3.0
REMEASURE_LATENCY_RUNS = 100
#: Names kfopt registers under: what MLflow accepts in a name, a ``models:/NAME@alias`` URI and a
#: search filter alike (no quotes, ``%``, ``/``, ``:``, ``@`` or spaces).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,255}")


def promote_from(
    directory: str | os.PathLike,
    *,
    registered_model: str | None,
    tracking_uri: str | None = None,
    max_accuracy_drop: float | str | None = None,
    objective: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    trust_metrics: bool = False,
    data: str | None = None,
) -> Registration | None:
    """Log a finished run's directory to MLflow (what is not logged yet), register its winner, promote it.

    ``directory`` holds ``metrics.json`` as ``optimize()`` writes it; ``max_accuracy_drop``
    and ``objective`` default to the ones the run was decided with. Nothing is
    logged before the directory is verified (:func:`verify_run`: every model
    file it lists is inside it, with the sha256 recorded) and, unless
    ``trust_metrics``, before the winner is measured again on the test split of
    ``data`` (default: the data metrics.json names, but never a ``py:`` loader)
    and found to agree with metrics.json (:func:`remeasure`). The directory is
    locked meanwhile, so concurrent promotions of it register one version.

    Safe to call again: runs and the model version are created once
    (``tracking.json`` in the directory records them), and a decision already
    taken is returned as it was. Returns the :class:`~kfopt.result.Registration`
    and writes it into metrics.json as ``registered_model``; with
    ``registered_model`` None the runs are only logged and None is returned.
    Raises ``TrackingFailed`` (exit code 3) when MLflow cannot be reached.
    """
    directory = Path(directory)
    decided = RunResult.load(directory).selection or {}  # not a run directory: say so before anything else
    # By default the run's own budget, but never looser than kfopt's default: a promotion does not loosen
    # what the run decided, and an edited metrics.json cannot loosen the gate either.
    if max_accuracy_drop is None:
        max_accuracy_drop = _recorded_budget(decided.get("max_accuracy_drop"))
    objective = objective or decided.get("objective", "size")
    if registered_model is not None:
        check_model_name(registered_model)
    check_goal(max_accuracy_drop, objective)
    _check_writable(directory)
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_uri(uri)
    with rundir.locked(directory, "kfopt promote", wait=LOCK_WAIT_SECONDS):
        result = RunResult.load(directory)  # as the previous holder of the lock left it
        verify_run(directory, result)
        if not trust_metrics:
            remeasure(directory, result, data=data, max_accuracy_drop=max_accuracy_drop, objective=objective)
        try:
            logger = tracking.RunLogger(directory, uri, experiment)
            logger.log_result(result)
            decision = (
                promote(logger, result, registered_model, max_accuracy_drop=max_accuracy_drop, objective=objective)
                if registered_model
                else None
            )
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


def _recorded_budget(recorded) -> float | str:
    """The budget a run was decided with, capped at the default (1 point, or 1% when it was relative)."""
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        return min(float(recorded), DEFAULT_MAX_ACCURACY_DROP)
    if isinstance(recorded, str) and recorded.strip().endswith("%"):
        try:
            return f"{min(float(recorded.strip()[:-1]), DEFAULT_MAX_ACCURACY_DROP * 100):g}%"
        except ValueError:
            pass
    return DEFAULT_MAX_ACCURACY_DROP


def check_model_name(name: str | None) -> str | None:
    """``name`` when MLflow and kfopt can use it as a registered model name (None passes); a KfoptError otherwise.

    The one check of registered model names, in every command and the Python API.
    """
    if name is None or MODEL_NAME.fullmatch(name):
        return name
    raise KfoptError(
        f"Registered model name {_shown(name)!r} is not usable: names are letters, digits, '.', '_' and '-' "
        "(starting with a letter or digit, at most 256).",
        "pass --registered-model a name like digits-classifier.",
    )


def confirm_destination(
    directory: str | os.PathLike, *, registered_model: str | None, tracking_uri: str | None
) -> None:
    """Refuse to take where a model goes from metrics.json: the registered model and tracking URI a run
    asked for are used only when the user names them (the error prints them as the command to confirm).

    A changed metrics.json must not be able to send a model (or a credentials
    file) to another server, or make it a version of another registered model.
    """
    asked = RunResult.load(directory).tracking
    if asked is None:
        return
    unconfirmed = []
    if asked.registered_model and not registered_model:
        unconfirmed.append("--registered-model")
    if asked.uri and not tracking_uri and tracking.resolve_uri(None) != asked.uri:
        unconfirmed.append("--tracking-uri")  # where MLflow would be without it is not where the run asked
    if not unconfirmed:
        return
    name = registered_model or asked.registered_model
    uri = tracking_uri or asked.uri
    command = ["kfopt", "promote", "--from", str(directory)]
    command += ["--registered-model", _shown(name)] if name else []
    command += ["--tracking-uri", _shown(uri)] if uri else []
    if asked.experiment and asked.experiment != DEFAULT_EXPERIMENT:
        command += ["--experiment", _shown(asked.experiment)]
    if asked.max_accuracy_drop is not None:
        command += ["--max-accuracy-drop", _shown(str(asked.max_accuracy_drop))]
    if asked.objective:
        command += ["--objective", _shown(asked.objective)]
    raise KfoptError(
        f"The run in '{directory}' asked to register {_shown(str(asked.registered_model))!r} at "
        f"{_shown(str(asked.uri))} (so says its metrics.json), but kfopt takes where a model goes only from you "
        f"({' and '.join(unconfirmed)} not given): an edited metrics.json could send it elsewhere.",
        f"check those values, then confirm them: {shlex.join(command)}",
    )


def _shown(text: str) -> str:
    """Text from a run directory, safe to print: no control characters (terminal escapes), not too long."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= 300 else text[:297] + "..."


# -- verifying a run directory before anything leaves it ------------------------------
def verify_run(directory: str | os.PathLike, result: RunResult) -> None:
    """Every model file ``result`` lists (the baseline's, each ok candidate's) is inside ``directory``, exists,
    and has the sha256 metrics.json recorded; a KfoptError names the first one that does not."""
    records = [result.baseline] if result.baseline.artifact else []  # only a re-measurement needs it
    records += [c for c in result.candidates if c.ok]
    for record in records:
        what = "the baseline" if record is result.baseline else f"candidate '{_shown(record.recipe)}'"
        if not record.artifact or not record.artifact_sha256:
            missing = "model file" if not record.artifact else "sha256 of its model file"
            raise KfoptError(
                f"{directory}/{rundir.METRICS_FILE} has no {missing} for {what}; refused.",
                "re-run kfopt into the directory: this kfopt lists every model file with its sha256.",
            )
        rundir.resolve_artifact(directory, record.artifact, record.artifact_sha256)


def remeasure(
    directory: str | os.PathLike,
    result: RunResult,
    *,
    data: str | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    objective: str = "size",
) -> dict | None:
    """Measure the candidate this promotion would register again, on the test split, and compare.

    The candidate is the winner :func:`kfopt.select.select` picks under this
    budget and objective. The baseline and candidate come from ``directory``
    (verify it first: :func:`verify_run`), the data is ``data`` or the spec
    metrics.json names (a ``py:`` loader only when given as ``data``: no code
    named by a run directory runs). Sizes must be equal, accuracies and the
    budgeted metric within one test sample, and, for objectives that decide on
    latency, the recorded latency within a factor of :data:`LATENCY_FACTOR`.
    Returns the measured metrics (None when nothing would be registered);
    raises a KfoptError naming every disagreement.
    """
    from .data import load_data
    from .evaluate import Evaluator
    from .models import DEMO_MODELS
    from .plugins.technique import ModelHandle

    candidate = result.candidate(
        select(result.candidates, max_accuracy_drop=max_accuracy_drop, objective=objective).winner
    )
    if candidate is None:
        return None
    spec = _data_to_remeasure_on(result, data)
    if not result.baseline.artifact:
        raise KfoptError(
            f"{directory}/{rundir.METRICS_FILE} names no baseline model, so the winner cannot be measured again.",
            "re-run kfopt into the directory (or pass --trust-metrics if this machine produced it).",
        )
    baseline = ModelHandle("keras", path=rundir.resolve_artifact(directory, result.baseline.artifact))
    shape = tuple(baseline.keras().input_shape[1:])
    validation_from = "train" if result.model in DEMO_MODELS else "test"  # as the run split it (engine.prepare)
    try:
        dataset = load_data(spec, input_shape=shape, seed=result.seed, validation_from=validation_from)
    except KfoptError as exc:
        raise KfoptError(
            f"Cannot re-measure the winner on the run's data: {exc.message}",
            "pass --data with the data the run used (or --trust-metrics if this machine produced the directory).",
        ) from None
    recorded_test = (result.splits or {}).get("test")
    if recorded_test is not None and recorded_test != len(dataset.test):
        raise KfoptError(
            f"The data {_shown(spec)!r} gives {len(dataset.test)} test samples, but the run measured on "
            f"{recorded_test}: it is not the run's data.",
            "pass --data with the data the run used (or --trust-metrics if this machine produced the directory).",
        )
    metric = result.baseline.get("metric_name")
    with tempfile.TemporaryDirectory(prefix="kfopt-remeasure-") as workdir:
        evaluator = Evaluator(
            dataset,
            baseline,
            workdir,
            latency_runs=REMEASURE_LATENCY_RUNS,
            **({"metric": metric} if metric else {}),
        )
        handle = ModelHandle(candidate.format, path=rundir.resolve_artifact(directory, candidate.artifact))
        measured = evaluator.evaluate(handle)
    wrong = _disagreements(candidate, measured, len(dataset.test), len(dataset.validation), objective)
    if wrong:
        raise KfoptError(
            f"Measured again on the test split of {_shown(spec)!r}, candidate '{_shown(candidate.recipe)}' has "
            + "; ".join(wrong)
            + f": {directory}/{rundir.METRICS_FILE} does not describe its model. Nothing was registered.",
            "re-run kfopt to get a true record (or pass --data if the run used other data).",
        )
    return measured


def _data_to_remeasure_on(result: RunResult, data: str | None) -> str:
    from .data import FROM_PYTHON_ARRAYS, FROM_PYTHON_DATASETS

    if data is not None:
        return data
    if result.data in (FROM_PYTHON_ARRAYS, FROM_PYTHON_DATASETS):
        raise KfoptError(
            "The run's data was passed from Python, so kfopt cannot load it again to re-measure the winner.",
            "pass --data (the same data as an .npz or py:module:function), "
            "or --trust-metrics if this machine produced the directory.",
        )
    if result.data.startswith("py:"):
        raise KfoptError(
            f"metrics.json names the data loader {_shown(result.data)!r}; kfopt runs no code a run directory names.",
            f"pass --data {shlex.quote(_shown(result.data))} to run that loader to re-measure the winner "
            "(or --trust-metrics if this machine produced the directory).",
        )
    return result.data


#: What select() and the gate decide on: left out of a record, the record is refused as well.
_DECIDING = ("size_bytes", "gzip_bytes", "accuracy", "accuracy_drop", "metric", "metric_drop")
_DECIDING += ("val_accuracy_drop", "val_metric_drop")


def _disagreements(recorded: Candidate, measured: dict, tests: int, validations: int, objective: str) -> list[str]:
    """What ``measured`` says differently from ``recorded``, each as "gzip_bytes 20480 (metrics.json: 100)"."""
    one_test, one_val = 1 / max(tests, 1), 1 / max(validations, 1)
    # A score may move by one sample (a tie broken otherwise on another machine); a drop by one on each side.
    scores = {
        **dict.fromkeys(("accuracy", "agreement", "metric"), one_test),
        **dict.fromkeys(("accuracy_drop", "metric_drop"), 2 * one_test),
        **dict.fromkeys(("val_accuracy", "val_metric"), one_val),
        **dict.fromkeys(("val_accuracy_drop", "val_metric_drop"), 2 * one_val),
        "sparsity": 1e-3,
    }
    wrong = []

    def check(key: str, ok) -> None:
        ours, theirs = measured.get(key), recorded.get(key)
        if ours is None or theirs is None and key not in _DECIDING:  # not measurable from the file, or no claim
            return
        if not isinstance(theirs, (int, float)) or not ok(float(ours), float(theirs)):
            wrong.append(f"{key} {float(ours):g} (metrics.json: {_shown(theirs)})")

    for key in ("size_bytes", "gzip_bytes", "params"):
        check(key, lambda a, b: a == b)
    for key, tolerance in scores.items():
        check(key, lambda a, b, t=tolerance: abs(a - b) <= max(t, 1e-3 * max(abs(a), abs(b))) + 1e-9)
    check("compression_ratio", lambda a, b: abs(a - b) <= 0.01 * abs(a))
    if objective_metric(objective) != "gzip_bytes":  # latency decides: a faked one would win
        check("latency_p50_ms", lambda a, b: a / LATENCY_FACTOR <= b <= a * LATENCY_FACTOR)
        check("speedup", lambda a, b: a / LATENCY_FACTOR <= b <= a * LATENCY_FACTOR)
    return wrong


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
    ours_on, theirs_on = challenger.get("test_digest"), champion.get("test_digest")
    if ours_on and theirs_on and ours_on != theirs_on:
        return False, (
            f"cannot compare with {name}: it was measured on other test data (test split {theirs_on}, this one "
            f"{ours_on}); a version counts against the champion only on the test data it was measured on"
        )
    metric, mine, its = _budgeted(challenger, champion)
    missing = [k for k, a, b in ((metric, mine, its), (key, ours, theirs)) if a is None or b is None]
    if missing:
        return False, f"cannot compare with {name}: {', '.join(missing)} missing"
    budget = str(Budget.parse(max_accuracy_drop))
    if worse_than_champion(mine, its, max_accuracy_drop=max_accuracy_drop, higher_is_better=_higher_is_better(metric)):
        return False, f"{metric} {mine:.4f} is more than {budget} {_worse(metric)} {name}'s {its:.4f}"
    if not ours < theirs:
        return False, f"{key} {ours:g} is not below {name}'s {theirs:g}"
    margin = _latency_margin(objective)
    if not ours * margin < theirs:  # timed in another run, maybe on another node: a small gain is noise
        return False, (
            f"{key} {ours:g} is not clearly below {name}'s {theirs:g}: latencies timed in different runs "
            f"count as different only beyond {MAX_TIE_WIDTH:.0%}"
        )
    return True, f"{key} {ours:g} < {name}'s {theirs:g}, {metric} {mine:.4f} vs {its:.4f} (budget {budget})"


def _latency_margin(objective: str) -> float:
    """How many times lower than the champion's the challenger's objective must be: 1 for size (exact), and
    for objectives with latency the widest tie of one selection (``MAX_TIE_WIDTH``), to the power 1 - W for
    ``mix:W``. A champion's latency was timed in an earlier run, in another process and maybe on another node,
    not interleaved with the challenger's, so a difference any smaller than that is not evidence."""
    if objective == "size":
        return 1.0
    weight = 0.0 if objective == "latency" else mix_weight(objective)
    return (1 + MAX_TIE_WIDTH) ** (1 - weight)


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
    the budget is never registered. The run's own selection in ``result`` is
    left as the run decided it.
    """
    selection = select(result.candidates, max_accuracy_drop=max_accuracy_drop, objective=objective)
    candidate: Candidate | None = result.candidate(selection.winner)
    if candidate is not None:  # a budget the metric cannot even lose gates nothing, against the champion least of all
        from .plugins.manager import registry

        metric = registry().metrics.get(candidate.metric_name or "accuracy")
        if metric is not None:
            check_budget(max_accuracy_drop, metric)
    if candidate is None:
        why = "; ".join(f"{label}: {reason}" for label, reason in selection.reasons.items())
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
    # MLflow resolves the ``models:/`` source of a new version against its default tracking URI.
    with rundir.tracking_uri(logger.uri):
        return _register(
            logger,
            candidate,
            name,
            max_accuracy_drop=max_accuracy_drop,
            objective=objective,
            baseline=result.baseline,
            test_digest=(result.splits or {}).get("test_digest"),
        )


def _register(
    logger: tracking.RunLogger,
    candidate: Candidate,
    name: str,
    *,
    max_accuracy_drop: float,
    objective: str,
    baseline: dict | None = None,
    test_digest: str | None = None,
) -> Registration:
    """Create (once) the version of ``name`` for the logged ``candidate``, set challenger, decide on champion.

    ``test_digest`` names the test data the candidate was measured on (tag ``kfopt.test_digest``).
    """
    winner = candidate.recipe
    logged = logger.logged(winner)
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
            **({"kfopt.test_digest": test_digest} if test_digest else {}),
        }
        version = client.create_model_version(
            name,
            source=f"models:/{logged['model_id']}",
            run_id=logged["run_id"],
            model_id=logged["model_id"],
            tags=tags,
            description=lineage.version_description(candidate, baseline or {}),
        )
    logger.state.setdefault("registered", {})[name] = str(version.version)
    logger.save()
    if "kfopt.decision" in version.tags:  # decided by an earlier attempt: report it again, change nothing
        return _summary(client, name, version.version)
    _set_alias(client, name, CHALLENGER, version.version)
    challenger = {**candidate.to_dict(), "test_digest": test_digest}
    promoted, reason, previous = _decide(
        client, name, str(version.version), challenger, max_accuracy_drop=max_accuracy_drop, objective=objective
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
    said = "promoted to champion" if promoted else "not promoted"
    client.update_model_version(name, version.version, f"{version.description or ''}\n{said}: {reason}"[:5000].strip())
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
    for key in ("metric_name", "test_digest"):
        if f"kfopt.{key}" in mv.tags:
            metrics[key] = mv.tags[f"kfopt.{key}"]
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
