"""The command line: tables, JSON, and one clear line with exit 2 for every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kfopt.cli import main

#: The installed console script, next to the interpreter running the tests.
KFOPT = str(Path(sys.executable).parent / "kfopt")


def run(*args):
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output, result.stderr if hasattr(result, "stderr") else ""


def test_import_and_help_do_not_import_tensorflow():
    code = "import sys, kfopt, kfopt.cli, kfopt.plugins; from kfopt.plugins.manager import registry; registry(); print('tensorflow' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
    help_text = subprocess.run([KFOPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert "optimize" in help_text and "plugins" in help_text


def test_plugins_lists_the_four_techniques():
    code, out, _ = run("plugins", "--json")
    assert code == 0
    listed = {p["name"]: p for p in json.loads(out)}
    assert set(listed) == {"prune", "quantize", "distill", "accelerate"}
    assert listed["quantize"]["produces"] == "tflite" and listed["prune"]["package"] == "kfopt"
    code, out, _ = run("plugins")
    assert code == 0 and "target_sparsity" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "missing.keras"], "Model 'missing.keras' does not exist"),
        (["--recipe", "prun"], "Unknown technique 'prun'. Did you mean 'prune'?"),
        (["--recipe", "prune(sparsity=0.5)"], "unknown config key 'sparsity'"),
        (["--recipe", "prune(target_sparsity=1.5)"], "target_sparsity=1.5 is invalid"),
        (["--recipe", "quantize(mode=int8)>prune"], "put 'prune' before 'quantize'"),
        (["--data", "missing.npz"], "Data file 'missing.npz' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    base = {
        "--model": "demo:mlp",
        "--data": "digits",
        "--recipe": "quantize(mode=dynamic)",
        "--out": str(tmp_path / "out"),
    }
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, out, _ = run("optimize", *[x for kv in base.items() for x in kv])
    assert code == 2, out
    lines = [line_ for line_ in out.splitlines() if line_.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out
    assert "Traceback" not in out


def test_with_json_a_user_error_is_also_a_json_object_on_stdout(tmp_path):
    args = ["optimize", "--model", str(tmp_path / "missing.keras"), "--recipe", "quantize", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "does not exist" in error["message"] and error["fix"] and error["exit_code"] == 2


def test_corrupt_model_and_unwritable_out(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    code, out, _ = run("optimize", "--model", str(bad), "--recipe", "quantize", "--out", str(tmp_path / "o"))
    assert code == 2 and "not a readable Keras model" in out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, _ = run("optimize", "--model", "demo:mlp", "--recipe", "quantize", "--out", str(blocker / "sub"))
    assert code == 2 and "is not writable" in out


def test_data_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((20, 10)), y_train=np.zeros(20), x_test=np.zeros((5, 10)), y_test=np.zeros(5))
    code, out, _ = run(
        "optimize", "--model", "demo:mlp", "--data", str(path), "--recipe", "quantize", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "inputs of shape (10,), but the model expects (64,)" in out


@pytest.mark.slow
def test_optimize_end_to_end_json(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            KFOPT,
            "optimize",
            "--model",
            "demo:mlp",
            "--data",
            "digits",
            "--epochs",
            "5",
            "--recipe",
            "quantize(mode=int8)",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result) >= {"baseline", "candidates", "winner", "pareto", "registered_model"}
    candidate = result["candidates"][0]
    assert candidate["status"] == "ok" and candidate["format"] == "tflite"
    for key in (
        "accuracy",
        "accuracy_drop",
        "agreement",
        "size_bytes",
        "gzip_bytes",
        "compression_ratio",
        "sparsity",
        "latency_p50_ms",
        "latency_p95_ms",
        "throughput_per_s",
        "speedup",
    ):
        assert candidate[key] is not None, key
    assert candidate["compression_ratio"] > 3
    assert json.loads((out / "metrics.json").read_text())["candidates"][0]["recipe"] == "quantize(mode=int8)"
    assert not list(out.glob("**/.*.tmp"))


def test_search_time_budget_bounds_refinement_never_round_one(tmp_path):
    out = tmp_path / "search"
    result = CliRunner().invoke(
        main,
        [
            "search",
            "--model",
            "demo:mlp",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--recipe",
            "quantize(mode=dynamic)",
            "--rounds",
            "2",
            "--max-time",
            "0.001",
            "--sensitivity",
            "0",
            "--objective",
            "MIX:0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert [(c["round"], c["status"]) for c in saved["candidates"]] == [(1, "ok")]
    assert saved["search"]["stopped"] == "time budget of 0.001 s spent" and saved["search"]["objective"] == "mix:0.3"
    assert "Search stopped: time budget of 0.001 s spent" in result.output
    assert (out / "report.html").is_file() and "Report: file://" in result.output


def test_output_picks_the_scored_output_of_a_two_output_model(tmp_path):
    """--output names the output the budget is on; fine-tuning trains on it; an unknown one is one line."""
    sys.path.insert(0, str(Path(__file__).parent))
    from zoo_models import two_outputs

    path, data = two_outputs(tmp_path)
    even = {**data, "y_train": data["y_train"] % 2 == 0, "y_test": data["y_test"] % 2 == 0}
    np.savez(
        tmp_path / "even.npz", **{k: np.asarray(v, dtype=v.dtype if k[0] == "x" else int) for k, v in even.items()}
    )
    common = ["--model", path, "--data", str(tmp_path / "even.npz"), "--json"]
    code, out, _ = run(
        "search", *common, "--output", "even", "--rounds", "0", "--sensitivity", "0", "--out", str(tmp_path / "s"),
        "--recipe", "prune(target_sparsity=0.5,epochs=1)", "--recipe", "quantize(mode=dynamic)",
    )  # fmt: skip
    assert code == 0, out
    result = json.loads(out)
    assert result["baseline"]["metric_name"] == "binary_accuracy" and result["baseline"]["metric"] > 0.6
    for candidate in result["candidates"]:
        assert candidate["status"] == "ok", candidate
        assert candidate["metric_name"] == "binary_accuracy" and abs(candidate["metric_drop"]) < 0.05
    args = ["optimize", *common, "--output", "odd", "--recipe", "quantize", "--out", str(tmp_path / "o")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    error = json.loads(refused.stdout)["error"]
    assert error["message"].startswith("The model has no output 'odd'; its outputs are 0: digit, 1: even")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_the_winner_line_names_the_best_candidate_that_keeps_the_architecture(capsys):
    from kfopt.cli import _print_result
    from kfopt.result import RunResult

    def candidate(recipe, ratio, speedup):
        return {"recipe": recipe, "status": "ok", "metric_name": "accuracy", "metric": 0.97, "metric_drop": 0.004,
                "accuracy": 0.97, "accuracy_drop": 0.004, "gzip_bytes": 1024, "compression_ratio": ratio,
                "latency_p50_ms": 0.1, "speedup": speedup}  # fmt: skip

    student = "distill(architecture=dense)>quantize(mode=int8)"
    channels = "prune(method=channels,target_sparsity=0.5)>quantize(mode=int8)"
    result = RunResult.of(
        {
            "model": "demo:cnn",
            "data": "digits",
            "baseline": {"accuracy": 0.974, "metric": 0.974, "metric_name": "accuracy"},
            "candidates": [candidate(student, 40.0, 11.4), candidate(channels, 9.0, 2.29)],
            "winner": student,
            "selection": {"objective": "latency", "metric": "latency_p50_ms", "max_accuracy_drop": 0.01},
            "best_same_architecture": channels,
        }
    )
    _print_result(result)
    out = capsys.readouterr().out
    assert "Winner (latency: lowest latency_p50_ms within an accuracy drop of 0.01" in out
    assert f"Best that keeps your architecture (no student of another kind): {channels}:" in out
    assert "9.0x smaller, 2.29x faster" in out


def test_compile_sets_the_retries_of_optimize_and_evaluate_steps(tmp_path):
    code, out, _ = run("compile", "--output", str(tmp_path / "p.yaml"), "--step-retries", "4")
    assert code == 0, out
    compiled = (tmp_path / "p.yaml").read_text()
    assert "maxRetryCount: 4" in compiled and "maxRetryCount: 2" not in compiled
    assert "retried up to 4 times" in out


def test_a_baseline_at_chance_level_gets_a_warning(tmp_path):
    from kfopt import _tf

    keras = _tf.keras()
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(10, activation="softmax", kernel_initializer="zeros")]
    )
    model.save(tmp_path / "untrained.keras")  # predicts class 0 for every digit
    code, output, stderr = run(
        "optimize", "--model", tmp_path / "untrained.keras", "--recipe", "quantize(mode=dynamic)",
        "--out", tmp_path / "out", "--no-tracking",
    )  # fmt: skip
    assert code == 0, output
    assert "warning: the baseline's test accuracy" in stderr and "is at chance level" in stderr, stderr
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(record["warnings"]) == 1
