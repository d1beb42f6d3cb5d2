"""Running the pipeline: on this machine through ``kfp.local``, or on a Kubeflow cluster through ``kfp.Client``.

Locally every step is a subprocess of the current Python (``SubprocessRunner(use_venv=False)``),
so it uses the kfopt installed here and installs nothing. kfp.local's own
chatter and each step's output go to ``OUT/pipeline.log``; the terminal gets one
line per finished step, picked from that output as it comes. What a run
produced and the error it raises come from files only: the select step's
``metrics.json`` and every step's ``status`` output (:mod:`kfopt.components.status`).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

from kfopt.components.status import CANDIDATE_LINE, ROUND_LINE, StepStatus, read_statuses
from kfopt.errors import KfoptError
from kfopt.result import RunResult, Tracking
from kfopt.rundir import METRICS_FILE, REPORT_FILE, clear_run, locked, writable_dir

LOG_FILE = "pipeline.log"
#: Where kfp.local keeps its cache entries (they point at artifacts of earlier runs under pipeline-root/).
CACHE_DIR = "pipeline-cache"
#: Where a pod of a Kubeflow cluster finds its service-account token for the KFP API.
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"

# Progress only: kfp.local's line when a task ends (the other progress lines are kfopt's own, see
# kfopt.components.status). Nothing a run returns or raises is read from the log.
_TASK_LINE = re.compile(r"Task .*'(?P<task>[^']+)'.* finished with status .*(?P<status>SUCCESS|FAILURE)")
#: kfp.local's line when a task's outputs come from its cache (an earlier run into the same --out).
_CACHED_LINE = re.compile(r"Task (?P<task>\S+) cache hit")
#: Steps that run once per recipe: their progress is the candidate line, not the task line.
_PER_RECIPE = re.compile(r"^(optimize|optimize-group|evaluate)(-\d+)?$")
#: A Kubernetes object name (DNS-1123 subdomain), like the Secret --mlflow-secret names.
_K8S_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


#: `kfopt run` without --rounds: refinement rounds compiled into the pipeline, run while a round gains (KFP has no
#: loops of unknown length, so the cap is fixed; a stopped round is a no-op step).
RUN_ROUNDS = 3


def run_local(
    recipes=None,
    *,
    model: str = "demo:mlp",
    data: str = "digits",
    max_accuracy_drop: float | str = 0.01,
    objective: str = "size",
    metric: str | None = None,
    output: str | int | None = None,
    registered_model: str = "",
    tracking_uri: str = "",
    experiment: str = "kfopt",
    out: str | os.PathLike = "runs/pipeline",
    seed: int = 0,
    epochs: int = 40,
    unsafe: bool = False,
    parallelism: int = 2,
    rounds: int = 1,
    max_trials: int = 4,
    max_time: float | None = None,
    target: float | None = None,
    stop_when_met: bool = False,
    sensitivity: float = 0.9,
    until_no_gain: bool = False,
    channels: bool | None = None,
    group_post_training: bool = True,
    cache: bool = True,
    progress=None,
    registry=None,
) -> RunResult:
    """Run the whole pipeline on this machine through kfp.local and return the run record.

    Returns the last select step's :class:`~kfopt.result.RunResult` with
    ``registered_model`` and ``tracking`` (what the promote step recorded),
    ``report`` (path of the HTML report), ``results`` (the self-contained
    results folder), ``log`` and ``seconds``. Also writes
    ``OUT/metrics.json`` and ``OUT/report.html``. ``rounds`` refinement rounds
    follow round 1, bounded by ``max_trials``, ``max_time``, ``target`` and
    ``stop_when_met`` as in ``kfopt search``; with ``until_no_gain`` they stop
    once a round does not gain, ``rounds`` being the most. ``channels``: round-1
    channel pruning for latency/mix on a conv model (None: with the built-in
    search space, see :func:`build_pipeline`). ``max_accuracy_drop`` is absolute
    (0.01) or relative to the baseline's metric ("1%"); ``output`` names the
    output (or its index) the metric is computed on. With ``cache`` a re-run
    into the same ``out`` reuses the steps whose inputs did not change (the
    model's and data's content included, see
    :mod:`kfopt.components.fingerprint`); promotion always runs. Raises KfoptError for bad
    input, before any work where it can, and when a step the run cannot do
    without (prepare, select) fails.
    """
    from kfopt.recipe_search import search_settings
    from kfopt.select import budget_value

    from .optimize_and_promote import build_pipeline

    search_settings(
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
        target=target,
        stop_when_met=stop_when_met,
    )
    if rounds:
        from kfopt.components.steps import check_sensitivity

        check_sensitivity(sensitivity)  # its step runs beside round 1: a bad value fails now, not after it
    if model.startswith("demo:"):
        from kfopt.models import DEMO_MODELS

        if model not in DEMO_MODELS:
            raise KfoptError(f"Unknown demo model '{model}'.", f"use one of {', '.join(DEMO_MODELS)}.")
    elif "://" not in model and not Path(model).exists():
        raise KfoptError(
            f"Model '{model}' does not exist.",
            "pass a .keras/.h5 file, a SavedModel directory, or demo:mlp / demo:cnn.",
        )
    if tracking_uri:
        from kfopt.tracking import check_uri

        check_uri(tracking_uri)  # a URI MLflow cannot use fails now, not after every recipe has run
    with locked(Path(out).resolve(), "kfopt run", fresh=True, inputs=(model, data)) as out:
        clear_run(out)  # the steps load the model and data, so a wrong one shows only once the pipeline runs
        # No retries here: MLflow's client already retries HTTP calls, and a local
        # store that failed once fails again; `kfopt promote --from` finishes the job.
        pipeline = build_pipeline(
            recipes,
            rounds=rounds,
            until_no_gain=until_no_gain,
            channels=channels,
            parallelism=parallelism,
            group_post_training=group_post_training,
            promote_retries=0,
            step_retries=0,
            registry=registry,
        )
        root = writable_dir(out / "pipeline-root")
        log_path = out / LOG_FILE
        (out / REPORT_FILE).unlink(missing_ok=True)  # never show an earlier run's report as this one's
        before = set(root.iterdir())
        started = time.perf_counter()
        with open(log_path, "w") as log, _quiet_kfp(log, progress):
            from kfp import local

            local.init(
                runner=local.SubprocessRunner(use_venv=False),
                pipeline_root=str(root),
                raise_on_error=False,
                enable_caching=cache,
                cache_root=str(out / CACHE_DIR),
            )
            task = pipeline(
                model=model,
                data=data,
                max_accuracy_drop=str(budget_value(max_accuracy_drop)),
                objective=objective,
                metric=metric or "",
                output="" if output is None else str(output),
                registered_model=registered_model,
                tracking_uri=tracking_uri,
                experiment=experiment,
                seed=seed,
                epochs=epochs,
                unsafe=unsafe,
                max_trials=max_trials,
                max_time=max_time or 0.0,
                target=target or 0.0,
                stop_when_met=stop_when_met,
                sensitivity=float(sensitivity),
            )
        seconds = round(time.perf_counter() - started, 1)
        run_dir = _new_run_dir(root, before)
        statuses = read_statuses(run_dir)
        results_dir = _output_dir(task, "results", _last_select(run_dir))
        if results_dir is None or not (results_dir / METRICS_FILE).is_file():
            raise _failure(statuses, run_dir, log_path)
        result = RunResult.load(results_dir)
        _record_registration(result, statuses, tracking_uri)
        report = _output_dir(task, "report", run_dir / "report" / "report")
        if report is not None and report.is_file():
            shutil.copyfile(report, out / REPORT_FILE)
            result.report = str(out / REPORT_FILE)
        result.results, result.log, result.seconds = str(results_dir), str(log_path), seconds
        result.save(out)
        return result


@contextlib.contextmanager
def _quiet_kfp(log, progress):
    """Send kfp.local's output (and every step's) to ``log``; pass one line per finished step to ``progress``."""

    lock = threading.Lock()

    class Tee(io.TextIOBase):
        """kfp.local writes from several threads (one per parallel step)."""

        def __init__(self):
            self._buffer = ""

        def write(self, text):
            with lock:
                log.write(text)
                self._buffer += text
                *lines, self._buffer = self._buffer.split("\n")
            for line in lines:
                self._progress(_strip_ansi(line))
            return len(text)

        def _progress(self, line):
            if progress is None:
                return
            task, candidate, round_line = _TASK_LINE.search(line), CANDIDATE_LINE.match(line), ROUND_LINE.match(line)
            cached = _CACHED_LINE.search(line)
            if cached:
                progress(f"{cached['task']}: cached (an earlier run's outputs; --no-cache runs it anew)")
            elif round_line:
                progress(round_line["line"][:250])
            elif candidate:
                reason = f" ({candidate['reason'][:400]})" if candidate["reason"] else ""
                progress(f"{candidate['label']}: {candidate['status']}{reason}")
            elif task and (task["status"] == "FAILURE" or not _PER_RECIPE.match(task["task"])):
                progress(f"{task['task']}: {task['status'].lower()}")

        def flush(self):
            with lock:
                log.flush()

    with warnings.catch_warnings():
        # The component image is for the cluster; locally the steps run in this Python on purpose.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        print_ = builtins.print
        try:
            with contextlib.redirect_stdout(Tee()):
                yield
        finally:
            # kfp.local indents step output by swapping builtins.print; with steps
            # running in parallel threads the swaps interleave and may not be undone.
            builtins.print = print_


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _new_run_dir(root: Path, before: set) -> Path:
    created = [p for p in root.iterdir() if p not in before and p.is_dir()]
    if not created:
        raise KfoptError(f"kfp.local did not create a run folder under '{root}'.", "see the log for what went wrong.")
    return max(created, key=lambda p: p.stat().st_mtime)


def _last_select(run_dir: Path) -> Path:
    """Where kfp.local keeps the results of the last select step that ran (select, select-2, ...)."""
    found = sorted(
        (p for p in run_dir.glob("select*/results") if (p / METRICS_FILE).is_file()),
        key=lambda p: (p / METRICS_FILE).stat().st_mtime,
    )
    return found[-1] if found else run_dir / "select" / "results"


def _output_dir(task, name: str, fallback: Path) -> Path | None:
    """An output artifact's path from the pipeline's outputs, or where kfp.local keeps it when the run failed."""
    try:
        artifact = task.outputs[name]
        return Path(artifact.path)
    except Exception:  # a failed run has no outputs
        return fallback if fallback.exists() else None


def _record_registration(result: RunResult, statuses: list[StepStatus], tracking_uri: str) -> None:
    """Put what the promote step recorded into ``result``: ``registered_model`` and ``tracking`` (status, error)."""
    promote = next((s for s in reversed(statuses) if s.step == "promote"), None)
    if promote is not None and promote.tracking is not None:
        result.registered_model, result.tracking = promote.registered_model, promote.tracking
        return
    # The step failed before it knew what to ask MLflow, died without a word, or never ran.
    from kfopt.tracking import resolve_uri

    asked = result.tracking or Tracking(status="failed")  # what the step recorded in metrics.json, if it started
    error = (promote.error if promote else None) or asked.error or "the promote step did not run (see the log)"
    result.registered_model = None
    result.tracking = asked.model_copy(
        update={"status": "failed", "error": error, "uri": asked.uri or resolve_uri(tracking_uri or None)}
    )


def _failure(statuses: list[StepStatus], run_dir: Path, log_path: Path) -> KfoptError:
    """The error of a run that produced no results: the failed step's own KfoptError when it raised one."""
    failed = [s for s in statuses if s.failed]
    for status in failed:
        if status.user_error:
            return KfoptError(status.error, status.fix or f"see {log_path}.")
    if failed:
        first = failed[0]
        where = f"step '{first.step}'" + (f" (recipe {first.recipe})" if first.recipe else "")
        what = f"{where} failed ({first.error})"
    else:
        what = "the pipeline produced no results"
    return KfoptError(
        f"The local pipeline run failed: {what}.", f"see {log_path} and the step folders under {run_dir}."
    )


# -- a Kubeflow cluster ----------------------------------------------------------------
def compile_for_cluster(
    output,
    *,
    search=None,
    rounds: int = 1,
    image: str | None = None,
    accelerator_image: str | None = None,
    placement: str | os.PathLike | None = None,
    parallelism: int = 0,
    mlflow_secret: str | None = None,
    step_retries: int | None = None,
) -> dict:
    """Compile the pipeline with node-pool placement; return a summary (and a one-paragraph ``description``).

    Step containers run as the image's non-root user; with ``mlflow_secret`` the steps that talk to
    MLflow log in with that Kubernetes Secret's ``username`` and ``password``. ``step_retries``:
    retries of every optimize and evaluate step (None: the pipeline's default, for preemptible nodes).
    """
    from kfopt.components import DEFAULT_IMAGE
    from kfopt.recipe_search import load_search, split_by_pool

    from .optimize_and_promote import STEP_RETRIES, STEP_USER, compile_pipeline, is_built_in, post_training_groups
    from .placement import load_placement

    if mlflow_secret is not None and not _K8S_NAME.fullmatch(mlflow_secret):
        raise KfoptError(
            f"--mlflow-secret '{mlflow_secret}' is not a Kubernetes Secret name.",
            "use lowercase letters, digits, '-' and '.' (at most 253), e.g. mlflow-login.",
        )

    recipes = load_search(search)
    pools = load_placement(placement)
    output = Path(output)
    if output.parent and not output.parent.is_dir():
        raise KfoptError(f"The folder of --output '{output}' does not exist.", f"create {output.parent} first.")
    compile_pipeline(
        output,
        recipes,
        rounds=rounds,
        image=image or DEFAULT_IMAGE,
        accelerator_image=accelerator_image,
        placement=pools,
        parallelism=parallelism,
        mlflow_secret=mlflow_secret,
        run_as_user=STEP_USER,
        **({"step_retries": step_retries} if step_retries is not None else {}),
    )
    training, post_training = split_by_pool(recipes)
    accelerator = pools.accelerator.accelerator if pools.accelerator else None
    pool = (
        f"accelerator pool ({accelerator.count} x {accelerator.type})"
        if accelerator
        else "CPU pool (the placement has no accelerator pool)"
    )
    lines = [
        f"Wrote {output} ({len(recipes)} recipes; placement {pools.source}; image {image or DEFAULT_IMAGE}"
        + (f", fine-tuning image {accelerator_image}" if accelerator_image else "")
        + ")",
        f"  {len(training)} fine-tuning on the {pool}: " + (", ".join(r.label for r in training) or "none"),
        f"  {len(post_training)} post-training on the CPU pool"
        + (f" in {len(post_training_groups(post_training, parallelism))} grouped step(s)" if post_training else "")
        + ": "
        + (", ".join(r.label for r in post_training) or "none"),
        f"  {rounds} refinement round{'s' if rounds != 1 else ''} after round 1"
        + (f", proposed recipes on the {pool}" if rounds else ""),
        *(
            ["  round 1 also channel pruning for objective latency or mix on a conv model (decided at run time)"]
            if is_built_in(recipes)
            else []
        ),
        f"  optimize and evaluate steps retried up to {STEP_RETRIES if step_retries is None else step_retries} "
        "times (backoff from 60 s)",
        f"  steps run as uid {STEP_USER} (non-root); MLflow login: "
        + (f"Secret {mlflow_secret} (username, password)" if mlflow_secret else "none (--mlflow-secret)"),
    ]
    description = "\n".join(lines)
    return {
        "output": str(output),
        "recipes": [r.label for r in recipes],
        "accelerator_recipes": [r.label for r in training],
        "cpu_recipes": [r.label for r in post_training],
        "rounds": rounds,
        "placement": pools.source,
        "mlflow_secret": mlflow_secret,
        "description": description,
    }


def default_token() -> str | None:
    """The in-cluster service-account token for the KFP API, when this runs in a Kubeflow pod."""
    path = Path(os.environ.get(SA_TOKEN_ENV, SA_TOKEN_PATH))
    return path.read_text().strip() if path.is_file() else None


def submit(
    package: str | os.PathLike,
    *,
    host: str,
    arguments: dict,
    namespace: str | None = None,
    experiment: str = "kfopt",
    run_name: str | None = None,
    token: str | None = None,
    cache: bool = True,
) -> dict:
    """Upload a compiled pipeline and start a run; return ``run_id`` and ``url``.

    ``cache=False`` runs every step anew (KFP's ``enable_caching=False`` for the run); else each
    step caches as the pipeline says (everything but the fingerprint and promote steps).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import kfp

        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or default_token())
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
                enable_caching=None if cache else False,
            )
        except Exception as exc:  # connection refused, 401/403, a namespace that does not exist...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KfoptError(
                f"Kubeflow Pipelines at {host} refused the run ({type(exc).__name__}: {first[:300]}).",
                "check --host (the KFP API endpoint), --namespace and --token.",
            ) from None
    return {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


#: How ``publish`` marks the version a package was uploaded as, in the version's description (a
#: pipeline's first version is named after the pipeline, so its name cannot say which version it is).
_VERSION_MARK = "[kfopt version {}]"


def package_version(package: str | os.PathLike) -> str:
    """The default version name of a compiled pipeline: a hash of its content (the same package, the same name)."""
    import hashlib

    return "sha256-" + hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]


def publish(
    package: str | os.PathLike,
    *,
    host: str,
    name: str,
    version: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    description: str | None = None,
) -> dict:
    """Upload a compiled pipeline to Kubeflow Pipelines as pipeline ``name``; idempotent.

    A new name is uploaded as a new pipeline (its first version); an existing
    one gets a new version called ``version`` (default: :func:`package_version`,
    a hash of the package, so re-publishing the same package changes nothing).
    If that version already exists nothing is uploaded.

    Returns ``action`` (``created``, ``new-version`` or ``unchanged``),
    ``pipeline_id``, ``version_id``, ``version``, ``name`` and ``url``.
    Raises KfoptError for bad arguments and for anything the KFP API refuses
    (unreachable, 401/403, a name that is not unique...).
    """
    package = Path(package)
    if not host.startswith(("http://", "https://")):
        raise KfoptError(f"--host '{host}' is not an http(s) URL.", "pass e.g. https://kubeflow.example.com/pipeline.")
    if not name or not name.strip():
        raise KfoptError("--name is empty.", "pass the pipeline name to show in the KFP UI, e.g. kfopt.")
    if version is not None and not version.strip():
        raise KfoptError("--version is empty.", "leave it out to name the version after the package's content hash.")
    _check_package(package)
    version = version or package_version(package)
    mark = _VERSION_MARK.format(version)
    from kfopt import __version__

    text = f"{description or 'Compiled by kfopt'} (kfopt {__version__}) {mark}"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # kfp prints "Pipeline details: ..."
        warnings.simplefilter("ignore", FutureWarning)
        import kfp

        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or default_token())
            pipeline_id = _pipeline_id(client, name, namespace)
            if pipeline_id is None:
                created = client.upload_pipeline(
                    str(package), pipeline_name=name, description=text, namespace=namespace
                )
                pipeline_id, action = created.pipeline_id, "created"
                version_id = _find_version(client, pipeline_id, version, mark)
            else:
                version_id = _find_version(client, pipeline_id, version, mark)
                action = "unchanged"
                if version_id is None:
                    uploaded = client.upload_pipeline_version(
                        str(package), pipeline_version_name=version, pipeline_id=pipeline_id, description=text
                    )
                    version_id, action = uploaded.pipeline_version_id, "new-version"
        except KfoptError:
            raise
        except Exception as exc:  # connection refused, 401/403, 409 (a name taken meanwhile)...
            raise KfoptError(
                f"Publishing '{name}' to Kubeflow Pipelines at {host} failed ({_api_error(exc)}).",
                "check --host (the KFP API endpoint), --namespace and --token.",
            ) from None
    url = f"{host.rstrip('/')}/#/pipelines/details/{pipeline_id}" + (f"/version/{version_id}" if version_id else "")
    return {
        "action": action,
        "name": name,
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "version": version,
        "url": url,
    }


def _check_package(package: Path) -> None:
    import yaml

    if not package.is_file():
        raise KfoptError(
            f"Pipeline package '{package}' does not exist.", "compile it first: kfopt compile --output FILE."
        )
    try:
        docs = list(yaml.safe_load_all(package.read_text()))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KfoptError(
            f"Pipeline package '{package}' is not YAML ({first}).", "pass the file kfopt compile wrote."
        ) from None
    if not docs or not isinstance(docs[0], dict) or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
        raise KfoptError(
            f"'{package}' is not a compiled KFP pipeline (no pipelineInfo/root).",
            "pass the file kfopt compile --output wrote.",
        )


def _pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline called ``name`` (in ``namespace``, for a multi-user cluster), or None."""
    if namespace is None:
        return client.get_pipeline_id(name)
    found = (
        client.list_pipelines(
            namespace=namespace,
            page_size=10,
            filter=json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}),
        ).pipelines
        or []
    )
    if len(found) > 1:
        raise KfoptError(
            f"{len(found)} pipelines are called '{name}' in namespace '{namespace}'.",
            "delete the extra ones in the KFP UI or pass another --name.",
        )
    return found[0].pipeline_id if found else None


def _find_version(client, pipeline_id: str, version: str, mark: str) -> str | None:
    """The id of the pipeline's version named ``version`` (or uploaded as it: see ``_VERSION_MARK``), or None."""
    token = ""
    while True:
        page = client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100)
        for item in page.pipeline_versions or []:
            if item.display_name == version or item.name == version or mark in (item.description or ""):
                return item.pipeline_version_id
        token = page.next_page_token
        if not token:
            return None


def _api_error(exc: Exception) -> str:
    """One line about what the KFP API (or the way to it) said."""
    status = getattr(exc, "status", None)
    if status:  # kfp_server_api.ApiException: HTTP status, reason and the server's message
        detail = ""
        try:
            body = json.loads(exc.body or "{}")
            detail = body.get("message") or body.get("error") or ""
        except (TypeError, ValueError, AttributeError):
            detail = str(getattr(exc, "body", "") or "")
        text = f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip() + (f": {detail}" if detail else "")
    else:
        reason = getattr(exc, "reason", None)  # urllib3 MaxRetryError: the connection error underneath
        text = f"{type(exc).__name__}: {reason or exc}"
    text = " ".join(str(text).split())
    return text[:300]


__all__ = ["run_local", "compile_for_cluster", "submit", "publish", "package_version", "default_token"]
