"""Validation is data the model has not seen: never a row a user's model was trained on.

A model kfopt did not train has usually seen all of the training data, so a
validation split carved out of it scores training accuracy and the search
rejects good candidates. These tests compare the actual sample rows of the
splits kfopt hands out (through the same calls ``kfopt optimize`` and the
pipeline's steps make) with the rows the model was trained on.
"""

from __future__ import annotations

import numpy as np
import pytest

from kfopt import _tf
from kfopt.data import load_data
from kfopt.engine import prepare

FEATURES = 8


def counts(splits) -> dict:
    """What a split table says (sizes, where validation came from), without the test split's digest."""
    return {k: v for k, v in splits.as_dict().items() if k != "test_digest"}


def rows(x: np.ndarray) -> set[bytes]:
    """Each sample as bytes, to compare splits row by row."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return {row.tobytes() for row in x.reshape(len(x), -1)}


def assert_never_trained_on(data, trained_on: np.ndarray, test: np.ndarray | None = None) -> None:
    """Validation shares no row with the training data, nor with the test split that is left."""
    x_val, _ = data.validation.arrays()
    x_test, _ = data.test.arrays()
    assert len(x_val) > 0
    assert not rows(x_val) & rows(trained_on), "validation overlaps the data the model was trained on"
    assert not rows(x_val) & rows(x_test), "validation overlaps the test split the budget is checked on"
    assert len(rows(x_val)) == len(x_val)
    assert data.splits.validation == len(x_val) and data.splits.test == len(x_test)
    if test is not None:  # held out of the test split: the two together are exactly the original test rows
        assert rows(x_val) | rows(x_test) == rows(test) and len(x_val) + len(x_test) == len(test)


def arrays(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).random((n, FEATURES), dtype=np.float32)
    return x, (x[:, 0] * 4).astype(np.int64)  # 4 classes


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A user's model file: trained elsewhere (by the user, on all of x_train); kfopt only loads it."""
    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(FEATURES,)), keras.layers.Dense(4, activation="softmax")])
    path = tmp_path_factory.mktemp("user") / "model.keras"
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def user_digits_model(tmp_path_factory):
    keras = _tf.keras()
    model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(10, activation="softmax")])
    path = tmp_path_factory.mktemp("user-digits") / "model.keras"
    model.save(path)
    return str(path)


def test_npz_without_validation_holds_it_out_of_test(tmp_path, user_model):
    x, y = arrays()
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    _, data = prepare(user_model, str(path))
    assert_never_trained_on(data, x[:300], test=x[300:])
    np.testing.assert_array_equal(data.train.arrays()[0], x[:300])  # all of it stays training data
    assert counts(data.splits) == {
        "train": 300,
        "validation": 50,
        "test": 50,
        "validation_source": "held out of the test split (50%, seeded, stratified by class)",
    }


def test_npz_with_validation_uses_it(tmp_path, user_model):
    x, y = arrays()
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:300], y_test=y[200:300], x_val=x[300:], y_val=y[300:])
    _, data = prepare(user_model, str(path))
    assert_never_trained_on(data, x[:200])
    assert rows(data.validation.arrays()[0]) == rows(x[300:]) and rows(data.test.arrays()[0]) == rows(x[200:300])
    assert data.splits.validation_source == "x_val/y_val in the npz"


def test_digits_with_a_user_model(user_digits_model):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    # The user trained on the digits training split (the same seeded split kfopt makes).
    x = (load_digits().images / 16.0).astype(np.float32).reshape(-1, 64)
    y = load_digits().target
    x_train, x_test, _, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    _, data = prepare(user_digits_model, "digits")
    assert_never_trained_on(data, x_train, test=x_test)
    assert rows(data.train.arrays()[0]) == rows(x_train)


LOADER = """
import numpy as np
from kfopt import _tf

def load():
    x = np.random.default_rng(0).random((400, 8), dtype=np.float32)
    y = (x[:, 0] * 4).astype("int64")
    ds = lambda a, b: _tf.tf().data.Dataset.from_tensor_slices((a, b)).batch(16)
    return ds(x[:300], y[:300]), ds(x[300:], y[300:])
"""


def test_python_loader_with_a_user_model(tmp_path, monkeypatch, user_model):
    (tmp_path / "user_data.py").write_text(LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    x, _ = arrays()
    _, data = prepare(user_model, "py:user_data:load")
    assert data.train.x is None and data.validation.x is None  # still tf.data, split by position
    assert_never_trained_on(data, x[:300], test=x[300:])
    assert data.splits.train == 300


def test_pipeline_steps_keep_validation_off_the_training_data(tmp_path, user_model):
    """prepare_step records how validation was chosen, so every later step reloads the same honest splits."""
    from kfopt.components.steps import load_step_data, prepare_step

    x, y = arrays()
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    baseline = prepare_step(user_model, str(path), tmp_path / "baseline", tmp_path / "data")
    data = load_step_data(tmp_path / "data", baseline["input_shape"])
    assert_never_trained_on(data, x[:300], test=x[300:])
    _, in_process = prepare(user_model, str(path))
    np.testing.assert_array_equal(data.validation.arrays()[0], in_process.validation.arrays()[0])


def test_demo_models_validate_on_training_rows_kfopt_did_not_train_on(tmp_path):
    """kfopt trains a demo baseline itself, on the training split minus validation: those numbers stay as they were."""
    _, data = prepare("demo:mlp", "digits", epochs=1, workdir=tmp_path)
    assert data.validation_from == "train"
    assert_never_trained_on(data, data.train.arrays()[0])
    same = load_data("digits", input_shape=(64,), seed=0, validation_from="train")
    np.testing.assert_array_equal(data.validation.arrays()[0], same.validation.arrays()[0])
    assert counts(data.splits) == {
        "train": 1293,
        "validation": 144,
        "test": 360,
        "validation_source": "held out of the training data (kfopt trained the baseline on the rest)",
    }
