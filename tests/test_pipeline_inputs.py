"""What a user brings reaches every pipeline step: a SavedModel baseline, a relative budget, the scored output."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kfopt import _tf
from kfopt.components import steps
from kfopt.errors import KfoptError
from kfopt.pipelines.optimize_and_promote import compile_pipeline

sys.path.insert(0, str(Path(__file__).parent))

from conftest import baseline_record  # noqa: E402
from zoo_models import digits_flat, subclassed_saved_model  # noqa: E402


def _npz(path: Path, data: dict) -> str:
    np.savez(path, **data)
    return str(path)


@pytest.mark.slow
def test_a_savedmodel_baseline_goes_through_every_step_in_its_own_format(tmp_path):
    model, data = subclassed_saved_model(tmp_path)
    spec = _npz(tmp_path / "digits.npz", data)
    record = steps.prepare_step(model, spec, tmp_path / "baseline", tmp_path / "data")
    assert (
        record["format"] == "saved_model" and (tmp_path / "baseline" / record["artifact"] / "saved_model.pb").is_file()
    )
    assert record["metrics"]["accuracy"] > 0.8

    handle, info = steps.load_baseline(tmp_path / "baseline")
    assert handle.format == "saved_model" and info["format"] == "saved_model"
    group = steps.optimize_group_step(
        [{"position": 0, "recipe": "quantize(mode=dynamic)"}, {"position": 1, "recipe": "quantize(mode=float16)"}],
        tmp_path / "baseline",
        tmp_path / "data",
        tmp_path / "group",
    )
    assert [c.status for c in group] == ["ok", "ok"], [c.reason for c in group]
    for candidate in group:
        assert candidate.format == "tflite" and abs(candidate.accuracy_drop) <= 0.05
    result = steps.select_step(
        tmp_path / "baseline", [tmp_path / "group"], tmp_path / "results", max_accuracy_drop="1%"
    )
    assert [c.recipe for c in result.candidates] == ["quantize(mode=dynamic)", "quantize(mode=float16)"]
    assert Path(result.baseline.artifact).name == "saved_model" and Path(result.baseline.artifact).is_dir()

    # A search plan on it: no Keras layers to measure sensitivity on or to prune channels of, never a crash.
    plan = steps.plan_search_step(
        tmp_path / "baseline", tmp_path / "plan", rounds=1, objective="latency", channels_at=2
    )
    assert plan["round_one"] == []
    (noop,) = [json.loads(i) for i in steps.round_one_items(plan)]
    assert noop["round"] == 1 and steps.STOPPED in noop
    rows = steps.sensitivity_step(tmp_path / "baseline", tmp_path / "data", tmp_path / "plan", tmp_path / "search")
    assert rows == [] and json.loads((tmp_path / "search" / steps.SEARCH_FILE).read_text())["layer_sensitivity"] == []


def _digit_second(directory: Path) -> str:
    """Two outputs: a one-unit 'bias' head first, the digit classifier second (the labels are the digit's)."""
    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    bias = keras.layers.Dense(1, name="bias")(hidden)
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(hidden)
    model = keras.Model(inputs, [bias, digit])
    data = digits_flat()
    model.compile("adam", loss={"bias": "mse", "digit": "sparse_categorical_crossentropy"})
    model.fit(data["x_train"], {"bias": np.zeros(len(data["y_train"])), "digit": data["y_train"]}, epochs=8, verbose=0)
    path = directory / "two_outputs.keras"
    model.save(path)
    return str(path), data


@pytest.mark.slow
def test_the_output_the_metric_is_computed_on_reaches_optimize_and_evaluate(tmp_path):
    model, data = _digit_second(tmp_path)
    spec = _npz(tmp_path / "digits.npz", data)
    record = steps.prepare_step(model, spec, tmp_path / "baseline", tmp_path / "data", output="1")
    assert record["output"] == "digit"  # an index becomes the output's name, which holds across formats
    assert json.loads((tmp_path / "baseline" / steps.BASELINE_FILE).read_text())["output"] == "digit"
    assert record["metrics"]["accuracy"] > 0.8  # the digit head: the first output would not score as a classifier

    direct = steps.optimize_step("quantize(mode=dynamic)", tmp_path / "baseline", tmp_path / "data", tmp_path / "c1")
    assert direct.status == "ok" and direct.accuracy > 0.8 and abs(direct.accuracy_drop) <= 0.02
    # Fine-tuned on another pool and measured apart: the evaluate step scores the same output.
    apart = steps.optimize_step(
        "prune(target_sparsity=0.3,epochs=1)", tmp_path / "baseline", tmp_path / "data", tmp_path / "c2", measure=False
    )
    assert apart.status == "ok", apart.reason
    measured = steps.evaluate_step(tmp_path / "c2", tmp_path / "baseline", tmp_path / "data", tmp_path / "c3")
    assert measured.status == "ok" and measured.accuracy > 0.8 and abs(measured.accuracy_drop) <= 0.05

    # The layer sensitivity the search plan gets scores the same output, in the run's metric.
    steps.plan_search_step(tmp_path / "baseline", tmp_path / "plan", rounds=1)
    rows = steps.sensitivity_step(tmp_path / "baseline", tmp_path / "data", tmp_path / "plan", tmp_path / "search")
    assert rows and {r["metric"] for r in rows} == {"accuracy"}
    assert json.loads((tmp_path / "search" / steps.SEARCH_FILE).read_text())["layer_sensitivity"] == rows
    # The unpruned value is the digit head's accuracy: the bias head would not score so.
    assert all(r["val_metric"] + r["val_metric_drop"] > 0.8 for r in rows)
    mae = steps.prepare_step(model, spec, tmp_path / "b-mae", tmp_path / "d-mae", output="bias", metric="mae")
    assert mae["task"]["metric"] == "mae"
    rows = steps.sensitivity_step(tmp_path / "b-mae", tmp_path / "d-mae", tmp_path / "plan", tmp_path / "search-mae")
    assert {r["metric"] for r in rows} == {"mae"}


def test_select_takes_a_relative_budget_from_a_pipeline_parameter(tmp_path):
    baseline = baseline_record(tmp_path / "baseline", accuracy=0.9)

    def candidate(name, accuracy, gzip_bytes):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "model.tflite").write_bytes(b"tflite")
        drop = 0.9 - accuracy
        record = {
            "recipe": name,
            "status": "ok",
            "artifact": "model.tflite",
            "format": "tflite",
            "accuracy": accuracy,
            "accuracy_drop": drop,
            "gzip_bytes": gzip_bytes,
        }
        (directory / steps.CANDIDATE_FILE).write_text(json.dumps(record))
        return directory

    # 1.5 points is 1.7% of 0.9: within "2%", over "1%" and over the absolute 0.01.
    dirs = [candidate("small", 0.885, 1000), candidate("big", 0.9, 5000)]
    for budget, winner in (("2%", "small"), ("1%", "big"), ("0.01", "big"), ("0.02", "small")):
        result = steps.select_step(baseline, dirs, tmp_path / f"r-{budget}", max_accuracy_drop=budget)
        assert result.winner == winner, budget
    assert result.selection["max_accuracy_drop"] == 0.02  # "0.02" from a pipeline parameter is a number
    with pytest.raises(KfoptError, match="is not a budget"):
        steps.select_step(baseline, dirs, tmp_path / "bad", max_accuracy_drop="lots")


def test_the_pipeline_takes_a_relative_budget_and_the_output_as_parameters(tmp_path):
    import yaml

    path = compile_pipeline(tmp_path / "p.yaml", ["quantize(mode=int8)"], rounds=1)
    pipeline = yaml.safe_load(Path(path).read_text())
    parameters = pipeline["root"]["inputDefinitions"]["parameters"]
    assert parameters["max_accuracy_drop"]["parameterType"] == "STRING"
    assert parameters["max_accuracy_drop"]["defaultValue"] == "0.01"
    assert (parameters["output"]["defaultValue"], parameters["output"]["parameterType"]) == ("", "STRING")
    tasks = pipeline["root"]["dag"]["tasks"]
    assert tasks["prepare"]["inputs"]["parameters"]["output"]["componentInputParameter"] == "output"
    for name in ("plan-search", "select", "select-2", "promote"):
        budget = tasks[name]["inputs"]["parameters"]["max_accuracy_drop"]
        assert budget["componentInputParameter"] == "max_accuracy_drop", name
