"""The pipeline caches on content: a model replaced in place is measured anew, an unchanged one is not."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kfopt import _tf
from kfopt.components import fingerprint as fingerprints
from kfopt.components.fingerprint import MISSING, describe, fingerprint
from kfopt.components.status import read_statuses
from kfopt.pipelines.optimize_and_promote import compile_pipeline


def _mlp(path: Path, epochs: int) -> Path:
    """A small Keras MLP on digits, trained ``epochs`` epochs (0: random weights)."""
    from sklearn.datasets import load_digits

    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    if epochs:
        digits = load_digits()
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(digits.data / 16.0, digits.target, epochs=epochs, verbose=0)
    model.save(path)
    return path


def test_the_fingerprint_changes_with_content_and_not_otherwise(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights v1")
    first = fingerprint(str(model), "digits")
    assert len(first) == 64 and fingerprint(str(model), "digits") == first
    os.utime(model, (time.time() + 60, time.time() + 60))  # touched, same bytes: same key
    assert fingerprint(str(model), "digits") == first
    model.write_bytes(b"weights v2")  # replaced in place: a new key
    assert fingerprint(str(model), "digits") != first

    saved = tmp_path / "saved_model"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"graph")
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(b"v1")
    before = describe(str(saved))
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(b"v2")  # only a nested file changed
    assert describe(str(saved)) != before

    data = tmp_path / "data.npz"
    np.savez(data, x_train=np.zeros((2, 3)))
    key = fingerprint(str(model), str(data))
    np.savez(data, x_train=np.ones((2, 3)))
    assert fingerprint(str(model), str(data)) != key
    assert describe(str(tmp_path / "none.keras")) == MISSING  # prepare says what is wrong, as without this step
    assert describe("demo:mlp").startswith("kfopt ") and describe("digits").startswith("scikit-learn ")


def test_a_python_loader_is_never_cached_unless_its_module_declares_a_fingerprint(tmp_path, monkeypatch):
    # The same loader code may read rewritten files: its source says nothing of its data.
    (tmp_path / "fp_plain_loader.py").write_text("def load():\n    return None\n")
    (tmp_path / "fp_declared_loader.py").write_text(
        "VERSION = 'v1'\n\ndef kfopt_fingerprint():\n    return VERSION\n\ndef load():\n    return None\n"
    )
    (tmp_path / "fp_broken_loader.py").write_text("raise RuntimeError('no credentials')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = "py:fp_plain_loader:load"
    assert fingerprint("demo:mlp", plain) != fingerprint("demo:mlp", plain)
    declared = "py:fp_declared_loader:load"
    first = fingerprint("demo:mlp", declared)
    assert fingerprint("demo:mlp", declared) == first and describe(declared).startswith("kfopt_fingerprint: v1\n")
    import fp_declared_loader

    monkeypatch.setattr(fp_declared_loader, "VERSION", "v2")  # the loader says its data changed
    assert fingerprint("demo:mlp", declared) != first
    # New preprocessing in the loader over the same data version is new data.
    before_edit = fingerprint("demo:mlp", declared)
    source = tmp_path / "fp_declared_loader.py"
    source.write_text(source.read_text() + "\nSCALE = 2\n")
    assert fingerprint("demo:mlp", declared) != before_edit
    (tmp_path / "fp_exits_loader.py").write_text("import sys\nsys.exit(2)\n")
    # A module that fails to import (or exits), or one that does not exist: a new key each time, never a failure.
    for spec in ("py:fp_broken_loader:load", "py:fp_exits_loader:load", "py:fp_no_such_module:load"):
        assert fingerprint("demo:mlp", spec) != fingerprint("demo:mlp", spec)


def test_the_fingerprint_holds_the_kfopt_and_plugin_versions(monkeypatch):
    import kfopt

    versions = fingerprints.code_versions()
    assert versions.splitlines()[0] == f"kfopt {kfopt.__version__}"
    before = fingerprint("demo:mlp", "digits")
    monkeypatch.setattr(kfopt, "__version__", kfopt.__version__ + ".post1")  # an upgrade runs anew
    assert fingerprints.code_versions() != versions and fingerprint("demo:mlp", "digits") != before


def test_remote_uris_are_fingerprinted_by_what_gfile_stat_says(tmp_path):
    # file:// goes through tf.io.gfile like gs:// and s3:// do: size and modification time, no download.
    model = tmp_path / "remote.keras"
    model.write_bytes(b"abc")
    uri = f"file://{model}"
    first = describe(uri)
    assert "3" in first.split("\0")
    model.write_bytes(b"abcd")
    assert describe(uri) != first
    assert describe(f"file://{tmp_path}/missing.keras") == MISSING


def test_compiled_prepare_keys_its_cache_on_a_fingerprint_step_that_is_never_cached(tmp_path):
    path = compile_pipeline(tmp_path / "p.yaml", ["quantize(mode=int8)"], rounds=0)
    tasks = yaml.safe_load(Path(path).read_text())["root"]["dag"]["tasks"]
    assert tasks["fingerprint"]["cachingOptions"] == {}  # never cached: it must look at the content every run
    assert tasks["fingerprint"]["inputs"]["parameters"]["model"]["componentInputParameter"] == "model"
    assert tasks["fingerprint"]["inputs"]["parameters"]["data"]["componentInputParameter"] == "data"
    prepare = tasks["prepare"]
    assert prepare["cachingOptions"] == {"enableCache": True}
    source = prepare["inputs"]["parameters"]["fingerprint"]["taskOutputParameter"]
    assert source == {"producerTask": "fingerprint", "outputParameterKey": "Output"}
    assert "fingerprint" in prepare["dependentTasks"]


@pytest.mark.slow
def test_a_kfp_local_rerun_measures_a_model_replaced_in_place_and_reuses_an_unchanged_one(tmp_path):
    from kfopt.pipelines.runners import run_local

    model = _mlp(tmp_path / "model.keras", epochs=20)
    data = tmp_path / "digits.npz"
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    np.savez(data, x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])

    def run(**options):
        before = set((tmp_path / "out" / "pipeline-root").glob("*"))
        result = run_local(
            ["quantize(mode=dynamic)"],
            model=str(model),
            data=str(data),
            out=tmp_path / "out",
            rounds=0,
            max_accuracy_drop=0.5,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            **options,
        )
        [run_dir] = set((tmp_path / "out" / "pipeline-root").glob("*")) - before
        return result, {s.step for s in read_statuses(run_dir)}

    first, ran = run()
    assert {"fingerprint", "prepare", "optimize-group", "select", "promote"} <= ran
    assert first.baseline.accuracy > 0.8

    again, ran = run()  # same content: prepare and everything after it come from the cache
    assert "fingerprint" in ran and "promote" in ran and "prepare" not in ran and "optimize-group" not in ran
    assert again.baseline.accuracy == first.baseline.accuracy

    _mlp(model, epochs=0)  # the same path, new content: random weights
    replaced, ran = run()
    assert "prepare" in ran and "optimize-group" in ran
    assert replaced.baseline.accuracy < 0.5  # the new baseline was measured, not the cached one

    _, ran = run(cache=False)  # --no-cache: every step anew
    assert "prepare" in ran and "optimize-group" in ran


def test_cli_run_and_submit_take_no_cache():
    from kfopt.cli import main

    runner = CliRunner()
    for command in ("run", "submit"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "--no-cache" in result.output, command


def test_cli_run_keeps_refining_by_default_and_says_so():
    from kfopt.cli import main
    from kfopt.pipelines.runners import RUN_ROUNDS

    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert f"[default: refine while a round gains, at most {RUN_ROUNDS} rounds]" in text
