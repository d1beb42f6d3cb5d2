"""kfopt as an attacker and a careless user meet it: tampered run directories, locks, bombs, bad input.

Every case ends in one of a few ways, asserted here: exit 2 with one line (and
nothing registered, uploaded, deleted or allocated), or a clean result. The
fixtures (a small user model, its data, finished runs, forged files) are built
in the tests. Cases against a real ``mlflow server`` are marked slow.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kfopt import rundir
from kfopt.cli import main
from kfopt.data import load_data
from kfopt.errors import KfoptError
from kfopt.limits import MAX_DATA_BYTES_ENV, MAX_YAML_BYTES_ENV
from kfopt.recipe import parse_recipe
from kfopt.rundir import LOCK_FILE, METRICS_FILE, TRACKING_FILE
from kfopt.tracking import run_key

RECIPE = "quantize(mode=dynamic)"
BUDGET = "0.5"  # a tiny model on random data: the budget is not what these tests are about
NAME = "tiny-classifier"


def cli(*args):
    """Exit code and everything printed, with kfopt's CLI run in this process."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    cli.stdout = result.stdout
    return result.exit_code, result.output


def one_error(out: str) -> str:
    """The one error line of a user error (no traceback)."""
    errors = [line for line in out.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # --max-data-bytes puts its value in the environment: give it something to restore.
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "8GiB")


# -- fixtures: a user's model and data, and finished runs of it ------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small Keras classifier (4 inputs, 3 classes) trained briefly, and its data as an .npz."""
    from kfopt import _tf

    keras = _tf.keras()
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:300], y[:300], epochs=30, verbose=0)
    model.save(root / "model.keras")
    np.savez(root / "data.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    return root


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """Two finished `optimize` runs of the tiny model (no tracking): ``dynamic`` and ``float16``."""
    from kfopt.engine import optimize

    root = tmp_path_factory.mktemp("finished")
    for name, recipe in (("dynamic", RECIPE), ("float16", "quantize(mode=float16)")):
        result = optimize(
            str(tiny / "model.keras"), str(tiny / "data.npz"), recipe, root / name, max_accuracy_drop=float(BUDGET)
        )
        assert result.winner == recipe
    return root


@pytest.fixture
def run_dir(finished, tmp_path):
    """A fresh copy of a finished run, elsewhere than where it was written."""

    def copy(name="dynamic"):
        target = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(finished / name, target)
        return target

    return copy


def edit_record(directory: Path, change) -> None:
    path = directory / METRICS_FILE
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def promote(directory, store: Path, *extra):
    """`kfopt promote --from` to a SQLite store (created only when MLflow is contacted)."""
    return cli(
        "promote",
        "--from",
        directory,
        "--registered-model",
        NAME,
        "--tracking-uri",
        f"sqlite:///{store}",
        "--max-accuracy-drop",
        BUDGET,
        *extra,
    )


def registered_versions(uri: str, name: str = NAME) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'"))


# -- tampered run directories: promote --from registers nothing -----------------------------
@pytest.mark.parametrize(
    "field, value",
    [("accuracy", 0.999), ("gzip_bytes", 100), ("accuracy_drop", -0.5), ("val_accuracy_drop", -0.5)],
)
def test_tampered_metrics_are_measured_again_and_refused(run_dir, tmp_path, field, value):
    directory = run_dir()

    def tamper(record):
        record["candidates"][0][field] = value

    edit_record(directory, tamper)
    store = tmp_path / "mlflow.db"
    code, out = promote(directory, store)
    error = one_error(out)
    assert code == 2 and "Measured again on the test split" in error and field in error, out
    assert not store.exists()  # MLflow was never contacted: nothing logged, nothing registered


def test_an_untampered_run_is_measured_again_and_registered(run_dir, tmp_path):
    store = tmp_path / "mlflow.db"
    code, out = promote(run_dir(), store, "--json")
    assert code == 0, out
    assert json.loads(cli.stdout)["version"] == 1 and registered_versions(f"sqlite:///{store}") == 1


@pytest.mark.parametrize("target", ["/etc/passwd", "../../etc/passwd", "candidate/../../outside.tflite"])
def test_an_artifact_outside_the_run_directory_is_refused_and_not_uploaded(run_dir, tmp_path, target):
    directory = run_dir()
    (tmp_path / "outside.tflite").write_bytes(b"secret")

    def point_out(record):
        record["candidates"][0]["artifact"] = target

    edit_record(directory, point_out)
    store = tmp_path / "mlflow.db"
    for trust in ((), ("--trust-metrics",)):
        code, out = promote(directory, store, *trust)
        assert code == 2 and "outside the run directory" in one_error(out), out
    assert not store.exists()


def test_a_symlink_out_of_the_run_directory_is_refused(run_dir, tmp_path):
    directory = run_dir()
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key=...")
    model = directory / "candidate" / "model.tflite"
    model.unlink()
    model.symlink_to(secret)
    store = tmp_path / "mlflow.db"
    code, out = promote(directory, store, "--trust-metrics")
    assert code == 2 and "outside the run directory" in one_error(out), out
    # A link inside a model directory (a SavedModel's files) is refused too.
    saved = directory / "candidate" / "exported"
    saved.mkdir()
    (saved / "saved_model.pb").symlink_to(secret)
    with pytest.raises(KfoptError, match="symbolic link"):
        rundir.resolve_artifact(directory, saved)
    assert not store.exists()


def test_a_replaced_model_file_or_a_missing_sha256_is_refused(run_dir, tmp_path):
    directory = run_dir()
    model = directory / "candidate" / "model.tflite"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")  # one byte changed
    code, out = promote(directory, tmp_path / "mlflow.db", "--trust-metrics")
    assert code == 2 and "its sha256 differs" in one_error(out), out

    directory = run_dir()
    edit_record(directory, lambda record: record["candidates"][0].pop("artifact_sha256"))
    code, out = promote(directory, tmp_path / "mlflow.db", "--trust-metrics")
    assert code == 2 and "no sha256" in one_error(out), out
    assert not (tmp_path / "mlflow.db").exists()


def test_metrics_json_lists_relative_paths_with_their_sha256(finished):
    record = json.loads((finished / "dynamic" / METRICS_FILE).read_text())
    for entry in (record["baseline"], *record["candidates"]):
        assert not Path(entry["artifact"]).is_absolute() and ".." not in entry["artifact"]
        assert entry["artifact_sha256"] == rundir.digest(finished / "dynamic" / entry["artifact"])


def test_where_the_model_goes_is_never_read_from_metrics_json(run_dir, tmp_path):
    directory = run_dir()

    def redirect(record):
        record["tracking"] = {"status": "failed", "uri": "http://127.0.0.1:9", "registered_model": "prod-model"}

    edit_record(directory, redirect)
    code, out = cli("promote", "--from", directory)
    error = one_error(out)
    # Exit 2 (not 3): nothing was sent to the URI; the message shows what the run asked for, to confirm.
    assert code == 2 and "--registered-model prod-model --tracking-uri http://127.0.0.1:9" in error, out


def test_a_py_loader_named_by_metrics_json_never_runs(run_dir, tmp_path, monkeypatch):
    marker = tmp_path / "loader-ran"
    (tmp_path / "evil_loader.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\ndef load():\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    directory = run_dir()
    edit_record(directory, lambda record: record.update(data="py:evil_loader:load"))
    code, out = promote(directory, tmp_path / "mlflow.db")
    assert code == 2 and "runs no code a run directory names" in one_error(out), out
    assert not marker.exists()


# -- one writer per run directory -------------------------------------------------------------
@pytest.fixture
def held_lock(tmp_path):
    """Another process holding the lock of a run directory, as `kfopt optimize` would."""
    out = tmp_path / "out"
    code = "import sys, time\nfrom kfopt import rundir\nwith rundir.locked(sys.argv[1], 'kfopt optimize'):\n"
    code += "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield out, holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command", ["optimize", "search", "run"])
def test_a_second_run_into_a_locked_out_is_refused_naming_the_holder(held_lock, tiny, command):
    out, holder = held_lock
    args = ["--model", tiny / "model.keras", "--data", tiny / "data.npz", "--out", out]
    args += ["--recipe", RECIPE] if command != "run" else ["--rounds", "0"]
    code, output = cli(command, *args)
    error = one_error(output)
    assert code == 2 and f"in use by another kfopt process (pid {holder.pid}, kfopt optimize, started" in error
    assert not (out / "baseline").exists() and not (out / "pipeline-root").exists()  # before any work


def test_the_lock_is_released_when_its_holder_dies(held_lock):
    out, holder = held_lock
    with pytest.raises(KfoptError, match="in use by another kfopt process"), rundir.locked(out, "kfopt search"):
        pass
    holder.kill()
    holder.wait()
    with rundir.locked(out, "kfopt search"):  # the system released it: no stale lock
        holder_info = json.loads((out / LOCK_FILE).read_text())
        assert holder_info["pid"] == os.getpid() and holder_info["command"] == "kfopt search"


def test_the_input_model_is_never_inside_what_the_run_replaces(run_dir, tiny):
    out = run_dir()
    model = out / "candidate" / "model.keras"
    shutil.copyfile(tiny / "model.keras", model)
    data = out / "baseline" / "data.npz"
    shutil.copyfile(tiny / "data.npz", data)
    for args in (["--model", model, "--data", tiny / "data.npz"], ["--model", tiny / "model.keras", "--data", data]):
        code, output = cli("optimize", *args, "--recipe", RECIPE, "--out", out)
        assert code == 2 and "it would be deleted before it is read" in one_error(output), output
    code, output = cli("optimize", "--model", out, "--recipe", RECIPE, "--out", out)
    assert code == 2 and "the output directory itself" in one_error(output)
    assert model.is_file() and data.is_file() and (out / METRICS_FILE).is_file()  # nothing was touched


def test_a_wrong_path_or_bad_data_loses_nothing_of_the_earlier_run(run_dir, tiny, tmp_path):
    out = run_dir()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_test=np.zeros((4, 3), "float32"), y_test=np.zeros(4, "int64"))  # the model takes 64 features
    for args in (["--data", tmp_path / "nope.npz"], ["--data", bad]):
        for command in ("optimize", "search"):
            code, output = cli(command, "--model", tiny / "model.keras", *args, "--recipe", RECIPE, "--out", out)
            assert code == 2, output
            after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
            assert after == before, f"{command} {args}: {set(before) ^ set(after)}"


def test_a_rerun_killed_while_loading_keeps_the_earlier_run_and_removes_temporary_files(run_dir):
    """SIGTERM while a re-run into a finished --out trains its baseline: the earlier record is intact (it is
    replaced only once the model and data loaded), temporary files are removed, the lock is released."""
    out = run_dir()
    record = (out / METRICS_FILE).read_bytes()
    (out / ".metrics.json.999.tmp").write_text("{")  # left by a run killed earlier
    command = [sys.executable, "-m", "kfopt.cli", "optimize", "--model", "demo:mlp", "--epochs", "300"]
    process = subprocess.Popen(
        [*command, "--recipe", RECIPE, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while str(process.pid) not in (out / LOCK_FILE).read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    # 130, or Python ending the interrupted process by SIGINT itself: what a shell shows as 130 too.
    assert process.returncode in (130, -signal.SIGINT) and "interrupted" in stderr, stderr[-2000:]
    assert (out / METRICS_FILE).read_bytes() == record
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".work-*"))
    assert (out / LOCK_FILE).read_text() == ""
    from kfopt.promotion import verify_run
    from kfopt.result import RunResult

    verify_run(out, RunResult.load(out))  # every file it lists is there, with its sha256


@pytest.mark.slow
def test_a_stale_tracking_json_from_another_run_is_not_reused(finished, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(finished / "dynamic", first)
    shutil.copytree(finished / "float16", second)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["--tracking-uri", uri, "--registered-model", NAME, "--max-accuracy-drop", BUDGET, "--trust-metrics"]
    code, out = cli("promote", "--from", first, *base)
    assert code == 0, out
    shutil.copyfile(first / TRACKING_FILE, second / TRACKING_FILE)  # as if an earlier run had left it there
    code, out = cli("promote", "--from", second, *base, "--json")
    assert code == 0, out
    assert json.loads(cli.stdout)["version"] == 2 and registered_versions(uri) == 2
    (state,) = json.loads((second / TRACKING_FILE).read_text()).values()
    (earlier,) = json.loads((first / TRACKING_FILE).read_text()).values()
    assert state["parent_run_id"] != earlier["parent_run_id"]
    from kfopt.result import RunResult

    assert state["run_key"] == run_key(RunResult.load(second)) != earlier["run_key"]


@pytest.mark.slow
def test_concurrent_promotions_of_one_directory_register_one_version(mlflow_server, run_dir):
    directory, name = run_dir(), "tiny-concurrent"
    command = [sys.executable, "-m", "kfopt.cli", "promote", "--from", str(directory), "--registered-model", name]
    command += ["--tracking-uri", mlflow_server.uri, "--max-accuracy-drop", BUDGET, "--json"]
    env = {**os.environ, "KFOPT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    if not all(p.returncode == 0 for p in processes):
        pytest.fail("\n\n".join(f"exit {p.returncode}\n{o}\n{e[-3000:]}" for p, (o, e) in zip(processes, outputs)))
    versions = {json.loads(out)["version"] for out, _ in outputs}
    assert versions == {1} and registered_versions(mlflow_server.uri, name) == 1


# -- limits: bombs are refused from their headers ----------------------------------------------
def forged_npz(path: Path, shape=(2**31,)) -> Path:
    """An .npz of a few hundred bytes whose .npy headers claim 16 GiB arrays (float64)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{key}.npy", header.getvalue())
    return path


def test_an_npz_whose_header_claims_a_huge_array_is_refused_without_allocating(tmp_path, tiny):
    bomb = forged_npz(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 2000
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(KfoptError, match="claims a 2147483648 float64 array .16.0 GiB. but stores only"):
            load_data(str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2 and time.monotonic() - started < 5
    code, out = cli("optimize", "--model", tiny / "model.keras", "--data", bomb, "--recipe", RECIPE, "--out", tmp_path)
    assert code == 2 and "a forged header" in one_error(out)


def test_an_npz_over_the_data_limit_is_refused_from_its_zip_headers(tmp_path, tiny):
    bomb = tmp_path / "zeros.npz"
    zeros = np.zeros((1024, 1024, 16), np.float32)  # 64 MiB that compress to a few hundred KiB
    np.savez_compressed(bomb, x_train=zeros, y_train=np.zeros(1024), x_test=zeros, y_test=np.zeros(1024))
    del zeros
    assert bomb.stat().st_size < 2 * 1024**2
    tracemalloc.start()
    try:
        code, out = cli(
            "optimize",
            *("--model", tiny / "model.keras", "--data", bomb, "--recipe", RECIPE, "--out", tmp_path / "o"),
            *("--max-data-bytes", "32MiB"),
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    error = one_error(out)
    assert code == 2 and "unpacks to more than 32.0 MiB" in error and "--max-data-bytes" in error, out
    assert peak < 32 * 1024**2
    code, out = cli(
        "optimize", "--model", "demo:mlp", "--recipe", RECIPE, "--out", tmp_path, "--max-data-bytes", "lots"
    )
    assert code == 2 and "'lots' is not a size" in one_error(out)


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
steps: [*i]
"""


def test_a_billion_laughs_yaml_is_refused_at_once(tmp_path):
    recipe = tmp_path / "lol.yaml"
    recipe.write_text(BILLION_LAUGHS)
    started = time.monotonic()
    with pytest.raises(KfoptError, match="uses a YAML anchor .line 1, column 4.; kfopt refuses anchors and aliases"):
        parse_recipe(str(recipe))
    search = tmp_path / "search.yaml"
    search.write_text("- &x quantize(mode=int8)\n- *x\n")
    code, out = cli("search", "--search", search, "--out", tmp_path / "o")
    assert code == 2 and "Search file" in one_error(out) and "anchors and aliases" in out
    code, out = cli("optimize", "--model", "demo:mlp", "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 2 and "anchors and aliases" in one_error(out)
    assert time.monotonic() - started < 10 and not (tmp_path / "o" / "baseline").exists()


def test_a_yaml_file_over_the_size_limit_is_refused_before_parsing(tmp_path, monkeypatch):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("steps:\n" + "  - quantize: {mode: int8}\n" * 50_000)  # 1.3 MB of recipe
    with pytest.raises(KfoptError, match="larger than 1.0 MiB; refused before parsing"):
        parse_recipe(str(recipe))
    monkeypatch.setenv(MAX_YAML_BYTES_ENV, "2MB")
    assert len(parse_recipe(str(recipe)).steps) == 50_000


# -- exit 2 and one line for every user error --------------------------------------------------
def _npz(tmp_path, name, **change):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype("float32")
    arrays = {"x_train": x[:80], "y_train": np.arange(80) % 3, "x_test": x[80:], "y_test": np.arange(40) % 3}
    arrays.update(change)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _loader(tmp_path, name, source):
    (tmp_path / f"{name}.py").write_text(source)
    return f"py:{name}:load"


def _tf_module(tmp_path):
    from kfopt import _tf

    tf = _tf.tf()

    # A module with no serving signature: nothing kfopt can run without its Python code. (A SavedModel
    # that has one is served and quantized through it: tests/test_zoo.py.)
    module = tf.Module()
    module.weights = tf.Variable([1.0, 2.0])
    tf.saved_model.save(module, str(tmp_path / "module"))
    return tmp_path / "module"


BAD_NAME = "x' OR name LIKE '%"
#: (id, what the error line says, how to build the arguments): the 21 user errors that exited 1 (or 0).
USER_ERRORS = [
    ("text-x", "x_train", lambda t, m: ["--data", _npz(t, "text_x", x_train=np.full((80, 4), "1.5"))]),
    ("text-y", "y_train", lambda t, m: ["--data", _npz(t, "text_y", y_train=np.array(["cat", "dog"] * 40))]),
    ("complex-x", "x_train", lambda t, m: ["--data", _npz(t, "complex", x_train=np.ones((80, 4), complex))]),
    ("empty-x-train", "x_train", lambda t, m: ["--data", _npz(t, "empty", x_train=np.zeros((0, 4), "float32"))]),
    (
        "empty-train-split",
        "x_train",
        lambda t, m: ["--data", _npz(t, "empty2", x_train=np.zeros((0, 4), "float32"), y_train=np.zeros(0, int))],
    ),
    (
        "loader-raises",
        "RuntimeError: bucket gs://nowhere not found",
        lambda t, m: [
            "--data",
            _loader(t, "loader_raises", "def load():\n    raise RuntimeError('bucket gs://nowhere not found')\n"),
        ],
    ),
    (
        "loader-syntax-error",
        "SyntaxError",
        lambda t, m: ["--data", _loader(t, "loader_syntax", "def load(:\n    pass\n")],
    ),
    (
        "loader-import-raises",
        "ValueError: settings.ini missing",
        lambda t, m: [
            "--data",
            _loader(t, "loader_import", "raise ValueError('settings.ini missing')\ndef load(): pass\n"),
        ],
    ),
    ("tf-module-savedmodel", "serving_default", lambda t, m: ["--model", _tf_module(t)]),
    ("http-data", "tf.io.gfile cannot read http://", lambda t, m: ["--data", "http://example.com/data.npz"]),
    ("https-data", "tf.io.gfile cannot read https://", lambda t, m: ["--data", "https://example.com/data.npz"]),
    (
        "labels-out-of-range-prune",
        "labels",
        lambda t, m: ["--data", _npz(t, "high", y_train=np.arange(80) % 5), "--recipe", "prune(epochs=1)"],
    ),
    (
        "negative-labels-prune",
        "labels",
        lambda t, m: ["--data", _npz(t, "negative", y_train=np.arange(80) % 3 - 1), "--recipe", "prune(epochs=1)"],
    ),
    ("epochs-optimize", "--epochs -5", lambda t, m: ["--epochs", "-5"]),
    ("budget-in-points", "larger than all it can lose", lambda t, m: ["--max-accuracy-drop", "5"]),
    ("name-optimize", "is not usable", lambda t, m: ["--registered-model", BAD_NAME]),
]
#: The same checks in the other commands: (id, message, full argument list).
OTHER_COMMANDS = [
    ("epochs-search", "--epochs -5", lambda t, m: ["search", "--epochs", "-5", "--out", t / "o"]),
    ("epochs-run", "--epochs -5", lambda t, m: ["run", "--epochs", "-5", "--out", t / "o"]),
    ("name-run", "is not usable", lambda t, m: ["run", "--registered-model", BAD_NAME, "--out", t / "o"]),
    (
        "name-submit",
        "is not usable",
        lambda t, m: ["submit", "--host", "http://127.0.0.1:9", "--registered-model", BAD_NAME],
    ),
    ("name-promote", "is not usable", lambda t, m: ["promote", "--from", t, "--registered-model", BAD_NAME]),
    ("name-history", "is not usable", lambda t, m: ["history", BAD_NAME]),
]


@pytest.mark.parametrize("case, message, build", USER_ERRORS, ids=[c[0] for c in USER_ERRORS])
def test_user_errors_of_optimize_exit_2_with_one_line(case, message, build, tiny, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    args = build(tmp_path, tiny)
    defaults = {"--model": tiny / "model.keras", "--data": tiny / "data.npz", "--recipe": RECIPE}
    for option, value in defaults.items():
        if option not in args:
            args += [option, value]
    code, out = cli("optimize", *args, "--out", tmp_path / "out")
    assert code == 2 and message in one_error(out), out
    assert not (tmp_path / "out" / "candidate").exists()


@pytest.mark.parametrize("case, message, build", OTHER_COMMANDS, ids=[c[0] for c in OTHER_COMMANDS])
def test_user_errors_of_the_other_commands_exit_2_with_one_line(case, message, build, tiny, tmp_path):
    code, out = cli(*build(tmp_path, tiny))
    assert code == 2 and message in one_error(out), out
    assert not (tmp_path / "o").exists()


def test_the_python_api_checks_registered_model_names_too(tiny, tmp_path):
    import kfopt

    with pytest.raises(KfoptError, match="is not usable"):
        kfopt.optimize(
            str(tiny / "model.keras"), str(tiny / "data.npz"), RECIPE, out=tmp_path, registered_model=BAD_NAME
        )
    assert not (tmp_path / "baseline").exists()


# -- model code never runs without --unsafe, whatever the format ---------------------
def _lambda_model(marker):
    from kfopt import _tf

    keras = _tf.keras()
    inputs = keras.Input((4,))
    # The lambda leaves a marker when Keras runs it: that is the code a safe load must never run.
    where = str(marker)
    outputs = keras.layers.Lambda(lambda x: x * float(__import__("pathlib").Path(where).touch() or 1), name="sneaky")(
        inputs
    )
    return keras.Model(inputs, outputs)


def _escaped(text: str) -> str:
    return text.replace('"Lambda"', '"\\u004cambda"')


@pytest.mark.parametrize("form", ["h5", "saved_model", "distill_student"])
def test_an_escaped_lambda_class_name_is_still_refused(form, tmp_path):
    import h5py

    from kfopt.models import load_keras

    marker = tmp_path / "ran"
    model = _lambda_model(marker)
    marker.unlink(missing_ok=True)  # building the model ran it once; loading must not
    if form == "saved_model":
        from tf_keras.protobuf import saved_metadata_pb2

        path = tmp_path / "model"
        model.save(path, save_format="tf")
        saved = saved_metadata_pb2.SavedMetadata()
        saved.ParseFromString((path / "keras_metadata.pb").read_bytes())
        for node in saved.nodes:
            node.metadata = _escaped(node.metadata)
        (path / "keras_metadata.pb").write_bytes(saved.SerializeToString())
    else:
        path = tmp_path / "model.h5"
        model.save(path)
        with h5py.File(path, "r+") as f:
            config = f.attrs["model_config"]
            f.attrs["model_config"] = _escaped(config.decode() if isinstance(config, bytes) else config)
    marker.unlink(missing_ok=True)
    load = load_keras
    if form == "distill_student":  # distill(student=FILE) loads the student the same safe way
        from kfopt.plugins.distill import _load_student

        def load(student):
            return _load_student(str(student), teacher=None)

    with pytest.raises(KfoptError, match="Lambda layer 'sneaky'.*refused in safe mode"):
        load(path)
    assert not marker.exists(), "the model's Python code ran during a safe load"


# -- finite or failed ------------------------------------------------------------------
class _Diverge:
    """A plugin whose technique 'fine-tunes' into NaN weights, as a diverging learning rate does."""

    @staticmethod
    def technique():
        from pydantic import Field  # noqa: F401

        from kfopt.plugins import ModelHandle, Technique, copy_model

        class Diverge(Technique):
            name = "diverge"
            kind = "compress"
            accepts = {"keras"}
            produces = "keras"

            def apply(self, model, config, ctx):
                copy = copy_model(model.keras())
                copy.set_weights([np.full_like(w, np.nan) for w in copy.get_weights()])
                return ModelHandle.from_keras(copy)

        return Diverge()


def test_a_candidate_with_nan_weights_fails_and_never_wins(tmp_path):
    from types import SimpleNamespace

    from kfopt.engine import optimize
    from kfopt.plugins import hookimpl

    plugin = SimpleNamespace(kfopt_register_techniques=hookimpl(lambda register: register(_Diverge.technique())))
    result = optimize("demo:mlp", "digits", "diverge", tmp_path / "out", epochs=2, extra_plugins=[plugin])
    [candidate] = result.candidates
    assert candidate.status == "failed" and candidate.reason.startswith("non-finite:"), candidate.reason
    assert result.winner is None
