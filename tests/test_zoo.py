"""The architectures users bring, through the post-training techniques, and the plumbing under them.

Every model of tests/zoo_models.py (keras.applications MobileNetV2 and
EfficientNetB0 at 32x32, a ResNet, a Transformer encoder, LSTM and GRU text
classifiers on integer tokens, a two-input and a two-output model, a subclassed
model's SavedModel, and the same MLP in tf_keras and Keras 3) is built with
random weights, trained briefly, and run through quantize dynamic / int8 /
float16 by the in-process search (one baseline, every recipe a candidate). A
failing recipe must be a failed or skipped candidate with one line, never a
failed run; what can be checked before work is checked before the baseline is
measured. bench/zoo.py runs every technique on the same zoo.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from zoo_models import (
    ZOO,
    mlp_tf_keras,
    resnet,
    subclassed_saved_model,
    token_sequences,
    two_inputs,
    two_outputs,
)

from kfopt.errors import KfoptError
from kfopt.recipe_search import search

RECIPES = ["quantize(mode=dynamic)", "quantize(mode=int8,calibration_samples=64)", "quantize(mode=float16)"]
KFOPT = str(Path(sys.executable).with_name("kfopt"))


def _search(path, data, out, recipes=RECIPES):
    return search(path, data, out, recipes=list(recipes), rounds=0, latency_runs=5, sensitivity=None)


@pytest.mark.parametrize("zoo", [pytest.param(z, marks=[pytest.mark.slow] if z.slow else [], id=z.name) for z in ZOO])
def test_post_training_quantization_works_on(zoo, tmp_path):
    path, data = zoo.build(tmp_path)
    result = _search(path, data, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").exists()
    base = result.baseline.metric
    assert 0 <= base <= 1
    for candidate in result.candidates:
        assert candidate.status == "ok", f"{candidate.recipe}: {candidate.reason}"
        assert 0 <= candidate.metric <= 1 and math.isfinite(candidate.metric_drop)
        # A briefly trained model that beats chance keeps its answers through quantization.
        if base > 0.5:
            assert abs(candidate.metric_drop) <= 0.08, candidate.recipe
        assert candidate.size_bytes > 0 and candidate.compression_ratio > 0
        assert candidate.tflite_ops.startswith("TFLite builtins")
        assert "Select TF ops" not in candidate.tflite_ops
    CHECKS.get(zoo.name, lambda result, run: None)(result, tmp_path / "run")


def _interpreter(run: Path, candidate):
    from kfopt.evaluate import TFLiteRunner

    return TFLiteRunner((run / candidate.artifact).read_bytes())


def _token_ids_stay_int32(result, run):
    """Token ids reach the interpreter as the int32 the model takes (int8 does not quantize them)."""
    for candidate in result.candidates:
        assert _interpreter(run, candidate).input_details[0]["dtype"] == np.int32, candidate.recipe


def _lstm_is_fused(result, run):
    """One fused LSTM op, converted at batch 1 (its state reset per call), in float and int8 alike."""
    _token_ids_stay_int32(result, run)
    assert result.baseline.metric > 0.9
    for candidate in result.candidates:
        assert candidate.tflite_ops == "TFLite builtins, batch 1"
        ops = {op["op_name"] for op in _interpreter(run, candidate).interpreter._get_ops_details()}
        assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in ops and "WHILE" not in ops


def _gru_is_unrolled(result, run):
    """No fused GRU in TFLite: unrolled over the fixed sequence, any batch size, no loop to calibrate."""
    _token_ids_stay_int32(result, run)
    for candidate in result.candidates:
        assert candidate.tflite_ops == "TFLite builtins"
        ops = {op["op_name"] for op in _interpreter(run, candidate).interpreter._get_ops_details()}
        assert "WHILE" not in ops
    assert next(c for c in result.candidates if "dynamic" in c.recipe).float_ops is None  # a float model


CHECKS = {"transformer": _token_ids_stay_int32, "lstm": _lstm_is_fused, "gru": _gru_is_unrolled}


def test_the_metric_is_computed_on_the_chosen_output(tmp_path):
    from kfopt.data import load_data
    from kfopt.evaluate import Evaluator, runner_for
    from kfopt.models import load_keras
    from kfopt.plugins import ModelHandle

    path, data = two_outputs(tmp_path)
    handle = ModelHandle.from_keras(load_keras(path))
    digits = Evaluator(load_data(data), handle, tmp_path / "digit", latency_runs=2)
    assert digits.output == "digit" and digits.task.kind == "multiclass"
    even = {**data, "y_train": (data["y_train"] % 2 == 0).astype(int), "y_test": (data["y_test"] % 2 == 0).astype(int)}
    by_index = Evaluator(load_data(even), handle, tmp_path / "even", latency_runs=2, output=1)
    assert by_index.output == "even" and by_index.task.kind == "binary"
    assert by_index.baseline_metrics()["metric"] > 0.6
    # Every runner returns every output, by name, whatever order its format keeps them in.
    from kfopt.convert import to_tflite

    tflite = runner_for(ModelHandle.from_tflite(to_tflite(handle.keras(), "fp32")), "even")
    x = data["x_test"][:8]
    assert sorted(tflite.output_names) == ["digit", "even"]
    np.testing.assert_allclose(tflite(x), handle.keras().predict(x, verbose=0)[1], atol=1e-5)
    with pytest.raises(KfoptError, match="no output 'odd'; its outputs are 0: digit, 1: even"):
        Evaluator(load_data(data), handle, tmp_path / "odd", output="odd")
    # kfopt optimize scores a TFLite candidate on the same output.
    from kfopt.engine import optimize

    result = optimize(path, even, "quantize(mode=dynamic)", tmp_path / "run", output="even")
    assert result.baseline.metric_name == "binary_accuracy"
    assert result.candidates[0].status == "ok" and abs(result.candidates[0].metric_drop) < 0.02


def test_a_resnet_distills_to_a_narrower_student(tmp_path):
    """A width-0.5 student of the ResNet has a 1x1 stride-2 projection on 8 channels, and the training split
    (1437 digits) ends in a batch of 29: TensorFlow's oneDNN kernel gradient for that convolution used to corrupt
    the heap and kill the process. Run as a user would (kfopt optimize), so a crash fails this test, not pytest."""
    path, data = resnet(tmp_path)
    assert len(data["x_train"]) % 32 % 2 == 1  # the last batch has an odd size
    np.savez(tmp_path / "data.npz", **data)
    proc = subprocess.run(
        [KFOPT, "optimize", "--model", path, "--data", str(tmp_path / "data.npz"), "--json"]
        + ["--recipe", "distill(width=0.5,epochs=1)", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (candidate,) = json.loads(proc.stdout)["candidates"]
    assert candidate["status"] == "ok", candidate.get("reason")
    assert math.isfinite(candidate["metric"]) and math.isfinite(candidate["metric_drop"])
    assert 0 < candidate["params"] < json.loads(proc.stdout)["baseline"]["params"] / 2


# -- a failing recipe is a failed candidate; a refusal comes before any work ----------------------
def test_data_that_does_not_fit_two_inputs_stops_before_the_baseline_in_one_line(tmp_path):
    path, data = two_inputs(tmp_path)
    flat = np.concatenate([data["x_test_left"], data["x_test_right"]], axis=1)
    np.savez(tmp_path / "flat.npz", x_train=flat, y_train=data["y_test"], x_test=flat, y_test=data["y_test"])
    proc = subprocess.run(
        [KFOPT, "optimize", "--model", path, "--data", str(tmp_path / "flat.npz"), "--recipe", "quantize"]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "1 input array (x: (64,) float32), but the model takes 2 inputs: left (32,) float32, right (32,)" in line
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_savedmodel_without_keras_layers_refuses_prune_first_and_quantizes_in_a_search(tmp_path):
    from kfopt.engine import optimize

    path, data = subclassed_saved_model(tmp_path)
    with pytest.raises(KfoptError, match="step 1 'prune' needs a keras model, but the model is a SavedModel"):
        optimize(path, data, "prune", tmp_path / "refused")
    assert not (tmp_path / "refused" / "baseline").exists()  # refused before the baseline was measured
    result = _search(path, data, tmp_path / "search", ["prune", "quantize(mode=qat)", "quantize(mode=int8)"])
    status = {c.recipe: (c.status, c.reason) for c in result.candidates}
    assert status["prune"][0] == "skipped" and "SavedModel without Keras layers" in status["prune"][1]
    assert status["quantize(mode=qat)"][0] == "skipped" and "fine-tunes Keras layers" in status["quantize(mode=qat)"][1]
    assert status["quantize(mode=int8)"][0] == "ok"
    assert json.loads((tmp_path / "search" / "metrics.json").read_text())["candidates"]
    with pytest.raises(KfoptError, match="No recipe of the search can run on this model"):
        _search(path, data, tmp_path / "nothing", ["prune", "distill"])


def test_a_technique_that_raises_a_kfopt_error_fails_only_its_candidate(tmp_path):
    from kfopt.engine import optimize
    from kfopt.plugins import Technique, hookimpl

    class Refuses(Technique):
        name, kind = "refuses", "compress"

        def check(self, model, config):
            if model.recurrent:
                raise KfoptError("refuses cannot take recurrent layers.", "use another technique.")

        def apply(self, model, config, ctx):
            raise KfoptError("refuses found a layer it cannot handle.", "keep that layer dense.")

    class Plugin:
        @hookimpl
        def kfopt_register_techniques(self, register):
            register(Refuses())

    path, data = mlp_tf_keras(tmp_path)
    result = optimize(path, data, "refuses", tmp_path / "run", extra_plugins=[Plugin()])
    (candidate,) = result.candidates
    assert candidate.status == "failed" and candidate.traceback is None
    assert candidate.reason == (
        "technique 'refuses' failed: refuses found a layer it cannot handle. Fix: keep that layer dense."
    )
    assert (tmp_path / "run" / "metrics.json").exists()
    # check() refuses before anything is measured.
    path, data = token_sequences_model(tmp_path)
    with pytest.raises(KfoptError, match="refuses cannot take recurrent layers"):
        optimize(path, data, "refuses", tmp_path / "refused", extra_plugins=[Plugin()])
    assert not (tmp_path / "refused" / "baseline").exists()


def token_sequences_model(tmp_path):
    """An untrained GRU on token ids: enough for a structural refusal."""
    from kfopt import _tf

    keras = _tf.keras()
    model = keras.Sequential(
        [keras.Input((24,), dtype="int32"), keras.layers.Embedding(64, 4), keras.layers.GRU(4), keras.layers.Dense(3)]
    )
    model.save(tmp_path / "gru.keras")
    return str(tmp_path / "gru.keras"), token_sequences(300)
