"""MLflow tracking, registration and promotion, against a real `mlflow server` and a real SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kfopt.cli import main
from kfopt.engine import optimize
from kfopt.promotion import gate, promote_from
from kfopt.result import RunResult
from kfopt.rundir import METRICS_FILE, TRACKING_FILE
from kfopt.tracking import RunLogger

SMALLER = "prune(target_sparsity=0.5,epochs=1)>quantize(mode=dynamic)"  # tflite, zeros compress: smallest
SMALL = "quantize(mode=dynamic)"  # tflite, int8 weights
KERAS = "prune(target_sparsity=0.5,epochs=1)"  # keras fp32: largest
BUDGET = "0.05"  # three-epoch baselines; the budget is not what these tests are about


def cli(*args):
    """Exit code and everything printed (stdout and stderr); stdout alone for JSON is ``cli.stdout``."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    cli.stdout = result.stdout
    return result.exit_code, result.output


@pytest.fixture(autouse=True)
def no_ambient_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Three finished `optimize` runs (no tracking asked for), trained once; tests promote copies of them."""
    root = tmp_path_factory.mktemp("runs")
    cwd, ambient = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)  # an untracked run must not leave an mlflow.db behind in the working directory
    try:
        for name, recipe in (("small", SMALL), ("smaller", SMALLER), ("keras", KERAS)):
            result = optimize("demo:mlp", "digits", recipe, root / name, epochs=3)
            assert result["candidates"][0]["status"] == "ok" and "tracking" not in result
    finally:
        os.chdir(cwd)
        if ambient is not None:
            os.environ["MLFLOW_TRACKING_URI"] = ambient
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()
    assert not list(root.rglob(TRACKING_FILE))
    return root


@pytest.fixture
def run_dir(finished_runs, tmp_path):
    """A fresh copy of one of the finished runs, moved away from where it was written."""

    def copy(name):
        target = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(finished_runs / name, target)
        return target

    return copy


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def digits_test():
    from kfopt.data import load_data

    return load_data("digits", input_shape=(64,), seed=0).test.arrays()


def load_champion(uri, name):
    import mlflow

    from kfopt.rundir import tracking_uri

    with tracking_uri(uri):
        return mlflow.pyfunc.load_model(f"models:/{name}@champion")


# -- the gate (no MLflow) ----------------------------------------------------------------
def test_gate_budget_objective_and_ties():
    champion = {"accuracy": 0.95, "gzip_bytes": 100, "latency_p50_ms": 1.0}

    def ok(c, **kw):
        return gate(c, champion, max_accuracy_drop=0.01, objective=kw.get("objective", "size"))[0]

    assert gate(
        {"accuracy": 0.9, "accuracy_drop": 0.0, "gzip_bytes": 1}, None, max_accuracy_drop=0.01, objective="size"
    )[0]
    assert ok({"accuracy": 0.945, "gzip_bytes": 99})  # within budget, smaller
    assert not ok({"accuracy": 0.93, "gzip_bytes": 10})  # smaller but too inaccurate
    assert not ok({"accuracy": 0.99, "gzip_bytes": 100})  # a tie is not better
    assert not ok({"accuracy": 0.99, "accuracy_drop": 0.05, "gzip_bytes": 1})  # blew its own baseline budget
    assert ok({"accuracy": 0.95, "latency_p50_ms": 0.5}, objective="latency")
    passed, reason = gate(
        {"accuracy": 0.95, "gzip_bytes": 10},
        {"accuracy": 0.95},
        max_accuracy_drop=0.01,
        objective="size",
        champion_version="3",
    )
    assert not passed and "gzip_bytes missing" in reason and "v3" in reason


@pytest.mark.slow
def test_observer_hooks_see_the_run_and_a_broken_observer_does_not_fail_it(tmp_path, monkeypatch):
    from kfopt.observers import ObserverWarning
    from kfopt.plugins import hookimpl

    seen = []

    class Recorder:
        @hookimpl
        def kfopt_run_started(self, run):  # a subset of the arguments is fine, as in pluggy
            seen.append(("started", run["recipes"]))

        @hookimpl
        def kfopt_candidate_finished(self, candidate, context):
            seen.append(("candidate", candidate["status"], context["tracking"]))

        @hookimpl
        def kfopt_run_finished(self, result, context):
            seen.append(("finished", result["winner"]))
            return {"recorder": {"candidates": len(result["candidates"])}}

    class Broken:
        @hookimpl
        def kfopt_candidate_finished(self, candidate):
            raise RuntimeError("observer bug")

    monkeypatch.chdir(tmp_path)
    with pytest.warns(ObserverWarning, match="observer bug"):
        result = optimize("demo:mlp", "digits", SMALL, tmp_path / "out", epochs=3, extra_plugins=[Recorder(), Broken()])
    assert seen == [("started", [SMALL]), ("candidate", "ok", False), ("finished", SMALL)]
    assert RunResult.load(tmp_path / "out")["recorder"] == {"candidates": 1} == result["recorder"]


# -- with a real tracking server ---------------------------------------------------------
@pytest.mark.slow
def test_better_run_becomes_champion_worse_one_stays_challenger(mlflow_server, tmp_path):
    name, uri = "digits-size", mlflow_server.uri
    common = [
        "--model",
        "demo:mlp",
        "--epochs",
        "3",
        "--registered-model",
        name,
        "--tracking-uri",
        uri,
        "--max-accuracy-drop",
        BUDGET,
    ]
    code, out = cli("optimize", *common, "--recipe", SMALL, "--out", tmp_path / "1", "--json")
    assert code == 0, out
    first = json.loads(cli.stdout)["registered_model"]
    assert first["version"] == 1 and first["promoted"] and set(first["aliases"]) == {"champion", "challenger"}

    code, out = cli("optimize", *common, "--recipe", SMALLER, "--out", tmp_path / "2")
    assert code == 0, out
    assert f"{name} v2 (challenger, champion): promoted to champion" in out
    on_disk = RunResult.load(tmp_path / "2")["registered_model"]
    assert on_disk["version"] == 2 and on_disk["previous_champion"] == "1"

    code, out = cli("optimize", *common, "--recipe", KERAS, "--out", tmp_path / "3")
    assert code == 0, out
    mlflow = client(uri)
    v3 = mlflow.get_model_version(name, "3")
    assert v3.tags["kfopt.decision"] == "rejected" and v3.tags["kfopt.previous_champion"] == "2"
    assert "gzip_bytes" in v3.tags["kfopt.reason"] and "not below champion v2" in v3.tags["kfopt.reason"]
    assert v3.tags["kfopt.objective"] == "size" and v3.tags["kfopt.decided_at"] and v3.tags["kfopt.decided_by"]
    assert mlflow.get_registered_model(name).aliases == {"champion": "2", "challenger": "3"}
    assert getattr(v3, "current_stage", None) in (None, "None")  # aliases only, never stages

    # One parent run per optimize run, one nested child per candidate, with params, metrics and artifacts.
    child = mlflow.get_run(v3.run_id)
    parent = mlflow.get_run(child.data.tags["mlflow.parentRunId"])
    assert child.data.params["step1.prune.target_sparsity"] == "0.5" and child.data.params["kfopt_version"]
    assert child.data.params["tensorflow_version"].startswith("2.") and child.data.params["seed"] == "0"
    assert {"accuracy", "gzip_bytes", "latency_p50_ms", "compression_ratio"} <= set(child.data.metrics)
    assert "baseline_accuracy" in parent.data.metrics and parent.info.status == "FINISHED"
    assert {a.path for a in mlflow.list_artifacts(parent.info.run_id)} >= {METRICS_FILE, "baseline.json"}
    assert [a.path for a in mlflow.list_artifacts(child.info.run_id, "candidate")] == ["candidate/model.keras"]

    # The champion (v2, TFLite) loads as a pyfunc and predicts digits.
    x, y = digits_test()
    scores = load_champion(uri, name).predict(x)
    assert scores.shape == (len(x), 10) and (scores.argmax(axis=1) == y).mean() > 0.85

    code, out = cli("history", name, "--tracking-uri", uri, "--json")
    assert code == 0, out
    rows = json.loads(cli.stdout)
    assert [(r["version"], r["decision"], r["aliases"]) for r in rows] == [
        (3, "rejected", ["challenger"]),
        (2, "promoted", ["champion"]),
        (1, "promoted", []),
    ]
    code, out = cli("history", name, "--tracking-uri", uri)
    assert code == 0 and "rejected" in out and "champion" in out
    assert "…" not in out  # not a terminal (CI logs, pipes): the table is not squeezed into 80 columns
    code, out = cli("history", "digits-siz", "--tracking-uri", uri)
    assert code == 2 and "Did you mean 'digits-size'?" in out and out.count("error:") == 1


@pytest.mark.slow
def test_keras_winner_loads_as_pyfunc(mlflow_server, run_dir):
    name = "digits-keras"
    decision = promote_from(
        run_dir("keras"), registered_model=name, tracking_uri=mlflow_server.uri, max_accuracy_drop=float(BUDGET)
    )
    assert decision["version"] == 1 and decision["promoted"] and decision["reason"] == "no champion yet"
    model = load_champion(mlflow_server.uri, name)
    assert "tensorflow" in model.metadata.flavors  # MLflow's own Keras flavor, not the wrapper
    x, y = digits_test()
    assert (np.asarray(model.predict(x)).argmax(axis=1) == y).mean() > 0.85


@pytest.mark.slow
def test_server_down_then_promote_later_registers_once(mlflow_server, run_dir, tmp_path, monkeypatch):
    name, uri = "digits-outage", mlflow_server.uri
    assert (
        promote_from(run_dir("small"), registered_model=name, tracking_uri=uri, max_accuracy_drop=float(BUDGET))[
            "version"
        ]
        == 1
    )
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail in seconds, not after the default backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    out_dir = tmp_path / "during-outage"
    mlflow_server.stop()
    try:
        code, out = cli(
            "optimize",
            "--model",
            "demo:mlp",
            "--epochs",
            "3",
            "--recipe",
            SMALLER,
            "--out",
            out_dir,
            "--registered-model",
            name,
            "--tracking-uri",
            uri,
            "--max-accuracy-drop",
            BUDGET,
        )
    finally:
        mlflow_server.start()
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # later commands: a fresh shell's settings
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    assert code == 3, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and f"kfopt promote --from {out_dir} --registered-model {name} --tracking-uri {uri}" in errors[0]
        and "Traceback" not in out
    )
    saved = RunResult.load(out_dir)
    assert saved["candidates"][0]["status"] == "ok" and Path(saved["candidates"][0]["artifact"]).is_file()
    assert saved["tracking"]["status"] == "failed" and saved["registered_model"]["version"] is None

    # Where the model goes is never read from metrics.json: the refusal shows what the run asked for, to confirm.
    code, out = cli("promote", "--from", out_dir, "--json")
    assert code == 2 and out.count("error:") == 1, out
    assert f"kfopt promote --from {out_dir} --registered-model {name} --tracking-uri {uri}" in out
    # Confirmed, it registers once; repeating the command changes nothing.
    destination = ["--registered-model", name, "--tracking-uri", uri, "--max-accuracy-drop", BUDGET]
    for _ in range(2):
        code, out = cli("promote", "--from", out_dir, *destination, "--json")
        assert code == 0, out
        assert json.loads(cli.stdout) | {"reason": None} == {
            "name": name,
            "version": 2,
            "aliases": ["challenger", "champion"],
            "promoted": True,
            "previous_champion": "1",
            "reason": None,
        }
    # A retry in a fresh pipeline pod has no tracking.json: the runs are found again by the results' fingerprint.
    (out_dir / TRACKING_FILE).unlink()
    assert promote_from(out_dir, registered_model=name, tracking_uri=uri)["version"] == 2
    mlflow = client(uri)
    assert len(mlflow.search_model_versions(f"name='{name}'")) == 2
    runs = mlflow.search_runs(
        [mlflow.get_experiment_by_name("kfopt").experiment_id], f"tags.`kfopt.out` = '{out_dir.resolve()}'"
    )
    assert len(runs) == 1  # one parent run, not one per attempt
    assert RunResult.load(out_dir)["registered_model"]["version"] == 2


@pytest.mark.slow
def test_concurrent_promotions_leave_champion_on_the_better_one(mlflow_server, run_dir):
    name, uri = "digits-race", mlflow_server.uri
    worse, better = run_dir("small"), run_dir("smaller")
    for directory in (worse, better):  # log the runs first, so the two processes race on the decision itself
        RunLogger(directory, uri, "kfopt").log_result(RunResult.load(directory))
    command = [
        sys.executable,
        "-m",
        "kfopt.cli",
        "promote",
        "--registered-model",
        name,
        "--tracking-uri",
        uri,
        "--max-accuracy-drop",
        BUDGET,
        "--json",
        "--from",
    ]
    env = {**os.environ, "KFOPT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    started = time.monotonic()
    procs = [
        subprocess.Popen([*command, str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for d in (worse, better)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    if not all(p.returncode == 0 for p in procs):  # pytest.fail keeps the whole stderr (assert would cut it)
        pytest.fail(
            "\n\n".join(f"exit {p.returncode}\nstdout: {o}\nstderr: {e[-4000:]}" for p, (o, e) in zip(procs, outputs))
        )
    decisions = {d: json.loads(o) for d, (o, _) in zip(("worse", "better"), outputs)}
    mlflow = client(uri)
    assert mlflow.get_registered_model(name).aliases["champion"] == str(decisions["better"]["version"])
    assert decisions["better"]["promoted"]
    assert {decisions["worse"]["version"], decisions["better"]["version"]} == {1, 2}
    assert time.monotonic() - started < 120


# -- the embedded default, and what the user can get wrong -------------------------------------
@pytest.mark.slow
def test_embedded_sqlite_default_needs_no_server(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = run_dir("small")
    code, out = cli("promote", "--from", directory, "--registered-model", "local-digits")
    assert code == 0, out
    assert "local-digits v1 (challenger, champion): promoted to champion" in out
    assert (tmp_path / "mlflow.db").is_file()
    artifacts = Path(
        client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("kfopt").artifact_location[7:]
    )
    assert artifacts == tmp_path / "mlruns" and any(artifacts.iterdir())  # beside the database...
    state = json.loads((directory / TRACKING_FILE).read_text())
    assert list(state) == [f"sqlite:///{tmp_path / 'mlflow.db'} kfopt"]
    code, out = cli("history", "local-digits", "--json")
    assert code == 0 and json.loads(cli.stdout)[0]["aliases"] == ["challenger", "champion"]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging did not leak its URI into the environment
    (tmp_path / "elsewhere").mkdir()
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    RunLogger(directory, other, "kfopt").experiment_id()  # ...wherever the database is, not in the cwd
    assert (
        client(other).get_experiment_by_name("kfopt").artifact_location == (tmp_path / "elsewhere" / "mlruns").as_uri()
    )


@pytest.mark.slow
def test_a_sqlite_store_in_another_directory_registers_there(run_dir, tmp_path, monkeypatch):
    """The registry follows --tracking-uri: no stray ./mlflow.db, no 'Logged model ... not found'."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    directory = run_dir("small")
    code, out = cli(
        "promote", "--from", directory, "--registered-model", "far-away", "--tracking-uri", uri, "--trust-metrics"
    )
    assert code == 0, out
    assert "far-away v1 (challenger, champion): promoted to champion" in out
    assert not (tmp_path / "cwd" / "mlflow.db").exists()
    assert client(uri).get_registered_model("far-away").aliases == {"champion": 1, "challenger": 1}


def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["promote", "--from", tmp_path, "--registered-model", "m"], "No metrics.json in"),
        (["history", "nothing-here", "--tracking-uri", f"sqlite:///{tmp_path / 'new.db'}"], "does not exist at"),
        (
            [
                "optimize",
                "--model",
                "demo:mlp",
                "--recipe",
                SMALL,
                "--out",
                tmp_path / "o",
                "--tracking-uri",
                "bogus://x",
            ],
            "Unexpected URI scheme in tracking URI 'bogus://x'. Valid schemes are:",
        ),
        (
            [
                "optimize",
                "--model",
                "demo:mlp",
                "--recipe",
                SMALL,
                "--out",
                tmp_path / "o",
                "--registered-model",
                "m",
                "--no-tracking",
            ],
            "needs MLflow, but tracking is turned off",
        ),
    ]
    for args, message in cases:
        code, out = cli(*args)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Fix:" in errors[0], out
    assert not (tmp_path / "o" / "baseline").exists()  # refused before any training


def test_tracking_stays_lazy():
    code = (
        "import sys, kfopt, kfopt.cli, kfopt.observers, kfopt.tracking, kfopt.promotion;"
        "from kfopt.plugins.manager import registry; registry();"
        "print('mlflow' in sys.modules, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- lineage: what a run and a registered version say about where they came from ----------
@pytest.mark.slow
def test_runs_carry_datasets_model_names_tags_and_the_version_says_what_was_done(mlflow_server, run_dir, monkeypatch):
    import yaml

    name, uri = "digits-lineage", mlflow_server.uri
    monkeypatch.setenv("KFOPT_KFP_RUN_ID", "0f4c-run-uuid")  # as the pipeline's promote step sets it
    monkeypatch.setenv("KFOPT_KFP_UI", "https://kubeflow.example.com/pipeline/")
    directory = run_dir("smaller")
    # An experiment of its own: the same results logged by another test would be adopted (found by run_key).
    decision = promote_from(
        directory, registered_model=name, tracking_uri=uri, max_accuracy_drop=float(BUDGET), experiment="lineage"
    )
    assert decision["promoted"]
    mlflow = client(uri)
    version = mlflow.get_model_version(name, str(decision["version"]))
    child = mlflow.get_run(version.run_id)
    parent = mlflow.get_run(child.data.tags["mlflow.parentRunId"])
    splits = RunResult.load(directory).splits

    for run in (parent, child):
        inputs = {
            {t.key: t.value for t in i.tags}["mlflow.data.context"]: (i.dataset, {t.key: t.value for t in i.tags})
            for i in run.inputs.dataset_inputs
        }
        assert set(inputs) == {"train", "validation", "test"}
        for split, (dataset, tags) in inputs.items():
            assert dataset.name == f"digits-{split}" and dataset.digest and "load_digits" in dataset.source
            assert int(tags["kfopt.samples"]) == splits[split]
        assert inputs["validation"][1]["kfopt.validation_source"] == splits["validation_source"]
        assert run.data.tags["kfopt.version"] == kfopt_version()
        assert run.data.tags["kfopt.kfp_run_id"] == "0f4c-run-uuid"
        assert (
            run.data.tags["kfopt.kfp_run_url"] == "https://kubeflow.example.com/pipeline/#/runs/details/0f4c-run-uuid"
        )
    digests = {i.dataset.digest for i in child.inputs.dataset_inputs}
    assert digests == {i.dataset.digest for i in parent.inputs.dataset_inputs} and len(digests) == 3

    # The techniques' packages and the recipe, as a file that runs again.
    assert (
        child.data.tags["kfopt.plugin.prune"] == child.data.tags["kfopt.plugin.quantize"] == f"kfopt=={kfopt_version()}"
    )
    recipe = yaml.safe_load(Path(mlflow.download_artifacts(child.info.run_id, "recipe.yaml")).read_text())
    assert recipe["name"] == SMALLER and [next(iter(s)) for s in recipe["steps"]] == ["prune", "quantize"]
    assert recipe["steps"][0]["prune"]["target_sparsity"] == 0.5 and recipe["steps"][1]["quantize"]["mode"] == "dynamic"
    from kfopt.recipe import parse_recipe

    assert str(parse_recipe(recipe)).startswith("prune(")

    # LoggedModels named after their recipe; the baseline is one too, on the parent run.
    candidate_model = mlflow.get_logged_model(child.data.tags["kfopt.model_id"])
    assert candidate_model.name == "prune-target_sparsity-0_5-epochs-1-quantize-mode-dynamic"
    assert version.source == f"models:/{candidate_model.model_id}"
    baseline_model = mlflow.get_logged_model(parent.data.tags["kfopt.baseline_model_id"])
    assert baseline_model.name == "baseline" and baseline_model.source_run_id == parent.info.run_id

    # The version says what was done and measured, and what was decided.
    text = version.description
    assert SMALLER in text and "accuracy" in text and "drop" in text and "compression" in text and "speedup" in text
    assert "x (gzip" in text and "promoted to champion: no champion yet" in text


@pytest.mark.slow
def test_a_keras3_users_keras_winner_is_logged_in_keras3(mlflow_server, tmp_path):
    """Issue 11: the registered Keras model is the Keras 3 file the user gets back, loaded by Keras 3."""
    import mlflow

    sys.path.insert(0, str(Path(__file__).parent))
    from zoo_models import mlp_keras3

    from kfopt.keras3 import keras3
    from kfopt.rundir import tracking_uri

    model, arrays = mlp_keras3(tmp_path)
    data = tmp_path / "digits.npz"
    np.savez(data, **arrays)
    name, uri = "digits-keras3", mlflow_server.uri
    result = optimize(
        model,
        str(data),
        "prune(target_sparsity=0.5,epochs=1)",
        tmp_path / "run",
        max_accuracy_drop=0.1,
        tracking={"registered_model": name, "tracking_uri": uri},
    )
    assert result.registered_model.promoted, result.registered_model
    with tracking_uri(uri):
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        loaded = mlflow.keras.load_model(f"models:/{name}@champion")
        requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion")) / "requirements.txt"
    assert "keras" in info.flavors and "tensorflow" not in info.flavors
    assert isinstance(loaded, keras3().Model)  # Keras 3 loads it: not the tf_keras form kfopt worked on
    listed = requirements.read_text()
    assert f"keras=={keras3().__version__}" in listed and "tf-keras" not in listed and "kfopt" not in listed
    x = arrays["x_test"][:32]
    expected = keras3().saving.load_model(result.candidates[0].artifact).predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    assert list(info.signature.inputs.input_types()) and info.saved_input_example_info is not None


@pytest.mark.slow
def test_data_passed_from_python_is_said_unlogged_and_the_model_keeps_an_input_signature(run_dir, tmp_path):
    """No rows to read again: no datasets and no example (never zeros posing as data), but the inputs' schema."""
    import mlflow

    from kfopt.rundir import tracking_uri

    directory = run_dir("small")
    record = json.loads((directory / METRICS_FILE).read_text())
    record["data"] = "arrays passed from Python"
    (directory / METRICS_FILE).write_text(json.dumps(record))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger(directory, uri, "kfopt")
    logger.log_result(RunResult.load(directory))
    entry = logger.logged(SMALL)
    run = client(uri).get_run(entry["run_id"])
    assert run.data.tags["kfopt.datasets"] == "not logged: the data was passed from Python, so it cannot be read again"
    assert not run.inputs.dataset_inputs
    with tracking_uri(uri):
        info = mlflow.models.get_model_info(entry["model_uri"])
    assert info.saved_input_example_info is None
    assert [(str(t.type), t.shape) for t in info.signature.inputs.inputs] == [("float32", (-1, 64))]


def kfopt_version() -> str:
    from kfopt import __version__

    return __version__


def test_a_rerun_that_decides_otherwise_updates_the_parent_run_it_takes_over(mlflow_server, run_dir):
    """A cached pipeline re-run with another budget: the same measured candidates, another outcome."""
    from kfopt.select import select
    from kfopt.tracking import RunLogger

    out = run_dir("small")
    first = RunResult.load(out)
    RunLogger(out, mlflow_server.uri, "rerun-decided").log_result(first)
    (out / TRACKING_FILE).unlink()  # a fresh pod: the parent run is found again by the results' fingerprint
    strict = RunResult.load(out).apply(select(first.candidates, max_accuracy_drop=0.0, objective="size"))
    assert strict.selection != first.selection  # decided under another budget
    RunLogger(out, mlflow_server.uri, "rerun-decided").log_result(strict)
    mlflow = client(mlflow_server.uri)
    (parent,) = mlflow.search_runs(
        [mlflow.get_experiment_by_name("rerun-decided").experiment_id], "tags.`mlflow.parentRunId` IS NULL"
    )
    assert parent.data.tags["kfopt.winner"] == str(strict.winner)
    assert parent.info.run_name.startswith("kfopt demo:mlp")
    logged = json.loads(Path(mlflow.download_artifacts(parent.info.run_id, "metrics.json")).read_text())
    assert logged["winner"] == strict.winner and logged["selection"] == json.loads(json.dumps(strict.selection))
