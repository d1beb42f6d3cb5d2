"""Logging a kfopt run to MLflow: one parent run, one nested child run per candidate.

What has been logged is recorded in ``tracking.json`` in the run directory, per
tracking URI and experiment, so an attempt that stopped half-way (MLflow was
down) resumes with ``kfopt promote --from DIR`` without logging anything twice.
MLflow is imported only when something is logged.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import redirect_stdout
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import __version__, lineage
from .errors import KfoptError
from .mlflow_model import Examples, logged_model_name
from .result import Candidate, RunResult
from .rundir import (
    BASELINE_DIR,
    METRICS_FILE,
    REPORT_FILE,
    TRACKING_FILE,
    jsonable,
    resolve_artifact,
    tracking_uri,
    write_json,
)

#: Numeric metrics of the vocabulary (DESIGN.md) logged on each candidate's run.
METRICS = (
    "accuracy",
    "accuracy_drop",
    "agreement",
    # The budgeted metric of the task (its name is metric_name in candidate.json): accuracy, mae, ...
    "metric",
    "metric_drop",
    "metric_drop_relative",
    "val_metric",
    "val_metric_drop",
    "size_bytes",
    "gzip_bytes",
    "compression_ratio",
    "sparsity",
    "params",
    "flops",
    "latency_p50_ms",
    "latency_p95_ms",
    "throughput_per_s",
    "speedup",
    "speedup_low",
    "speedup_high",
)
#: kfopt's defaults for MLflow's own HTTP retry settings (each can be overridden in the
#: environment): a few retries with exponential backoff ride out a restarting server
#: (connection errors, 429 and 5xx) without leaving a user waiting minutes on a dead one.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
RUN_STATUS = {"ok": "FINISHED", "skipped": "FINISHED", "failed": "FAILED"}
#: A candidate's recipe on its run, as a file ``kfopt optimize --recipe`` takes.
RECIPE_FILE = "recipe.yaml"
#: The LoggedModel name of the baseline on the parent run (candidates are named after their recipes).
BASELINE_MODEL_NAME = "baseline"


class TrackingFailed(KfoptError):
    """MLflow could not be reached or refused a request; results stay on disk."""

    exit_code = 3


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the current directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_uri(uri: str) -> None:
    """Fail before any work when MLflow would not know what to do with ``uri``."""
    try:  # the registry MLflow itself picks a store from, including stores added by MLflow plugins
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as stores
    except ImportError:  # a future MLflow moved it: MLflow will say so itself on first use
        stores = None
    try:
        if stores is not None:
            stores.get_store_builder(uri)
    except Exception:
        schemes = sorted(s for s in getattr(stores, "_registry", {}) if s)
        raise KfoptError(
            f"Unexpected URI scheme in tracking URI '{uri}'. Valid schemes are: {', '.join(schemes)}.",
            "pass e.g. --tracking-uri http://localhost:5000 or sqlite:///mlflow.db (or set MLFLOW_TRACKING_URI).",
        ) from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise KfoptError(
                f"The folder of the SQLite tracking store '{uri}' does not exist.",
                f"create {folder} first, or pass another --tracking-uri.",
            )


def failure(uri: str, exc: BaseException, directory: str | os.PathLike) -> TrackingFailed:
    """The one line a user sees when MLflow failed, and the command that finishes the job."""
    return TrackingFailed(
        f"MLflow tracking at {uri} failed: {short_reason(exc)}.",
        f"check the server (or --tracking-uri / MLFLOW_TRACKING_URI), then run "
        f"`kfopt promote --from {directory}`: it resumes where this stopped.",
    )


def short_reason(exc: BaseException) -> str:
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def mlflow_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "MLflow failed" rather than "kfopt has a bug"."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


#: Fields of the records that are decisions or places, not measurements: they may change
#: (another budget, a moved directory) while the run stays the same run.
_NOT_MEASURED = ("artifact", "within_budget", "not_selected_because")


def _decided(result: RunResult) -> str:
    """A fingerprint of what a run decided from its measurements: the winner and how it was selected."""
    import hashlib

    decision = json.dumps({"winner": result.winner, "selection": result.selection}, sort_keys=True, default=jsonable)
    return hashlib.sha256(decision.encode()).hexdigest()[:16]


def run_key(result: RunResult) -> str:
    """A fingerprint of what a run measured: model, data, seed, the baseline and every candidate,
    with the sha256 of each model file (not its path, nor the winner or budget decided from them).

    ``tracking.json`` is keyed by it, so a new run into the same directory (or a
    copied tracking.json) is never taken for the run that wrote it; tagged on the
    parent run, it finds an earlier attempt's runs when ``tracking.json`` is gone,
    e.g. when a pipeline retries promotion in a fresh pod.
    """
    import hashlib

    data = result.to_dict()
    records = [data["baseline"], *data["candidates"]]
    content = {
        **{k: data.get(k) for k in ("model", "data", "seed")},
        "records": [{k: v for k, v in record.items() if k not in _NOT_MEASURED} for record in records],
    }
    normal = json.dumps(json.loads(json.dumps(content, default=jsonable)), sort_keys=True)
    return hashlib.sha256(normal.encode()).hexdigest()[:32]


def _versions() -> dict[str, str]:
    def of(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    return {"kfopt_version": __version__, "tensorflow_version": of("tensorflow"), "tf_keras_version": of("tf-keras")}


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 6000 else text[:5997] + "..."


def candidate_params(candidate: Candidate, result: RunResult | dict) -> dict[str, str]:
    """Params of a candidate's run: recipe, every step's config, versions, seed."""
    params = {
        "recipe": candidate.recipe,
        "steps": _param(candidate.steps),
        "seed": str(result.get("seed", 0)),
        "model": str(result.get("model")),
        "data": str(result.get("data")),
        **_versions(),
    }
    for index, step in enumerate(candidate.steps, start=1):
        params[f"step{index}.technique"] = step["technique"]
        for key, value in step.get("config", {}).items():
            params[f"step{index}.{step['technique']}.{key}"] = _param(value)
    return params


def numeric_metrics(row: dict, prefix: str = "") -> dict[str, float]:
    """The vocabulary's numeric metrics in ``row`` (None and non-numbers skipped)."""
    return {
        prefix + k: float(row[k])
        for k in METRICS
        if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
    }


class RunLogger:
    """Logs one run directory to one MLflow experiment, resuming from ``tracking.json``."""

    def __init__(self, directory: str | os.PathLike, uri: str, experiment: str):
        from mlflow import MlflowClient

        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.directory = Path(directory)
        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        path = self.directory / TRACKING_FILE
        try:
            self._file = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            raise KfoptError(
                f"'{path}' is not valid JSON.",
                f"delete it and run `kfopt promote --from {self.directory}` again: "
                "runs logged before are found again in MLflow.",
            ) from None
        key = f"{uri} {experiment}"
        # What this file says was logged is only believed for the run it was written for (see log_result).
        self._inherited = key in self._file
        self.state = self._file.setdefault(key, {"uri": uri, "experiment": experiment, "candidates": {}})
        self._run_data: lineage.RunData | None = None

    def save(self) -> None:
        write_json(self.directory / TRACKING_FILE, self._file)

    # -- the experiment and the parent run ---------------------------------
    def experiment_id(self) -> str:
        if "experiment_id" not in self.state:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                location = None
                if self.uri.startswith("sqlite:///"):
                    # Next to the database, not in whatever directory this process runs in
                    # (MLflow's default, ./mlruns, scatters artifacts across working directories).
                    location = (Path(self.uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
                try:
                    self.client.create_experiment(self.experiment, artifact_location=location)
                except MlflowException as exc:  # created meanwhile by a concurrent run
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                found = self.client.get_experiment_by_name(self.experiment)
            if found.lifecycle_stage == "deleted":
                raise KfoptError(
                    f"MLflow experiment '{self.experiment}' is deleted.",
                    f"restore it (`mlflow experiments restore --experiment-id {found.experiment_id}`) "
                    "or pass another --experiment.",
                )
            self.state["experiment_id"] = found.experiment_id
            self.save()
        return self.state["experiment_id"]

    def start(self, run: dict, key: str | None = None) -> str:
        """Create the parent run (once); return its id. ``key`` is the results' run_key, when known."""
        if self.state.get("parent_run_id"):
            return self.state["parent_run_id"]
        tags = {
            "kfopt.out": str(self.directory.resolve()),
            "kfopt.model": str(run.get("model")),
            "kfopt.data": str(run.get("data")),
            "kfopt.version": __version__,
            **lineage.kfp_tags(),
            **({"kfopt.run_key": key} if key else {}),
        }
        model = str(run.get("model"))
        name = f"kfopt {Path(model.rstrip('/')).name or model} ({self.directory.name})"  # the model tells runs apart
        parent = self.client.create_run(self.experiment_id(), run_name=name, tags=tags)
        run_id = parent.info.run_id
        self.state.update(parent_run_id=run_id, finished=False)
        self.save()
        self._log_datasets(run_id, run)
        params = {
            "model": str(run.get("model")),
            "data": str(run.get("data")),
            "seed": str(run.get("seed", 0)),
            "recipes": _param(run.get("recipes", [])),
            **_versions(),
        }
        self._log_batch(run_id, params=params)
        return run_id

    def finish(self, result: RunResult) -> None:
        """Log the baseline, metrics.json and the report on the parent run and close it (once).

        A parent run an earlier attempt finished is taken over as it is, unless that attempt decided otherwise
        (another budget or objective picked another winner, over the same measured candidates): then its
        winner, metrics.json and report are logged again, so MLflow never shows an outcome the run no longer has.
        """
        run_id = self.start(result)
        decided = _decided(result)
        if self.state.get("finished"):
            if self.client.get_run(run_id).data.tags.get("kfopt.decided") not in (None, decided):
                tags = {"kfopt.winner": str(result.winner), "kfopt.decided": decided, **lineage.kfp_tags()}
                for key, value in tags.items():
                    self.client.set_tag(run_id, key, value)
                self.client.log_dict(run_id, result.to_dict(), METRICS_FILE)
                self._log_report(run_id, result)
            return
        self.client.set_tag(run_id, "kfopt.decided", decided)
        self._log_batch(run_id, metrics=numeric_metrics(result.baseline, prefix="baseline_"))
        self.client.set_tag(run_id, "kfopt.winner", str(result.winner))
        self.client.set_tag(run_id, "kfopt.run_key", run_key(result))
        stopped = (result.search or {}).get("stopped")
        if stopped:
            self.client.set_tag(run_id, "kfopt.search_stopped", _param(stopped))
        self.client.log_dict(run_id, result.baseline.to_dict(), "baseline.json")
        self.client.log_dict(run_id, result.to_dict(), METRICS_FILE)
        self._log_baseline_model(run_id, result)
        self._log_report(run_id, result)
        self._terminate(run_id, "FINISHED")
        self.state["finished"] = True
        self.save()

    def _log_report(self, run_id: str, result: dict) -> None:
        """The HTML report, its Pareto plots as PNG files, and the search trace and layer sensitivity as JSON.

        Logging again overwrites the same files, so a retry after a half-finished attempt logs nothing twice.
        (Not ``MlflowClient.log_table``: it appends to an existing table, so a retry would double the rows.)
        """
        import tempfile

        from .html_report import pareto_plots, render_html

        plots = pareto_plots(result)
        with tempfile.TemporaryDirectory() as folder:
            for name, png in plots.items():
                Path(folder, name).write_bytes(png)
            Path(folder, REPORT_FILE).write_text(render_html(result, plots), encoding="utf-8")
            self.client.log_artifacts(run_id, folder)
        for key in ("search_trace", "layer_sensitivity"):
            if result.get(key):
                self.client.log_dict(run_id, result[key], f"{key}.json")

    def log_result(self, result: RunResult | dict) -> None:
        """Log everything in ``result`` that is not logged yet (what ``promote --from`` does)."""
        result = RunResult.of(result)
        key = run_key(result)
        if (self._inherited or self.state.get("run_key")) and self.state.get("run_key") != key:
            # tracking.json was written for another run (an earlier run into this directory, a copied
            # file): nothing it says was logged is this run's. Runs this run did log are found by key.
            self._reset()
        elif self.state.get("parent_run_id") and not self._exists(self.state["parent_run_id"]):
            # The store was reset since (a new database at the same URI): log afresh.
            self._reset()
        self.state["run_key"] = key
        if not self.state.get("parent_run_id"):
            self._adopt(key)
        recipes = [c.recipe for c in result.candidates]
        self.start({**result.to_dict(), "recipes": recipes}, key=key)
        for candidate in result.candidates:
            self.log_candidate(candidate, result)
        self.finish(result)

    def _reset(self) -> None:
        self.state.clear()
        self.state.update(uri=self.uri, experiment=self.experiment, candidates={})

    def _adopt(self, key: str) -> None:
        """Take over the runs an earlier attempt logged for the same results (found by ``run_key``)."""
        experiment_id = self.experiment_id()
        parents = self.client.search_runs(
            [experiment_id], f"tags.`kfopt.run_key` = '{key}'", order_by=["attributes.start_time ASC"], max_results=1
        )
        if not parents:
            return
        parent = parents[0]
        self.state.update(parent_run_id=parent.info.run_id, finished=parent.info.status == "FINISHED")
        children = self.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        for child in children:
            tags = child.data.tags
            if tags.get("kfopt.logged") == "true" and tags.get("kfopt.recipe"):
                model_id = tags.get("kfopt.model_id") or None
                self.state["candidates"][tags["kfopt.recipe"]] = {
                    "run_id": child.info.run_id,
                    "complete": True,
                    "model_id": model_id,
                    "model_uri": f"models:/{model_id}" if model_id else None,
                }
            elif child.info.status == "RUNNING":  # that attempt stopped half-way through this candidate
                self._terminate(child.info.run_id, "KILLED")
        self.save()

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    # -- candidates ---------------------------------------------------------
    def logged(self, recipe: str) -> dict | None:
        """What was logged for the candidate ``recipe``: run_id, model_id, model_uri (None if not complete)."""
        entry = self.state["candidates"].get(recipe)
        return entry if entry and entry.get("complete") else None

    def log_candidate(self, candidate: Candidate, result: RunResult | dict) -> dict:
        """One child run: params, metrics, the model (as an MLflow model and as the raw file), candidate.json."""
        label = candidate.recipe
        if self.logged(label):
            return self.logged(label)
        parent_id = self.start(result)
        stale = self.state["candidates"].get(label)
        if stale:  # an earlier attempt stopped half-way: close that run, log afresh
            try:
                self._terminate(stale["run_id"], "KILLED")
            except Exception:
                pass
        status = candidate.status
        tags = {
            "mlflow.parentRunId": parent_id,
            "kfopt.recipe": label,
            "kfopt.status": status,
            "kfopt.format": str(candidate.format),
            "kfopt.version": __version__,
            **lineage.plugin_versions(candidate.steps),
            **lineage.kfp_tags(),
        }
        if candidate.reason:
            tags["kfopt.reason"] = _param(candidate.reason)
        run_id = self.client.create_run(self.experiment_id(), run_name=label, tags=tags).info.run_id
        entry = self.state["candidates"][label] = {"run_id": run_id, "complete": False}
        self.save()
        self._log_batch(run_id, params=candidate_params(candidate, result), metrics=numeric_metrics(candidate))
        self.client.log_dict(
            run_id, {k: v for k, v in candidate.to_dict().items() if k != "traceback"}, "candidate.json"
        )
        if candidate.steps:
            self.client.log_text(run_id, lineage.recipe_yaml(label, candidate.steps), RECIPE_FILE)
        self._log_datasets(run_id, result)
        if status == "ok" and candidate.artifact:
            # Inside the run directory, and (once metrics.json recorded it) the very file measured.
            path = resolve_artifact(self.directory, candidate.artifact, candidate.artifact_sha256)
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), f"candidate/{path.name}")
            else:
                self.client.log_artifact(run_id, str(path), "candidate")
            threads = int((candidate.info or {}).get("threads") or 1)
            info = self._log_model(run_id, candidate.format, path, logged_model_name(label), result, threads)
            entry.update(model_id=info.model_id, model_uri=info.model_uri)
            self.client.set_tag(run_id, "kfopt.model_id", info.model_id)
        self.client.set_tag(run_id, "kfopt.logged", "true")  # complete: a later attempt may adopt this run
        self._terminate(run_id, RUN_STATUS.get(status, "FINISHED"))
        entry["complete"] = True
        self.save()
        return entry

    def _log_model(self, run_id: str, format: str, path: Path, name: str, run, threads: int = 1):
        """Log a model file as an MLflow model that serves without kfopt (see :mod:`kfopt.mlflow_model`),
        with a few real test rows of the run's data as its input example."""
        from .mlflow_model import log_model

        data = self.run_data(run).data
        examples = Examples.of(data.test.arrays()[0]) if data is not None else None
        with tracking_uri(self.uri):
            return log_model(run_id, format, path, name=name, examples=examples, threads=threads)

    def _log_baseline_model(self, run_id: str, result: RunResult) -> None:
        """The baseline as a LoggedModel named ``baseline`` on the parent run (once): what candidates are compared with."""
        if self.state.get("baseline_model_id") or not result.baseline.artifact:
            return
        path = resolve_artifact(self.directory, result.baseline.artifact, result.baseline.artifact_sha256)
        format = "saved_model" if path.is_dir() and not (path / "keras_metadata.pb").exists() else "keras"
        info = self._log_model(run_id, format, path, BASELINE_MODEL_NAME, result)
        self.client.set_tag(run_id, "kfopt.baseline_model_id", info.model_id)
        self.state["baseline_model_id"] = info.model_id
        self.save()

    # -- the data --------------------------------------------------------------
    def run_data(self, run) -> lineage.RunData:
        """The run's data, read again once per logger (see :func:`kfopt.lineage.load_run_data`)."""
        if self._run_data is None:
            from .plugins.technique import ARTIFACT_NAMES

            directory = self.directory
            baseline = (run.get("baseline") or {}).get("artifact") if hasattr(run, "get") else None
            if baseline is None:  # a run still going (the observer logs as candidates finish): its baseline folder
                found = [directory / BASELINE_DIR / name for name in ARTIFACT_NAMES.values()]
                baseline = next((p for p in found if p.exists()), None)
            self._run_data = lineage.load_run_data(
                str(run.get("model")), str(run.get("data")), int(run.get("seed") or 0), baseline
            )
        return self._run_data

    def _log_datasets(self, run_id: str, run) -> None:
        """The run's train, validation and test splits as MLflow dataset inputs (or a tag saying why not)."""
        found = self.run_data(run)
        if found.data is None:
            self.client.set_tag(run_id, "kfopt.datasets", f"not logged: {found.why_not}")
            return
        self.client.log_inputs(run_id, datasets=lineage.dataset_inputs(found.data, str(run.get("data"))))

    def _terminate(self, run_id: str, status: str) -> None:
        with redirect_stdout(sys.stderr):  # MLflow prints the run's URL on stdout; keep stdout for --json
            self.client.set_terminated(run_id, status)

    def _log_batch(self, run_id: str, params: dict | None = None, metrics: dict | None = None) -> None:
        import time

        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in (params or {}).items()],
            metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()],
        )
