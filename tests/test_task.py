"""The user's task and metric: binary, regression, logits, multi-label models scored the way their task is,
fine-tuned with their own loss, budgeted on the chosen metric (absolute or relative), and bad combinations
refused in one line.

Every model here is tiny and trained for a few epochs in the test (no downloads: scikit-learn's bundled
breast-cancer data, digits, or generated arrays). Expected numbers are computed with numpy from Keras's
own predictions, never through kfopt's scoring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import kfopt
from kfopt import _tf
from kfopt.cli import main
from kfopt.data import labels, load_data
from kfopt.errors import KfoptError
from kfopt.evaluate import Evaluator
from kfopt.plugins import ModelHandle, copy_model
from kfopt.plugins.manager import registry
from kfopt.select import Budget, select
from kfopt.task import compiled_loss, infer_task

RUNS = 3  # batch-1 latency samples: the numbers here are about quality, not speed


def keras():
    return _tf.keras()


def dense_model(inputs: int, outputs: int, activation: str | None, hidden: int = 16, seed: int = 0):
    k = keras()
    k.utils.set_random_seed(seed)
    return k.Sequential(
        [
            k.Input((inputs,)),
            k.layers.Dense(hidden, activation="relu"),
            k.layers.Dense(outputs, activation=activation),
        ]
    )


# -- data and models (module scope: trained once) ---------------------------------------
@pytest.fixture(scope="module")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)  # x_train, x_test, y_train, y_test


@pytest.fixture(scope="module")
def binary_model(breast_cancer):
    x_train, _, y_train, _ = breast_cancer
    model = dense_model(30, 1, "sigmoid")
    model.compile(keras().optimizers.Adam(1e-2), "binary_crossentropy")
    model.fit(x_train, y_train, epochs=10, verbose=0)
    return model


@pytest.fixture(scope="module")
def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=600)).astype(np.float32)
    return x[:400], y[:400], x[400:], y[400:]


@pytest.fixture(scope="module")
def regression_model(regression_data):
    x_train, y_train, _, _ = regression_data
    model = dense_model(8, 1, None, hidden=32)
    model.compile(keras().optimizers.Adam(1e-2), "huber")
    model.fit(x_train, y_train, epochs=30, verbose=0)
    return model


@pytest.fixture(scope="module")
def registered_metrics():
    return registry().metrics


def arrays(breast_cancer):
    x_train, x_test, y_train, y_test = breast_cancer
    return x_train, y_train, x_test, y_test


def outputs(model, x) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0), np.float64)


# -- binary -------------------------------------------------------------------------------
def test_a_binary_sigmoid_model_is_scored_with_binary_accuracy(binary_model, breast_cancer, tmp_path):
    data = load_data(arrays(breast_cancer))
    evaluator = Evaluator(data, ModelHandle.from_keras(binary_model), tmp_path, latency_runs=RUNS)
    assert (evaluator.task.kind, evaluator.task.metric, evaluator.task.from_logits) == (
        "binary",
        "binary_accuracy",
        False,
    )
    metrics = evaluator.baseline_metrics()
    x_test, y_test = data.test.arrays()
    expected = float(((outputs(binary_model, x_test)[:, 0] > 0.5) == y_test).mean())
    assert metrics["metric_name"] == "binary_accuracy" and metrics["task"] == "binary"
    assert metrics["metric"] == pytest.approx(expected) and metrics["accuracy"] == pytest.approx(expected)
    assert metrics["metric"] > 0.9  # not 0.37, as argmax over one unit gave
    assert metrics["metric_drop"] == 0 and metrics["agreement"] == 1.0


def test_prune_fine_tunes_a_binary_model_and_is_measured_like_keras_predicts(binary_model, breast_cancer, tmp_path):
    result = kfopt.optimize(
        binary_model,
        arrays(breast_cancer),
        "prune(target_sparsity=0.5,epochs=1)",
        out=tmp_path / "run",
        max_accuracy_drop=0.05,
        progress=False,
    )
    candidate = result.candidates[0]
    assert candidate.ok, candidate.reason  # no "label value of 1 outside the valid range of [0, 1)"
    assert candidate.sparsity == pytest.approx(0.5, abs=0.01)
    pruned = result.winner_model() if result.winner else keras().models.load_model(candidate.artifact, compile=False)
    test = load_data(arrays(breast_cancer)).test
    x_test, y_test = test.arrays()
    ours = float(((outputs(pruned, x_test)[:, 0] > 0.5) == y_test).mean())
    assert candidate.metric == pytest.approx(ours)
    assert candidate.metric_drop == pytest.approx(result.baseline.metric - ours)
    assert result.baseline.metric > 0.9


def test_binary_logits_and_distillation_of_a_binary_teacher(breast_cancer, tmp_path):
    x_train, x_test, y_train, y_test = breast_cancer
    logits = dense_model(30, 1, None)
    logits.compile(keras().optimizers.Adam(1e-2), keras().losses.BinaryCrossentropy(from_logits=True))
    logits.fit(x_train, y_train, epochs=10, verbose=0)
    result = kfopt.optimize(
        logits, arrays(breast_cancer), "distill(width=0.5,epochs=3)", out=tmp_path / "run", progress=False
    )
    assert result.baseline.task == "binary" and result.baseline.metric > 0.9  # a logit > 0 is a yes
    candidate = result.candidates[0]
    assert candidate.ok, candidate.reason
    student = keras().models.load_model(candidate.artifact, compile=False)
    assert student.layers[-1].units == 1 and student.layers[-1].activation.__name__ == "linear"
    test = load_data(arrays(breast_cancer)).test
    x, y = test.arrays()
    assert candidate.metric == pytest.approx(float(((outputs(student, x)[:, 0] > 0) == y).mean()))


# -- regression ---------------------------------------------------------------------------
def test_a_regression_model_is_scored_with_mae_and_no_accuracy(regression_model, regression_data, tmp_path):
    data = load_data(regression_data)
    evaluator = Evaluator(data, ModelHandle.from_keras(regression_model), tmp_path, latency_runs=RUNS)
    assert (evaluator.task.kind, evaluator.task.metric) == ("regression", "mae")
    base = evaluator.baseline_metrics()
    x_test, y_test = data.test.arrays()
    assert base["metric"] == pytest.approx(np.abs(outputs(regression_model, x_test)[:, 0] - y_test).mean(), rel=1e-5)
    for key in ("accuracy", "accuracy_drop", "agreement", "val_accuracy"):
        assert base[key] is None, key  # absent, never 0.0
    # A worse model: its drop is positive (candidate minus baseline, for an error).
    worse = copy_model(regression_model)
    worse.set_weights([w * 1.3 for w in regression_model.get_weights()])
    metrics = evaluator.evaluate(ModelHandle.from_keras(worse))
    its_mae = np.abs(outputs(worse, x_test)[:, 0] - y_test).mean()
    assert metrics["metric"] == pytest.approx(its_mae, rel=1e-5)
    assert metrics["metric_drop"] == pytest.approx(its_mae - base["metric"], rel=1e-4) and metrics["metric_drop"] > 0
    assert metrics["metric_drop_relative"] == pytest.approx(metrics["metric_drop"] / base["metric"])
    assert metrics["per_class_accuracy_change"] is None


def test_quantize_dynamic_of_a_regression_model_is_measured_and_its_table_names_mae(
    regression_model, regression_data, tmp_path
):
    from kfopt.evaluate import TFLiteRunner
    from kfopt.report import results_table

    result = kfopt.optimize(
        regression_model, regression_data, "quantize(mode=dynamic)", out=tmp_path / "run", progress=False
    )
    candidate = result.candidates[0]
    assert candidate.ok and candidate.metric_name == "mae" and "accuracy" not in candidate.to_dict()
    x_test, y_test = load_data(regression_data).test.arrays()
    predictions = TFLiteRunner(Path(candidate.artifact).read_bytes())(x_test)[:, 0]
    assert candidate.metric == pytest.approx(np.abs(predictions - y_test).mean(), rel=1e-5)
    assert candidate.metric_drop == pytest.approx(candidate.metric - result.baseline.metric)
    headers = [column.header for column in results_table(result).columns]
    assert "mae" in headers and "mae drop" in headers and "accuracy" not in headers


def test_the_compiled_loss_is_kept_for_fine_tuning(regression_model, tmp_path):
    from kfopt.training import task_loss

    path = tmp_path / "model.keras"
    regression_model.save(path)
    assert compiled_loss(path=path) == "huber"
    loaded = keras().models.load_model(path, compile=False)
    task = infer_task(loaded, [np.linspace(0, 3, 10, dtype=np.float32)], loss=compiled_loss(path=path))
    assert task.loss == "huber" and type(task_loss(loaded, task)).__name__ == "Huber"
    # No compiled loss: the task's (mean squared error for regression).
    plain = infer_task(loaded, [np.linspace(0, 3, 10, dtype=np.float32)])
    assert type(task_loss(loaded, plain)).__name__ == "MeanSquaredError"


def test_distilling_a_regression_teacher_trains_a_student_on_its_outputs(regression_model, regression_data, tmp_path):
    result = kfopt.optimize(
        regression_model, regression_data, "distill(width=0.5,epochs=20)", out=tmp_path / "run", progress=False
    )
    candidate = result.candidates[0]
    assert candidate.ok, candidate.reason
    untrained = float(np.abs(regression_data[3]).mean())  # predicting 0 everywhere
    assert candidate.metric < 0.5 * untrained  # it learned from the teacher


# -- multi-class logits, multi-label --------------------------------------------------------
def test_a_logits_model_is_multiclass_and_top_k_can_be_budgeted(tmp_path):
    data = load_data("digits")
    model = dense_model(64, 10, None)
    model.compile(keras().optimizers.Adam(1e-2), keras().losses.SparseCategoricalCrossentropy(from_logits=True))
    x_train, y_train = data.train.arrays()
    model.fit(x_train, y_train, epochs=3, verbose=0)
    evaluator = Evaluator(data, ModelHandle.from_keras(model), tmp_path, latency_runs=RUNS, metric="top_k_accuracy")
    assert (evaluator.task.kind, evaluator.task.from_logits) == ("multiclass", True)
    metrics = evaluator.baseline_metrics()
    x_test, y_test = data.test.arrays()
    scores = outputs(model, x_test)
    assert metrics["accuracy"] == pytest.approx(float((scores.argmax(axis=1) == y_test).mean()))
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert metrics["metric_name"] == "top_k_accuracy"
    assert metrics["metric"] == pytest.approx(float((top5 == y_test[:, None]).any(axis=1).mean()))


def test_a_multilabel_model_is_scored_per_label(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.int64)  # three independent yes/no labels
    model = dense_model(6, 3, "sigmoid")
    model.compile(keras().optimizers.Adam(1e-2), "binary_crossentropy")
    model.fit(x[:300], y[:300], epochs=10, verbose=0)
    data = load_data((x[:300], y[:300], x[300:], y[300:]))
    evaluator = Evaluator(data, ModelHandle.from_keras(model), tmp_path, latency_runs=RUNS)
    assert (evaluator.task.kind, evaluator.task.metric) == ("multilabel", "binary_accuracy")
    x_test, y_test = data.test.arrays()
    assert y_test.shape[1] == 3  # kept a matrix, not cast to class ids
    predicted = (outputs(model, x_test) > 0.5).astype(np.int64)
    flipped = copy_model(model)
    weights = model.get_weights()
    weights[-2][:, 0], weights[-1][0] = -weights[-2][:, 0], -weights[-1][0]  # label 0 answered the other way
    flipped.set_weights(weights)
    metrics = evaluator.evaluate(ModelHandle.from_keras(flipped))
    base = evaluator.baseline_metrics()
    assert base["metric"] == pytest.approx(float((predicted == y_test).mean()))
    assert base["accuracy"] == pytest.approx(float((predicted == y_test).all(axis=1).mean()))
    assert metrics["per_class_accuracy_change"]["0"] < -0.8  # label 0 nearly always wrong now
    assert abs(metrics["per_class_accuracy_change"]["1"]) < 1e-9
    assert metrics["agreement"] < 0.2 and metrics["metric_drop"] > 0.25


# -- the budget -------------------------------------------------------------------------------
def regression_candidate(label, mae, base=1.0, gzip=100, val_mae=None):
    val_mae = mae if val_mae is None else val_mae
    return {
        "recipe": label,
        "status": "ok",
        "metric_name": "mae",
        "metric": mae,
        "metric_drop": mae - base,
        "metric_drop_relative": (mae - base) / base,
        "val_metric_drop": val_mae - base,
        "val_metric_drop_relative": (val_mae - base) / base,
        "gzip_bytes": gzip,
        "latency_p50_ms": 1.0,
    }


def test_a_relative_budget_bounds_the_drop_as_a_share_of_the_baseline():
    assert Budget.parse("1%") == Budget(0.01, relative=True) and Budget.parse(0.01) == Budget(0.01)
    candidates = [
        regression_candidate("small-but-2%-worse", 1.02, gzip=10),
        regression_candidate("0.5%-worse", 1.005, gzip=50),
        regression_candidate("better", 0.99, gzip=90),
    ]
    selection = select(candidates, max_accuracy_drop="1%")
    assert selection.winner == "0.5%-worse" and selection.max_accuracy_drop == "1%"
    assert selection.budget_metric == "mae"
    assert "mae drop 2.00% of the baseline is over the budget 1%" in selection.reasons["small-but-2%-worse"]
    assert select(candidates, max_accuracy_drop="3%").winner == "small-but-2%-worse"
    assert select(candidates, max_accuracy_drop=0.03).winner == "small-but-2%-worse"  # 0.02 of mae, absolute
    assert select(candidates, max_accuracy_drop=0.001).winner == "better"
    # Validation decides too: within budget on test but not on validation is not eligible.
    lucky = regression_candidate("lucky", 1.0, gzip=1, val_mae=1.05)
    assert select([lucky], max_accuracy_drop="1%").winner is None
    # A lower error ranks higher on the Pareto front: the quality axis is the metric drop.
    assert select(candidates, max_accuracy_drop="3%").pareto == ["small-but-2%-worse", "0.5%-worse", "better"]


def test_the_promotion_gate_compares_errors_with_the_champion_the_right_way_round():
    from kfopt.promotion import gate

    champion = {"metric_name": "mae", "metric": 0.50, "gzip_bytes": 100, "latency_p50_ms": 1.0}
    challenger = regression_candidate("smaller", 0.51, base=0.51, gzip=50)  # as good as its own baseline
    assert gate(challenger, champion, max_accuracy_drop="5%", objective="size")[0]
    promoted, reason = gate(challenger, champion, max_accuracy_drop="1%", objective="size", champion_version="2")
    assert not promoted and reason == "mae 0.5100 is more than 1% above champion v2's 0.5000"
    assert gate(
        regression_candidate("better", 0.40, base=0.40, gzip=50), champion, max_accuracy_drop=0.0, objective="size"
    )[0]
    # A champion registered with another metric cannot be compared on this one.
    promoted, reason = gate(challenger, {**champion, "metric_name": "rmse"}, max_accuracy_drop=0.1, objective="size")
    assert not promoted and "mae missing" in reason


def test_a_relative_budget_through_optimize(regression_model, regression_data, tmp_path):
    result = kfopt.optimize(
        regression_model,
        regression_data,
        "quantize(mode=float16)",
        out=tmp_path / "run",
        max_accuracy_drop="5%",
        progress=False,
    )
    candidate = result.candidates[0]
    assert result.selection["max_accuracy_drop"] == "5%" and result.selection["budget_metric"] == "mae"
    assert abs(candidate.metric_drop_relative) < 0.05 and result.winner == candidate.recipe  # float16 barely moves


# -- labels ---------------------------------------------------------------------------------
def test_labels_keep_regression_targets_and_label_matrices():
    assert labels(np.array([0.5, 1.25])).dtype == np.float32  # regression targets are not class ids
    assert labels(np.array([[0.5], [1.25]])).shape == (2,)
    assert labels(np.array([1.0, 0.0, 2.0])).dtype == np.int64  # whole numbers saved as floats: class ids
    assert labels(np.array([[0, 1, 0], [1, 0, 0]])).tolist() == [1, 0]  # one-hot rows
    matrix = np.array([[1, 1, 0], [0, 0, 1]])
    assert labels(matrix).tolist() == matrix.tolist()  # several 1s per row: multi-label, kept
    assert labels(np.array([[0, 1], [1, 0]]), one_hot=False).shape == (2, 2)  # decided over every split


# -- bad combinations: one line, exit 2 ------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory, regression_model, regression_data, binary_model, breast_cancer):
    root = tmp_path_factory.mktemp("task-cli")
    regression_model.save(root / "regression.keras")
    binary_model.save(root / "binary.keras")
    np.savez(root / "regression.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"), regression_data)))
    x_train, x_test, y_train, y_test = breast_cancer
    np.savez(root / "binary.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez(root / "binary_floats.npz", x_train=x_train, y_train=y_train + 0.5, x_test=x_test, y_test=y_test + 0.5)
    softmax = dense_model(30, 2, "softmax")
    softmax.save(root / "softmax2.keras")
    np.savez(root / "three_classes.npz", x_train=x_train, y_train=y_train * 2, x_test=x_test, y_test=y_test * 2)
    return root


@pytest.mark.parametrize(
    "model, data, extra, said",
    [
        ("regression", "regression", ["--metric", "accuracy"], "Metric 'accuracy' does not fit a regression model"),
        ("binary", "binary", ["--metric", "mae"], "Metric 'mae' does not fit a binary model"),
        ("binary", "binary", ["--metric", "acuracy"], "Unknown metric 'acuracy'. Did you mean 'accuracy'"),
        ("binary", "binary_floats", [], "not class ids"),
        ("softmax2", "three_classes", [], "outside the valid range 0 or 1"),
    ],
)
def test_a_bad_combination_exits_2_with_one_line(files, tmp_path, model, data, extra, said):
    args = ["optimize", "--model", str(files / f"{model}.keras"), "--data", str(files / f"{data}.npz")]
    args += ["--recipe", "quantize(mode=dynamic)", "--out", str(tmp_path / "out"), "--no-tracking", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], result.stderr
    assert "Fix:" in lines[0]


def test_a_bad_budget_is_refused_by_the_cli(files, tmp_path):
    args = ["optimize", "--model", str(files / "binary.keras"), "--data", str(files / "binary.npz")]
    args += ["--recipe", "quantize(mode=dynamic)", "--out", str(tmp_path / "out"), "--max-accuracy-drop", "five%"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is not a budget" in result.stderr


def test_infer_task_refuses_mismatches_in_words(registered_metrics):
    sigmoid3 = dense_model(4, 3, "sigmoid")
    with pytest.raises(KfoptError, match="multi-label.*class id"):
        infer_task(sigmoid3, [np.array([0, 1, 2])], metrics=registered_metrics)
    with pytest.raises(KfoptError, match="softmax over one unit"):
        infer_task(dense_model(4, 1, "softmax"), [np.array([0, 1])])
    with pytest.raises(KfoptError, match="3 target columns"):
        infer_task(dense_model(4, 3, None), [np.array([0.5, 1.5])])
    task = infer_task(dense_model(4, 1, None), [np.array([3, 7, 12])])  # integer targets, one linear unit
    assert task.kind == "regression"
