"""The Python API: a notebook user's model object and arrays in, the typed run record out."""

from __future__ import annotations

import numpy as np
import pytest

import kfopt
from kfopt.errors import KfoptError
from kfopt.result import RunResult


@pytest.fixture(scope="module")
def digits_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def keras3_mlp(digits_arrays):
    """A model as a data scientist writes it today: Keras 3, trained on all of x_train."""
    import kfopt._tf  # noqa: F401  (TensorFlow set up the way kfopt wants, as in the CLI)
    from kfopt.keras3 import keras3

    keras = keras3()
    keras.utils.set_random_seed(0)
    x_train, y_train, _, _ = digits_arrays
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=8, verbose=0)
    return model


def test_the_api_is_importable_without_tensorflow():
    import subprocess
    import sys

    code = "import kfopt, sys; kfopt.optimize, kfopt.search; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_optimize_a_model_object_on_arrays(keras3_mlp, digits_arrays, tmp_path):
    result = kfopt.optimize(keras3_mlp, digits_arrays, "quantize(mode=dynamic)", out=tmp_path / "run", progress=False)
    assert isinstance(result, RunResult)
    candidate = result.winning_candidate
    assert candidate is not None and candidate.recipe == "quantize(mode=dynamic)" and candidate.format == "tflite"
    assert candidate.compression_ratio > 2 and abs(candidate.accuracy_drop) <= 0.01
    # A model kfopt did not train has seen all of x_train: validation comes out of the test side.
    x_test = digits_arrays[2]
    assert result.splits["train"] == len(digits_arrays[0])
    assert result.splits["validation"] + result.splits["test"] == len(x_test)
    assert "test split" in result.splits["validation_source"]
    # The record on disk is the record returned, and the winner loads from it.
    loaded = RunResult.load(tmp_path / "run")
    assert loaded.winner == result.winner and loaded.splits == result.splits
    assert loaded.winning_candidate.gzip_bytes == candidate.gzip_bytes
    assert loaded.winner_model()[4:8] == b"TFL3"
    assert "quantize(mode=dynamic)" in result._repr_html_()


def test_a_keras_candidate_comes_back_in_the_users_keras(keras3_mlp, digits_arrays, tmp_path):
    from kfopt.keras3 import is_keras3_model

    result = kfopt.optimize(
        keras3_mlp, digits_arrays, "prune(target_sparsity=0.5,epochs=1)", out=tmp_path / "run", progress=False
    )
    model = result.winner_model()
    assert is_keras3_model(model)
    weights = np.concatenate([w.ravel() for w in model.get_weights() if w.ndim == 2])
    assert 0.45 <= float(np.mean(weights == 0)) <= 0.55
    x_test = digits_arrays[2]
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == digits_arrays[3]))
    assert accuracy == pytest.approx(result.winning_candidate.accuracy, abs=0.05)  # measured on the test part only


def test_search_takes_a_pair_of_datasets(keras3_mlp, digits_arrays, tmp_path):
    import tensorflow as tf

    x_train, y_train, x_test, y_test = digits_arrays
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(64)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(64)
    result = kfopt.search(
        keras3_mlp,
        (train, test),
        recipes=["quantize(mode=dynamic)", "quantize(mode=float16)"],
        rounds=0,
        sensitivity=None,
        out=tmp_path / "run",
        progress=False,
    )
    assert result.data == "tf.data datasets passed from Python"
    assert [c.status for c in result.candidates] == ["ok", "ok"]
    assert result.winner == "quantize(mode=dynamic)"  # smaller than float16 at the same accuracy
    assert result.search["stopped"]


def test_what_is_not_a_model_or_data_is_a_clear_error(digits_arrays, tmp_path):
    with pytest.raises(KfoptError, match="not a Keras model"):
        kfopt.optimize(object(), digits_arrays, out=tmp_path / "a", progress=False)
    with pytest.raises(KfoptError, match="missing the arrays y_test"):
        kfopt.optimize(
            "demo:mlp",
            {k: v for k, v in zip(("x_train", "y_train", "x_test"), digits_arrays)},
            out=tmp_path / "b",
            progress=False,
        )
