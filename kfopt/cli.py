"""The ``kfopt`` command line. Importing this module does not import TensorFlow."""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback

import click

from . import __version__
from .errors import KfoptError

RECIPE_HELP = "Inline recipe like 'prune(target_sparsity=0.8)>quantize(mode=int8)', or a recipe YAML file."
MODEL_HELP = "A .keras/.h5 file, a SavedModel directory, or demo:mlp / demo:cnn (trained on the fly on digits)."
DATA_HELP = (
    "An .npz file with x_train, y_train, x_test, y_test (any tf.io.gfile URI), "
    "'py:module:function' returning (train, test) tf.data datasets, or 'digits'."
)
TRACKING_URI_HELP = "MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db]."
REGISTERED_MODEL_HELP = (
    "Register the winner as a new version of this MLflow model (alias challenger) and "
    "move alias champion to it if it beats the current champion."
)
MAX_DROP_HELP = (
    "Budget: the largest drop of --metric allowed, vs the baseline and vs the champion: absolute, in the "
    "metric's units (0.01 = one point of accuracy; 0.5 = half a unit more mae), or relative to the baseline's "
    "value with a % suffix (1%)."
)
METRIC_HELP = (
    "The budgeted metric: accuracy, binary_accuracy, top_k_accuracy, macro_f1, auc, mae, rmse, or a plugin's "
    "[default: by the task read from the model and labels: accuracy (multi-class), binary_accuracy (binary, "
    "multi-label), mae (regression)]."
)
OUTPUT_HELP = (
    "For a model with several outputs: the output --metric is computed on and fine-tuning trains on, by name "
    "or index (the labels are that output's) [default: the first output]."
)
OBJECTIVE_HELP = (
    "What 'better' means, for the winner within the budget and against the champion: smaller gzip_bytes "
    "(size), latency_p50_ms (latency), or gzip_bytes^W * latency_p50_ms^(1-W) (mix:W; mix = mix:0.5)."
)


class _Objective(click.ParamType):
    """size, latency, mix or mix:W, checked by kfopt.select (so the CLI and the pipeline accept the same)."""

    name = "size|latency|mix[:w]"

    def convert(self, value, param, ctx):
        from .select import objective_metric

        if value is None:
            return value
        value = str(value).strip().lower()
        try:
            objective_metric(value)
        except KfoptError as exc:
            self.fail(exc.one_line(), param, ctx)
        return value


OBJECTIVE = _Objective()


class _UserError(click.ClickException):
    """A KfoptError found while the options are parsed: one line and exit 2, like every user error."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _checked(check, value):
    """``check(value)`` in an option callback: its KfoptError becomes the one-line error."""
    try:
        return check(value)
    except KfoptError as exc:
        raise _UserError(exc.one_line()) from None


def _registered_model(ctx, param, value):
    """--registered-model and NAME: the one check of registered model names (kfopt.promotion)."""
    from .promotion import check_model_name

    return _checked(check_model_name, value)


def _check_epochs(value: int) -> int:
    if value < 1:
        raise KfoptError(f"--epochs {value} is not a number of epochs.", "pass --epochs 1 or more (default 40).")
    return value


def _max_data_bytes(ctx, param, value):
    """--max-data-bytes: checked, then put in the environment, where kfopt.limits (and pipeline steps) read it."""
    import os

    from .limits import MAX_DATA_BYTES_ENV, parse_bytes

    if value is not None:
        os.environ[MAX_DATA_BYTES_ENV] = str(_checked(lambda v: parse_bytes(v, "--max-data-bytes"), value))
    return value


_max_data_bytes_option = click.option(
    "--max-data-bytes",
    default=None,
    expose_value=False,
    callback=_max_data_bytes,
    help="Largest size a data file's arrays may take once loaded, checked from its headers before loading "
    "(e.g. 500MB, 16GiB) [default: $KFOPT_MAX_DATA_BYTES, else 8GiB].",
)


class _Budget(click.ParamType):
    """An absolute drop (0.01) or a relative one (1%), checked by kfopt.select.Budget."""

    name = "drop|N%"

    def convert(self, value, param, ctx):
        from .select import Budget

        if value is None:
            return value
        try:
            return Budget.parse(value).value
        except KfoptError as exc:
            self.fail(exc.one_line(), param, ctx)


BUDGET = _Budget()


def tracking_options(command):
    """--tracking-uri and --experiment, shared by the commands that talk to MLflow."""
    command = click.option("--experiment", default=None, help="MLflow experiment [default: kfopt].")(command)
    return click.option("--tracking-uri", default=None, help=TRACKING_URI_HELP)(command)


def _handle_errors(command):
    """One readable line and exit 2 for user errors; a traceback only with --debug."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except KfoptError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc.one_line()}", err=True)
            if kwargs.get("as_json"):  # a script reading --json gets the error as JSON too
                error = {"message": exc.message, "fix": exc.fix, "exit_code": exc.exit_code}
                click.echo(json.dumps({"error": error}))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; results written so far are kept in the output directory", err=True)
            sys.exit(130)
        except Exception as exc:
            if debug:
                traceback.print_exc()
            else:
                click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kfopt")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """kfopt makes trained TensorFlow/Keras models smaller and faster.

    Techniques (prune, quantize, distill, accelerate, and any installed plugin)
    are chained into recipes; every candidate is measured on the held-out test
    split against the baseline in the same format.

    \b
    Examples:
      kfopt plugins
      kfopt optimize --model demo:mlp --data digits \\
          --recipe 'prune(target_sparsity=0.8)>quantize(mode=int8)' --out runs/demo
    """
    # A third-party logging handler whose stream went away must not print its own
    # "--- Logging error ---" traceback at the user (Python's advice for production).
    logging.raiseExceptions = debug


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with each technique's config schema).")
@_handle_errors
def plugins(as_json: bool) -> None:
    """List the techniques: kind, formats in and out, owning package, config keys."""
    from .plugins.manager import registry
    from .report import techniques_json, techniques_table

    techniques = registry()
    if as_json:
        click.echo(json.dumps(techniques_json(techniques), indent=2))
    else:
        _console().print(techniques_table(techniques))


@main.command()
@click.option("--model", "-m", required=True, help=MODEL_HELP)
@click.option("--data", "-d", default="digits", show_default=True, help=DATA_HELP)
@click.option("--recipe", "-r", required=True, help=RECIPE_HELP)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the baseline, the candidate and metrics.json.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for data splits, training and calibration.")
@click.option(
    "--epochs",
    default=40,
    show_default=True,
    callback=lambda ctx, param, value: _checked(_check_epochs, value),
    help="Epochs to train a demo baseline (early stopping on validation).",
)
@_max_data_bytes_option
@click.option("--unsafe", is_flag=True, help="Allow models with Lambda layers (they run arbitrary code when loaded).")
@click.option("--registered-model", default=None, callback=_registered_model, help=REGISTERED_MODEL_HELP)
@tracking_options
@click.option("--max-accuracy-drop", default=0.01, show_default=True, type=BUDGET, help=MAX_DROP_HELP)
@click.option("--metric", default=None, help=METRIC_HELP)
@click.option("--output", default=None, help=OUTPUT_HELP)
@click.option("--objective", type=OBJECTIVE, default="size", show_default=True, help=OBJECTIVE_HELP)
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow, even when MLFLOW_TRACKING_URI is set.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_handle_errors
def optimize(
    model,
    data,
    recipe,
    out,
    seed,
    epochs,
    unsafe,
    registered_model,
    tracking_uri,
    experiment,
    max_accuracy_drop,
    metric,
    output,
    objective,
    no_tracking,
    as_json,
) -> None:
    """Run one recipe on one model in-process and measure the result.

    Writes OUT/baseline/, OUT/candidate/ and OUT/metrics.json. Logs to MLflow
    when asked (--registered-model, --tracking-uri, --experiment, or
    MLFLOW_TRACKING_URI set). Exit code 0 when the candidate is ok or skipped
    (this host cannot run the technique), 1 when a technique failed, 2 for bad
    input, 3 when MLflow failed (results stay in OUT; `kfopt promote --from OUT` retries).
    """

    from .api import optimize as run
    from .report import results_table

    result = run(
        model,
        data,
        recipe,
        out=out,
        seed=seed,
        unsafe=unsafe,
        epochs=epochs,
        max_accuracy_drop=max_accuracy_drop,
        objective=objective,
        metric=metric,
        output=output,
        registered_model=registered_model,
        tracking_uri=tracking_uri,
        experiment=experiment,
        tracking=False if no_tracking else None,
    )
    candidate = result.candidates[0]
    if as_json:
        click.echo(_json(result))
    else:
        _console().print(results_table(result))
        _print_warnings(result)
        click.echo(
            f"Results: {out}/metrics.json" + (f"; model: {candidate['artifact']}" if candidate.get("artifact") else "")
        )
    if candidate.ok and result.winner is None:
        click.echo(f"not the winner: {candidate.not_selected_because} (nothing is registered)", err=True)
    if candidate["status"] == "skipped":
        click.echo(f"skipped: {candidate['reason']}", err=True)
    elif candidate["status"] == "failed":
        click.echo(f"failed: {candidate['reason']}", err=True)
    _report_tracking(result, out)
    if candidate["status"] == "failed":
        sys.exit(1)
    if (result.get("tracking") or {}).get("status") == "failed":
        from .tracking import TrackingFailed

        sys.exit(TrackingFailed.exit_code)


def _report_tracking(result: dict, out) -> None:
    """One line on stderr about MLflow: the registered version and the decision, or the failure and its fix."""
    tracked = result.get("tracking") or {}
    if tracked.get("status") == "failed":
        click.echo(
            f"error: MLflow tracking at {tracked['uri']} failed: {str(tracked['error']).rstrip('.')}. Results are in {out}; "
            f"run `{_promote_command(out, tracked)}` when MLflow is reachable.",
            err=True,
        )
    elif result.get("registered_model"):
        click.echo(_decision_line(result["registered_model"]), err=True)


def _promote_command(out, tracked: dict) -> str:
    """The `kfopt promote --from` that finishes a run's registration: where to is given, never read from the run."""
    import shlex

    command = ["kfopt", "promote", "--from", str(out)]
    if tracked.get("registered_model"):
        command += ["--registered-model", str(tracked["registered_model"])]
    return shlex.join(command + ["--tracking-uri", str(tracked["uri"])] if tracked.get("uri") else command)


def _decision_line(registered: dict) -> str:
    if registered.get("version") is None:
        return f"{registered['name']}: nothing registered ({registered.get('reason')})"
    aliases = ", ".join(registered.get("aliases") or []) or "no alias"
    verdict = "promoted to champion" if registered.get("promoted") else "not promoted"
    return f"{registered['name']} v{registered['version']} ({aliases}): {verdict}: {registered.get('reason')}"


@main.command()
@click.option(
    "--from",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory of a finished run (its --out), with metrics.json.",
)
@click.option(
    "--registered-model",
    default=None,
    callback=_registered_model,
    help=REGISTERED_MODEL_HELP + " Never taken from metrics.json; without it, only the runs are logged.",
)
@tracking_options
@click.option(
    "--max-accuracy-drop",
    default=None,
    type=BUDGET,
    help=MAX_DROP_HELP + " [default: the budget the run was decided with, at most 0.01 (or 1%)]",
)
@click.option("--objective", type=OBJECTIVE, default=None, help=OBJECTIVE_HELP + " [default: the run's own objective]")
@click.option(
    "--data",
    "-d",
    default=None,
    help="The data whose test split the winner is measured again on [default: the data metrics.json names; "
    "a py: loader runs only when given here].",
)
@click.option(
    "--trust-metrics",
    is_flag=True,
    help="Do not measure the winner again (for a directory this machine produced); "
    "paths and sha256s are still checked.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the registered_model object as JSON.")
@_handle_errors
def promote(
    directory, registered_model, tracking_uri, experiment, max_accuracy_drop, objective, data, trust_metrics, as_json
) -> None:
    """Log a finished run to MLflow and register/promote its winner, e.g. after MLflow was down.

    Nothing leaves DIR unchecked: every model file metrics.json lists must be
    inside DIR with the sha256 recorded, and the winner is measured again on
    the test split and must agree with metrics.json (--trust-metrics skips the
    measuring, for a directory this machine produced). Where the model goes
    (--registered-model, --tracking-uri) is never read from metrics.json: when
    the run asked for them, the error prints them as the command to confirm.
    Safe to repeat: nothing is logged or registered twice, and promotions of
    one directory at once wait for each other.
    """
    from .promotion import confirm_destination, promote_from
    from .tracking import resolve_uri

    confirm_destination(directory, registered_model=registered_model, tracking_uri=tracking_uri)
    click.echo(
        f"Checking {directory}: model files and their sha256"
        + ("" if trust_metrics else ", then the winner measured again on the test split"),
        err=True,
    )
    experiment = experiment or "kfopt"
    decision = promote_from(
        directory,
        registered_model=registered_model,
        tracking_uri=tracking_uri,
        experiment=experiment,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
        trust_metrics=trust_metrics,
        data=data,
    )
    if decision is None:
        click.echo(
            json.dumps({"registered_model": None})
            if as_json
            else f"Logged {directory} to MLflow at {resolve_uri(tracking_uri)} (experiment {experiment}); "
            "nothing registered: pass --registered-model NAME to register the winner."
        )
        return
    click.echo(_json(decision) if as_json else _decision_line(decision))


@main.command()
@click.argument("name", callback=_registered_model)
@click.option("--tracking-uri", default=None, help=TRACKING_URI_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@_handle_errors
def history(name, tracking_uri, as_json) -> None:
    """Versions of registered model NAME: aliases, metrics and every promotion decision."""
    from .promotion import history as versions

    rows = versions(name, tracking_uri)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from .report import history_table

        _console().print(history_table(name, rows))


# -- the pipeline: locally through kfp.local, compiled for and submitted to Kubeflow ---------
SEARCH_HELP = (
    "YAML list of recipes to try [default: the built-in search: PTQ modes, QAT, magnitude and "
    "structured pruning, distillation, XLA/TFLite/mixed precision]."
)
SELECT_OBJECTIVE_HELP = (
    "How the winner is chosen among candidates within the accuracy budget, and what "
    "'better than the champion' means: smaller gzip_bytes (size), latency_p50_ms (latency), or "
    "gzip_bytes^W * latency_p50_ms^(1-W) (mix:W; mix = mix:0.5)."
)
PIPELINE_REGISTERED_HELP = "MLflow registered model for the winner [default: kfopt-<model name>, e.g. kfopt-demo-mlp]."
PLACEMENT_HELP = "Node pools: a placement YAML file, or a built-in one: gke (NVIDIA GPUs), gke-tpu."


def _search_option(command):
    return click.option("--search", "-s", default=None, type=click.Path(dir_okay=False), help=SEARCH_HELP)(command)


def _rounds_option(command):
    return click.option(
        "--rounds",
        default=1,
        show_default=True,
        type=click.IntRange(0),
        help="Refinement rounds after round 1: each proposes more aggressive recipes from the "
        "candidates so far (0 = the search space only).",
    )(command)


def _search_bound_options(command):
    """--max-trials, --max-time, --target-compression, --stop-when-met, --sensitivity: how far refinement goes."""
    for option in reversed(
        [
            click.option(
                "--max-trials",
                default=4,
                show_default=True,
                type=click.IntRange(1),
                help="Most recipes per refinement round.",
            ),
            click.option(
                "--max-time",
                default=None,
                type=click.FloatRange(0, min_open=True),
                help="Seconds of optimization after which no new refinement starts [default: no limit].",
            ),
            click.option(
                "--target-compression",
                default=None,
                type=click.FloatRange(1),
                help="Target ratio: compression_ratio for --objective size, speedup for latency, "
                "compression_ratio^W * speedup^(1-W) for mix:W.",
            ),
            click.option(
                "--stop-when-met",
                is_flag=True,
                help="Stop refining once a candidate within the budget reaches --target-compression.",
            ),
            click.option(
                "--sensitivity",
                default=0.9,
                show_default=True,
                type=click.FloatRange(0, 1, max_open=True),
                help="Layer sensitivity: validation drop when one layer alone is pruned to this sparsity "
                "(and when its weights alone are int8); refinement keeps the most sensitive layers "
                "dense, or float under QAT (0 = skip).",
            ),
        ]
    ):
        command = option(command)
    return command


def _cluster_options(command):
    """--image, --accelerator-image, --placement, --parallelism, --mlflow-secret, --step-retries: how the pipeline is
    compiled for a cluster."""
    from .components import DEFAULT_IMAGE

    for option in reversed(
        [
            click.option(
                "--image",
                default=DEFAULT_IMAGE,
                show_default=True,
                help="Image every step runs in (built from the Dockerfile; holds kfopt).",
            ),
            click.option(
                "--accelerator-image",
                default=None,
                help="Image of the fine-tuning steps, e.g. the GPU build (VARIANT=gpu) [default: --image].",
            ),
            click.option("--placement", default="gke", show_default=True, help=PLACEMENT_HELP),
            click.option(
                "--parallelism",
                default=0,
                show_default=True,
                type=click.IntRange(0),
                help="Most recipes optimized at once per node pool (0 = no limit).",
            ),
            click.option(
                "--mlflow-secret",
                default=None,
                help="Kubernetes Secret, in the namespace the steps run in, with the MLflow login of the steps that "
                "talk to MLflow: its keys username and password become MLFLOW_TRACKING_USERNAME/PASSWORD.",
            ),
            click.option(
                "--step-retries",
                default=None,
                type=click.IntRange(0, 10),
                help="Retries (with backoff) of every optimize and evaluate step, for preemptible GPU/TPU nodes "
                "[default: 2].",
            ),
        ]
    ):
        command = option(command)
    return command


def _run_parameter_options(command):
    """What a pipeline run works on: model, data, budget, objective, MLflow."""
    for option in reversed(
        [
            click.option("--model", "-m", default="demo:mlp", show_default=True, help=MODEL_HELP),
            click.option("--data", "-d", default="digits", show_default=True, help=DATA_HELP),
            click.option("--max-accuracy-drop", default=0.01, show_default=True, type=BUDGET, help=MAX_DROP_HELP),
            click.option("--metric", default=None, help=METRIC_HELP),
            click.option("--output", default=None, help=OUTPUT_HELP),
            click.option("--objective", type=OBJECTIVE, default="size", show_default=True, help=SELECT_OBJECTIVE_HELP),
            click.option("--registered-model", default=None, callback=_registered_model, help=PIPELINE_REGISTERED_HELP),
            click.option("--tracking-uri", default=None, help=TRACKING_URI_HELP),
            click.option(
                "--seed", default=0, show_default=True, help="Seed for data splits, training and calibration."
            ),
            click.option(
                "--epochs",
                default=40,
                show_default=True,
                callback=lambda ctx, param, value: _checked(_check_epochs, value),
                help="Epochs to train a demo baseline (early stopping on validation).",
            ),
        ]
    ):
        command = option(command)
    return command


@main.command()
@_run_parameter_options
@_max_data_bytes_option
@_search_option
@click.option("--experiment", default="kfopt", show_default=True, help="MLflow experiment.")
@click.option(
    "--out",
    "-o",
    default="runs/pipeline",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the kfp.local pipeline root, pipeline.log, metrics.json and report.html.",
)
@click.option(
    "--parallelism",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Recipes optimized at once (kfp.local runs at most 2 at a time).",
)
@click.option(
    "--rounds",
    default=None,
    type=click.IntRange(0),
    # The cap is kfopt.pipelines.runners.RUN_ROUNDS (not imported here: it would import kfp).
    help="Refinement rounds after round 1: each proposes more aggressive recipes from the candidates so far "
    "(0 = the search space only) [default: refine while a round gains, at most 3 rounds].",
)
@_search_bound_options
@click.option("--unsafe", is_flag=True, help="Allow models with Lambda layers (they run arbitrary code when loaded).")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Run every step anew [default: a re-run into the same --out reuses the steps whose inputs, the model's "
    "and data's content included, did not change].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@_handle_errors
def run(
    model,
    data,
    max_accuracy_drop,
    metric,
    output,
    objective,
    registered_model,
    tracking_uri,
    seed,
    epochs,
    search,
    experiment,
    out,
    parallelism,
    rounds,
    max_trials,
    max_time,
    target_compression,
    stop_when_met,
    sensitivity,
    unsafe,
    no_cache,
    as_json,
) -> None:
    """Run the whole pipeline on this machine through kfp.local; with no options, the digits demo.

    Trains (or loads) the baseline, tries every recipe of the search in
    parallel subprocesses, then refinement rounds that propose more
    aggressive recipes (deciding on the validation split; while a round gains,
    at most 3, or exactly --rounds), picks the best
    candidate within the accuracy budget on both the validation and the test
    split, writes an HTML
    report and registers the winner in MLflow (a
    local SQLite store unless --tracking-uri or MLFLOW_TRACKING_URI says
    otherwise). Exit code 0 when the run finished, 1 when no candidate
    finished ok, 2 for bad input, 3 when MLflow failed (`kfopt promote --from`
    retries).
    """
    import time

    from .pipelines.runners import RUN_ROUNDS, run_local
    from .recipe_search import load_search, search_settings

    # Without --rounds: keep refining while a round gains, as kfopt search does, within the compiled cap.
    until_no_gain, rounds = rounds is None, RUN_ROUNDS if rounds is None else rounds
    recipes = load_search(search)  # every recipe checked before any work
    search_settings(
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
        target=target_compression,
        stop_when_met=stop_when_met,
    )
    started = time.perf_counter()

    def progress(line: str) -> None:
        if not as_json:
            click.echo(f"[{time.perf_counter() - started:5.0f}s] {line}", err=True)

    if not as_json:
        more = f", then up to {rounds} refinement round{'s' if rounds != 1 else ''} of {max_trials}" if rounds else ""
        more += " (while a round gains)" if rounds and until_no_gain else ""
        click.echo(
            f"Running {len(recipes)} recipe{'s' if len(recipes) != 1 else ''}{more} on {model} / {data} "
            f"through kfp.local (log: {out}/pipeline.log)",
            err=True,
        )
    result = run_local(
        recipes,
        model=model,
        data=data,
        max_accuracy_drop=max_accuracy_drop,
        objective=objective,
        metric=metric,
        output=output,
        registered_model=registered_model or "",
        tracking_uri=tracking_uri or "",
        experiment=experiment,
        out=out,
        seed=seed,
        epochs=epochs,
        unsafe=unsafe,
        parallelism=parallelism,
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        target=target_compression,
        stop_when_met=stop_when_met,
        sensitivity=sensitivity,
        until_no_gain=until_no_gain,
        cache=not no_cache,
        progress=progress,
    )
    if as_json:
        click.echo(_json(result))
    else:
        _print_run(result, out)
    if not any(c["status"] == "ok" for c in result["candidates"]):
        sys.exit(1)
    if (result.get("tracking") or {}).get("status") == "failed":
        from .tracking import TrackingFailed

        sys.exit(TrackingFailed.exit_code)


def _json(value) -> str:
    """One JSON object for --json: records (kfopt.result) as the metrics.json they are written as."""
    from .rundir import jsonable

    return json.dumps(value, indent=2, default=jsonable)


def _console():
    from rich.console import Console

    console = Console()
    # A log or a pipe: do not squeeze the table into 80 columns.
    return console if console.is_terminal else Console(width=200)


def _print_warnings(result) -> None:
    for line in result.warnings:
        click.echo(f"warning: {line}", err=True)


def _print_result(result: dict) -> None:
    """The tables of a run or a search (sensitivity, candidates), the winner, and how the search stopped."""
    from .report import results_table, search_table, sensitivity_table

    console = _console()
    if result.get("layer_sensitivity"):
        console.print(sensitivity_table(result["layer_sensitivity"]))
    console.print(search_table(result) if result.get("search") else results_table(result))
    selection = result.get("selection") or {}
    budget = selection.get("max_accuracy_drop")
    winner = result.winning_candidate
    metric = selection.get("budget_metric") or "accuracy"
    if winner:
        where = f"round {winner['round']}, " if result.get("search") else ""
        why = f"; why: {winner['why']}" if winner.get("round", 1) > 1 and winner.get("why") else ""
        click.echo(
            f"Winner ({where}{selection.get('objective')}: lowest {selection.get('metric')} within {_a(metric)} "
            f"drop of {budget} on the validation and test splits): {winner['recipe']}: {_quality_text(winner)}, "
            f"{winner['gzip_bytes'] / 1024:,.1f} KB gzipped "
            f"({winner['compression_ratio']:.1f}x smaller), p50 {winner['latency_p50_ms']:.4f} ms "
            f"({winner['speedup']:.2f}x faster){why}"
        )
    else:
        click.echo(
            f"No winner: no candidate finished within {_a(metric)} drop of {budget} on both the validation and the "
            "test split."
        )
    same = result.get("best_same_architecture")
    if same and winner and same != winner["recipe"]:
        kept = result.candidate(same)
        click.echo(
            f"Best that keeps your architecture (no student of another kind): {same}: {_quality_text(kept)}, "
            f"{kept['compression_ratio']:.1f}x smaller, {kept['speedup']:.2f}x faster."
        )
    search = result.get("search")
    if search:
        click.echo(f"Search stopped: {search['stopped']} ({search['seconds']:.0f} s of optimization).")
        if search.get("target"):
            from .select import objective_ratio

            name, reached = objective_ratio(winner or {}, search["objective"])
            if not reached or reached < search["target"]:
                click.echo(
                    f"note: the winner reaches {name} {reached or 0:.1f}x, short of the target {search['target']:g}x "
                    "on the test split (the search decides on the validation split; see the val and test drops)."
                )


def _a(metric: str) -> str:
    return f"{'an' if metric[:1] in 'aeiou' else 'a'} {metric}"


def _quality_text(candidate) -> str:
    """``accuracy 0.9700 (test drop +0.20 pt)``, or for another metric ``mae 0.4100 (test drop +0.0300)``."""
    name, value, drop = candidate.get("metric_name"), candidate.get("metric"), candidate.get("metric_drop")
    if name is None or name == "accuracy":
        name, value, drop = "accuracy", candidate.get("accuracy"), candidate.get("accuracy_drop")
        return f"accuracy {value:.4f} (test drop {drop * 100:+.2f} pt)"
    return f"{name} {value:.4f} (test drop {drop:+.4f})"


def _print_run(result: dict, out) -> None:
    _print_result(result)
    click.echo(
        f"Report: {_file_url(result.get('report'))}" if result.get("report") else "Report: not written (see the log)"
    )
    tracked = result.get("tracking") or {}
    if tracked.get("status") == "ok" and tracked.get("run_id"):
        files = ["report.html", "pareto_*.png"] + [
            f"{k}.json" for k in ("search_trace", "layer_sensitivity") if result.get(k)
        ]
        click.echo(
            f"MLflow: parent run {tracked['run_id']} (experiment '{tracked.get('experiment')}' at "
            f"{tracked.get('uri')}) has {', '.join(files)} as artifacts"
        )
    click.echo(f"Results: {result['results']} (metrics.json and every model); log: {result['log']}")
    if tracked.get("status") == "skipped":
        click.echo(f"MLflow: skipped: {tracked.get('error')}", err=True)
    else:
        _report_tracking(result, out)  # promote --from OUT also brings OUT/metrics.json up to date


def _file_url(path) -> str:
    """A path as a file:// URL most terminals let you click open."""
    from pathlib import Path

    return Path(path).resolve().as_uri()


@main.command("search")
@click.option("--model", "-m", default="demo:mlp", show_default=True, help=MODEL_HELP)
@click.option("--data", "-d", default="digits", show_default=True, help=DATA_HELP)
@_search_option
@click.option(
    "--recipe",
    "-r",
    "recipes",
    multiple=True,
    help="A round-1 recipe, inline (repeat the option for several); replaces --search.",
)
@click.option(
    "--out",
    "-o",
    default="runs/search",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the baseline, every candidate and metrics.json (with search_trace).",
)
@click.option(
    "--rounds",
    default=None,
    type=click.IntRange(0),
    help="Refinement rounds after round 1: each proposes more aggressive recipes from the candidates so far "
    "(0 = the search space only) [default: refine while a round improves the best candidate within budget by "
    "more than 3%, within --time-budget].",
)
@click.option(
    "--time-budget",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="Wall seconds the whole search may take: a refinement recipe starts only when its estimated time fits "
    "[default without --rounds: 3x the time up to the end of round 1, at least 120 s; with --rounds: no limit].",
)
@click.option("--max-accuracy-drop", default=0.01, show_default=True, type=BUDGET, help=MAX_DROP_HELP)
@click.option("--metric", default=None, help=METRIC_HELP)
@click.option("--output", default=None, help=OUTPUT_HELP)
@click.option(
    "--objective",
    type=OBJECTIVE,
    default="size",
    show_default=True,
    help="What the search minimises within the budget: gzip_bytes (size), latency_p50_ms (latency), or "
    "a weighted mix of both (mix = half and half, mix:0.7 = 70% size).",
)
@_search_bound_options
@click.option("--seed", default=0, show_default=True, help="Seed for data splits, training and calibration.")
@click.option(
    "--epochs",
    default=40,
    show_default=True,
    callback=lambda ctx, param, value: _checked(_check_epochs, value),
    help="Epochs to train a demo baseline (early stopping on validation).",
)
@_max_data_bytes_option
@click.option("--unsafe", is_flag=True, help="Allow models with Lambda layers (they run arbitrary code when loaded).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@_handle_errors
def search_(
    model,
    data,
    search,
    recipes,
    out,
    rounds,
    time_budget,
    max_trials,
    max_time,
    max_accuracy_drop,
    metric,
    output,
    objective,
    target_compression,
    stop_when_met,
    seed,
    epochs,
    unsafe,
    sensitivity,
    as_json,
) -> None:
    """Accuracy-aware search in-process: round 1, then rounds refining the best recipes.

    Round 1 runs the search space (--search, --recipe, or the built-in one).
    Each refinement round proposes more aggressive recipes from the ones that
    stayed within the budget: higher prune sparsity, narrower distilled
    students, and chains of both (distill>prune>int8, prune>qat). Refinement
    decides on the validation split; the winner is checked on the test split.
    Exit code 0 when a candidate finished, 1 when none did, 2 for bad input.
    """
    from pathlib import Path

    from .api import search as run_search
    from .components.steps import report_step
    from .rundir import REPORT_FILE

    result = run_search(
        model,
        data,
        out=out,
        recipes=list(recipes) or search,
        rounds=rounds,
        max_trials=max_trials,
        max_time=max_time,
        time_budget=time_budget,
        max_accuracy_drop=max_accuracy_drop,
        objective=objective,
        metric=metric,
        output=output,
        target=target_compression,
        stop_when_met=stop_when_met,
        seed=seed,
        epochs=epochs,
        unsafe=unsafe,
        progress=not as_json,
        sensitivity=sensitivity or None,
    )
    report = report_step(out, Path(out) / REPORT_FILE)
    if as_json:
        result.report = str(report)
        click.echo(_json(result))
    else:
        _print_result(result)
        _print_warnings(result)
        click.echo(f"Report: {_file_url(report)}")
        click.echo(f"Results: {out}/metrics.json (and every model under {out})")
    if not any(c["status"] == "ok" for c in result["candidates"]):
        sys.exit(1)


@main.command("compile")
@click.option(
    "--output", "-o", required=True, type=click.Path(dir_okay=False), help="Where to write the pipeline (KFP IR YAML)."
)
@_search_option
@_rounds_option
@_cluster_options
@_handle_errors
def compile_(
    output, search, rounds, image, accelerator_image, placement, parallelism, mlflow_secret, step_retries
) -> None:
    """Compile the optimize-and-promote pipeline for a Kubeflow cluster.

    The round-1 recipes and the number of refinement rounds are fixed in the
    compiled pipeline (each recipe's node pool depends on whether it
    fine-tunes; refinement rounds run on the accelerator pool); model, data,
    budget, objective, search bounds (max_trials, max_time, target,
    stop_when_met, sensitivity) and MLflow settings are run parameters.
    """
    from .pipelines.runners import compile_for_cluster

    summary = compile_for_cluster(
        output,
        search=search,
        rounds=rounds,
        image=image,
        accelerator_image=accelerator_image,
        placement=placement,
        parallelism=parallelism,
        mlflow_secret=mlflow_secret,
        step_retries=step_retries,
    )
    click.echo(summary["description"])


@main.command()
@click.option(
    "--host",
    required=True,
    help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline or http://localhost:8080.",
)
@click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user clusters).")
@click.option("--experiment", default="kfopt", show_default=True, help="KFP experiment the run goes into.")
@click.option(
    "--token",
    default=None,
    help="Bearer token for the KFP API [default: the in-cluster service-account token "
    "($KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token) when present].",
)
@click.option("--run-name", default=None, help="Run name shown in the KFP UI [default: pipeline name and time].")
@_run_parameter_options
@click.option("--mlflow-experiment", default="kfopt", show_default=True, help="MLflow experiment of the run.")
@_search_option
@_rounds_option
@_search_bound_options
@_cluster_options
@click.option(
    "--no-cache",
    is_flag=True,
    help="Run every step anew [default: steps cache as the pipeline says, keyed on content].",
)
@_handle_errors
def submit(
    host,
    namespace,
    experiment,
    token,
    run_name,
    model,
    data,
    max_accuracy_drop,
    metric,
    output,
    objective,
    registered_model,
    tracking_uri,
    seed,
    epochs,
    mlflow_experiment,
    search,
    rounds,
    max_trials,
    max_time,
    target_compression,
    stop_when_met,
    sensitivity,
    image,
    accelerator_image,
    placement,
    parallelism,
    mlflow_secret,
    step_retries,
    no_cache,
) -> None:
    """Compile the pipeline, upload it to Kubeflow Pipelines and start a run; print the run's URL."""
    import tempfile
    from pathlib import Path

    from .pipelines.runners import compile_for_cluster
    from .pipelines.runners import submit as submit_run

    if not host.startswith(("http://", "https://")):
        raise KfoptError(f"--host '{host}' is not an http(s) URL.", "pass e.g. https://kubeflow.example.com/pipeline.")
    if not tracking_uri:
        click.echo(
            "note: no --tracking-uri: the promote step uses MLflow's default inside its pod "
            "(MLFLOW_TRACKING_URI of the image, else a throw-away SQLite file).",
            err=True,
        )
    with tempfile.TemporaryDirectory(prefix="kfopt-submit-") as tmp:
        package = Path(tmp) / "kfopt-pipeline.yaml"
        summary = compile_for_cluster(
            package,
            search=search,
            rounds=rounds,
            image=image,
            accelerator_image=accelerator_image,
            placement=placement,
            parallelism=parallelism,
            mlflow_secret=mlflow_secret,
            step_retries=step_retries,
        )
        click.echo(summary["description"], err=True)
        arguments = {
            "model": model,
            "data": data,
            "max_accuracy_drop": str(max_accuracy_drop),
            "objective": objective,
            "metric": metric or "",
            "output": output or "",
            "registered_model": registered_model or "",
            "tracking_uri": tracking_uri or "",
            "experiment": mlflow_experiment,
            "seed": seed,
            "epochs": epochs,
        }
        if rounds:
            arguments.update(
                max_trials=max_trials,
                max_time=max_time or 0.0,
                target=target_compression or 0.0,
                stop_when_met=stop_when_met,
                sensitivity=sensitivity,
            )
        started = submit_run(
            package,
            host=host,
            arguments=arguments,
            namespace=namespace,
            experiment=experiment,
            run_name=run_name,
            token=token,
            cache=not no_cache,
        )
    click.echo(started["url"])


@main.command()
@click.option(
    "--package",
    "-p",
    required=True,
    type=click.Path(dir_okay=False),
    help="The compiled pipeline (what `kfopt compile --output` wrote).",
)
@click.option(
    "--host",
    required=True,
    help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline or http://localhost:8080.",
)
@click.option("--name", required=True, help="Pipeline name in the KFP UI; created on first publish.")
@click.option(
    "--version",
    "version",
    default=None,
    help="Name of the new pipeline version [default: a hash of the package, so publishing "
    "the same package again uploads nothing].",
)
@click.option(
    "--namespace", default=None, help="Kubeflow profile namespace (multi-user clusters) [default: a shared pipeline]."
)
@click.option(
    "--token",
    default=None,
    help="Bearer token for the KFP API [default: the in-cluster service-account token "
    "($KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token) when present].",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (action, pipeline_id, version_id, version, url)."
)
@_handle_errors
def publish(package, host, name, version, namespace, token, as_json) -> None:
    """Upload a compiled pipeline to Kubeflow Pipelines: a new pipeline, or a new version of it.

    Idempotent: if the pipeline already has a version named --version (or
    uploaded from the same package, by default), nothing is uploaded.
    """
    from .pipelines.runners import publish as publish_pipeline

    done = publish_pipeline(package, host=host, name=name, version=version, namespace=namespace, token=token)
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    said = {
        "created": f"Created pipeline '{name}' (version {done['version']})",
        "new-version": f"Uploaded version {done['version']} of pipeline '{name}'",
        "unchanged": f"Pipeline '{name}' already has version {done['version']}: nothing uploaded",
    }[done["action"]]
    click.echo(f"{said}: {done['url']}")


@main.command("new-plugin")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder to create the package kfopt-NAME in.",
)
@_handle_errors
def new_plugin(name, directory) -> None:
    """Create a plugin package for a new technique NAME, ready to install and test.

    It has the entry point that makes kfopt find it, one working technique
    (weight rounding, to replace with yours) and tests using kfopt.testing.
    See docs/plugins.md.
    """
    from .scaffold import create_plugin, plugin_names

    root = create_plugin(name, directory)
    names = plugin_names(name)
    click.echo(
        f"Created {root}: technique '{names['name']}' in {root / names['module'] / '__init__.py'}, "
        f"tests in {root / 'tests'}."
    )
    click.echo(f"Next: pip install -e {root} && pytest {root} && kfopt plugins")


if __name__ == "__main__":  # pragma: no cover
    main()
