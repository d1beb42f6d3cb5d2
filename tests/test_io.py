"""Loading models and data: every format, safe mode, and clear errors for bad files."""

import numpy as np
import pytest

from kfopt import _tf
from kfopt.data import load_data
from kfopt.errors import KfoptError
from kfopt.models import load_keras


def counts(splits) -> dict:
    """What a split table says (sizes, where validation came from), without the test split's digest."""
    return {k: v for k, v in splits.as_dict().items() if k != "test_digest"}


def _tiny(with_lambda=False):
    keras = _tf.keras()
    layers = [keras.Input(shape=(64,)), keras.layers.Dense(10, activation="softmax")]
    if with_lambda:
        layers.insert(1, keras.layers.Lambda(lambda x: x * 2.0))
    return keras.Sequential(layers)


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "saved"])
def test_loads_each_keras_format(tmp_path, name):
    model = _tiny()
    path = tmp_path / name
    model.save(path) if name != "saved" else model.save(path, save_format="tf")
    loaded = load_keras(path)
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
def test_lambda_layer_refused_in_safe_mode(tmp_path, name):
    path = tmp_path / name
    _tiny(with_lambda=True).save(path)
    with pytest.raises(KfoptError, match="Lambda layer.*--unsafe"):
        load_keras(path)
    assert load_keras(path, unsafe=True) is not None


def test_corrupt_and_missing_models(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(KfoptError, match="not a readable Keras model"):
        load_keras(bad)
    with pytest.raises(KfoptError, match="does not exist"):
        load_keras(tmp_path / "nope.keras")


def test_digits_splits_are_disjoint_and_shaped(digits_flat, digits_images):
    # The fixtures are for baselines kfopt trains itself: validation comes out of the training split.
    assert digits_flat.input_shape == (64,) and digits_images.input_shape == (28, 28, 1)
    train_x, _ = digits_flat.train.arrays()
    val_x, _ = digits_flat.validation.arrays()
    test_x, _ = digits_flat.test.arrays()
    assert len(train_x) + len(val_x) + len(test_x) == 1797
    assert len(test_x) == 360 and len(val_x) == round(0.1 * (1797 - 360))
    assert counts(digits_flat.splits) == {
        "train": 1293,
        "validation": 144,
        "test": 360,
        "validation_source": "held out of the training data (kfopt trained the baseline on the rest)",
    }


def test_digits_for_a_user_model_hold_validation_out_of_test():
    data = load_data("digits", input_shape=(64,), seed=0)
    assert counts(data.splits) == {
        "train": 1437,
        "validation": 72,
        "test": 288,
        "validation_source": "held out of the test split (20%, seeded, stratified by class)",
    }
    # Stratified: every class is in validation in about its share of the test split.
    _, y_val = data.validation.arrays()
    assert sorted(np.bincount(y_val, minlength=10)) == [7, 7, 7, 7, 7, 7, 7, 7, 8, 8]
    again = load_data("digits", input_shape=(64,), seed=0)
    np.testing.assert_array_equal(again.validation.arrays()[0], data.validation.arrays()[0])
    other = load_data("digits", input_shape=(64,), seed=1)
    assert not np.array_equal(other.validation.arrays()[1], y_val)


def test_npz_missing_arrays_and_bad_shapes(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((10, 64)), y_train=np.zeros(10))
    with pytest.raises(KfoptError, match="missing the arrays x_test, y_test"):
        load_data(str(path))
    np.savez(path, x_train=np.zeros((10, 32)), y_train=np.zeros(10), x_test=np.zeros((4, 32)), y_test=np.zeros(4))
    with pytest.raises(KfoptError, match=r"inputs of shape \(32,\), but the model expects \(64,\)"):
        load_data(str(path), input_shape=(64,))
    with pytest.raises(KfoptError, match="does not exist"):
        load_data(str(tmp_path / "missing.npz"))


def test_npz_one_hot_labels(tmp_path):
    path = tmp_path / "d.npz"
    y = np.eye(3)[[0, 1, 2, 1]]
    np.savez(path, x_train=np.ones((4, 5)), y_train=y, x_test=np.ones((4, 5)), y_test=y)
    data = load_data(str(path))
    assert data.num_classes == 3 and len(data.train) == 4 and len(data.validation) + len(data.test) == 4
    assert counts(load_data(str(path), validation_from="train").splits) == {
        "train": 3,
        "validation": 1,
        "test": 4,
        "validation_source": "held out of the training data (kfopt trained the baseline on the rest)",
    }


def test_npz_validation_arrays_are_used_as_given(tmp_path):
    path = tmp_path / "d.npz"
    x, y = np.arange(60, dtype=np.float32).reshape(30, 2), np.arange(30) % 3
    np.savez(path, x_train=x[:20], y_train=y[:20], x_test=x[20:26], y_test=y[20:26], x_val=x[26:], y_val=y[26:])
    for validation_from in ("test", "train"):
        data = load_data(str(path), validation_from=validation_from)
        np.testing.assert_array_equal(data.validation.arrays()[0], x[26:])
        np.testing.assert_array_equal(data.test.arrays()[0], x[20:26])
        np.testing.assert_array_equal(data.train.arrays()[0], x[:20])
        assert data.splits.validation_source == "x_val/y_val in the npz"


@pytest.mark.parametrize(("given", "missing"), [("x_val", "y_val"), ("y_val", "x_val")])
def test_npz_validation_needs_both_arrays(tmp_path, given, missing):
    path = tmp_path / "d.npz"
    arrays = {"x_train": np.ones((4, 2)), "y_train": np.zeros(4), "x_test": np.ones((4, 2)), "y_test": np.zeros(4)}
    np.savez(path, **arrays, **{given: np.zeros((2, 2)) if given == "x_val" else np.zeros(2)})
    with pytest.raises(KfoptError, match=f"has {given} but no {missing}.*Fix: save {missing} too"):
        load_data(str(path))


def test_npz_regression_targets_are_held_out_unstratified(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    x, y = rng.random((300, 3), dtype=np.float32), rng.random(300) * 10
    np.savez(path, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    data = load_data(str(path))
    assert counts(data.splits) == {
        "train": 100,
        "validation": 50,
        "test": 150,
        "validation_source": "held out of the test split (25%, seeded)",
    }


LOADER = """
import numpy as np
from kfopt import _tf

def arrays():
    x = np.random.default_rng(0).random((200, 8), dtype=np.float32)
    return x, (x.sum(axis=1) > 4).astype("int64")

def dataset(x, y, batch=10):
    return _tf.tf().data.Dataset.from_tensor_slices((x, y)).batch(batch)

def load():
    x, y = arrays()
    return dataset(x[:160], y[:160]), dataset(x[160:], y[160:])

def load_three():
    x, y = arrays()
    return dataset(x[:140], y[:140]), dataset(x[140:180], y[140:180]), dataset(x[180:], y[180:])

def load_one_test_batch():
    x, y = arrays()
    return dataset(x[:160], y[:160]), dataset(x[160:], y[160:], batch=40)

def load_sorted():
    x, y = arrays()
    classes = np.repeat(np.arange(5), 10)
    return dataset(x[:160], y[:160] * 4), dataset(x[150:], classes)

def load_reshuffled():
    x, y = arrays()
    return dataset(x[:160], y[:160]), _tf.tf().data.Dataset.from_tensor_slices((x, y)).shuffle(200, seed=1).batch(10)

def load_endless():
    x, y = arrays()
    return dataset(x[:160], y[:160]), dataset(x[160:], y[160:]).repeat()
"""


@pytest.fixture
def loader(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_python_datasets_hold_validation_out_of_test_by_position(loader):
    data = load_data("py:my_data:load")
    assert counts(data.splits) == {
        "train": 160,
        "validation": 10,
        "test": 30,
        "validation_source": "held out of the test dataset by position "
        "(every 4th batch: 1 of 4 batches, 25%, seeded, not stratified)",
    }
    assert data.num_classes == 2
    # Still tf.data (nothing materialized), and each of the four test batches is in exactly one split.
    assert data.test.x is None and data.validation.x is None
    from my_data import arrays

    x_test = arrays()[0][160:]
    parts = [data.test.arrays()[0], data.validation.arrays()[0]]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts), axis=0), np.sort(x_test, axis=0))
    assert len(np.unique(np.concatenate(parts), axis=0)) == len(x_test)


def test_python_datasets_warn_when_validation_misses_a_class(loader):
    # A test dataset sorted by class, one class per batch: the validation batch has one class only.
    with pytest.warns(
        UserWarning, match=r"has no samples of class\(es\) (\d, ){3}\d; shuffle the test dataset"
    ) as seen:
        data = load_data("py:my_data:load_sorted")
    (held_class,) = set(data.validation.arrays()[1].tolist())
    assert str(held_class) not in str(seen[0].message).split("class(es)")[1].split(";")[0]


def test_python_datasets_hold_validation_out_of_train_for_kfopt_trained_baselines(loader):
    data = load_data("py:my_data:load", validation_from="train")
    assert len(data.validation) == 20 and len(data.train) == 140 and len(data.test) == 40


def test_python_datasets_third_dataset_is_validation(loader):
    data = load_data("py:my_data:load_three")
    assert counts(data.splits) == {
        "train": 140,
        "validation": 20,
        "test": 40,
        "validation_source": "the loader's third dataset",
    }


def test_python_datasets_single_test_batch_is_split_by_rows(loader):
    data = load_data("py:my_data:load_one_test_batch")
    assert (len(data.validation), len(data.test)) == (20, 20)
    assert data.splits.validation_source == "held out of the test split (50%, seeded, stratified by class)"


def test_python_datasets_endless_or_reshuffled_test_is_refused(loader):
    with pytest.raises(KfoptError, match="repeats forever"):
        load_data("py:my_data:load_endless")
    with pytest.raises(KfoptError, match="different batches on each pass.*Fix: do not shuffle the test dataset"):
        load_data("py:my_data:load_reshuffled")


def test_unknown_data_source():
    with pytest.raises(KfoptError, match="Unknown data source 'imagenet'"):
        load_data("imagenet")


# -- inputs keep their dtype, and a model may take several ------------------------------------
def _signature(*specs):
    from kfopt.signature import TensorInfo

    return [TensorInfo(name, shape, dtype) for name, shape, dtype in specs]


def _ids(rows, seed=0, dtype=np.int64):
    return np.random.default_rng(seed).integers(0, 50, (rows, 8)).astype(dtype)


def test_token_ids_stay_integers_in_the_type_the_model_declares(tmp_path):
    path = tmp_path / "tokens.npz"
    y = np.arange(120) % 3
    np.savez(path, x_train=_ids(120), y_train=y, x_test=_ids(120, 1), y_test=y)
    data = load_data(str(path), inputs=_signature(("tokens", (8,), "int32")))
    for split in (data.train, data.validation, data.test):
        assert split.x.dtype == np.int32
    # Without a model to go by, integers stay integers and only floats become float32.
    plain = load_data(str(path))
    assert plain.test.x.dtype == np.int64
    sample = next(plain.train.samples(1))
    assert sample.dtype == np.int64 and sample.shape == (1, 8)


def test_float_data_for_an_integer_input_is_refused_unless_it_holds_whole_numbers():
    y = np.arange(60) % 2
    whole = _ids(60).astype(np.float32)
    data = load_data((whole, y, whole, y), inputs=_signature(("ids", (8,), "int32")))
    assert data.test.x.dtype == np.int32 and np.array_equal(data.train.x, whole.astype(np.int32))
    noisy = whole + 0.25
    with pytest.raises(KfoptError, match="float values.*integer input ids \\(8,\\) int32") as caught:
        load_data((noisy, y, noisy, y), inputs=_signature(("ids", (8,), "int32")))
    assert "\n" not in str(caught.value)


def test_two_inputs_are_matched_by_name_in_the_models_order(tmp_path):
    rng = np.random.default_rng(0)
    left, right = rng.random((80, 4), dtype=np.float32), rng.random((80, 3), dtype=np.float32)
    y = np.arange(80) % 2
    path = tmp_path / "two.npz"
    # Saved right before left: the names decide, not the order in the file.
    np.savez(path, x_train_right=right, x_train_left=left, y_train=y, x_test_right=right, x_test_left=left, y_test=y)
    inputs = _signature(("left", (4,), "float32"), ("right", (3,), "float32"))
    data = load_data(str(path), inputs=inputs)
    assert data.train.x.names == ("left", "right")
    np.testing.assert_array_equal(data.train.x.arrays[0], left)
    assert data.input_shapes == [(4,), (3,)]
    assert len(data.test) + len(data.validation) == 80
    # Numbered keys go by position; from Python a list or a dict works the same way.
    by_position = {
        "x_train_0": left,
        "x_train_1": right,
        "y_train": y,
        "x_test_0": left,
        "x_test_1": right,
        "y_test": y,
    }
    assert load_data(by_position, inputs=inputs).train.x.names == ("left", "right")
    as_list = load_data(([left, right], y, [left, right], y), inputs=inputs)
    named = load_data(({"left": left, "right": right}, y, {"left": left, "right": right}, y), inputs=inputs)
    for split in ("train", "validation", "test"):  # the same rows held out, whatever form the arrays came in
        for got, want in zip(getattr(as_list, split).x.arrays, getattr(named, split).x.arrays):
            np.testing.assert_array_equal(got, want)
    # Keras gets several inputs by the model's input names.
    fed = as_list.train.fit_args()["x"]
    assert list(fed) == ["left", "right"] and fed["right"].shape[1] == 3


def test_data_that_does_not_fit_a_two_input_model_says_what_each_side_has():
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 4), dtype=np.float32), np.arange(40) % 2
    inputs = _signature(("left", (4,), "float32"), ("right", (3,), "float32"))
    with pytest.raises(KfoptError) as one_array:
        load_data((x, y, x, y), inputs=inputs)
    message = str(one_array.value)
    assert "1 input array (x: (4,) float32)" in message and "2 inputs: left (4,) float32, right (3,) float32" in message
    assert "x_train_<input name>" in message and "\n" not in message
    with pytest.raises(KfoptError, match="names its input arrays a, b, but the model's inputs are left, right"):
        load_data(({"a": x, "b": x[:, :3]}, y, {"a": x, "b": x[:, :3]}, y), inputs=inputs)
    with pytest.raises(KfoptError, match="shape \\(4,\\) for the model's input right \\(3,\\) float32"):
        load_data(({"left": x, "right": x}, y, {"left": x, "right": x}, y), inputs=inputs)
    with pytest.raises(KfoptError, match="different numbers of rows"):
        load_data(([x, x[:30]], y, [x, x], y))


def test_rows_of_several_inputs_are_split_and_batched_together():
    from kfopt.data import Inputs

    x = Inputs({"a": np.arange(10), "b": np.arange(10) * 10})
    assert len(x) == 10 and list(x[[1, 3]].arrays[1]) == [10, 30]
    joined = np.concatenate([x[:2], x[8:]])
    assert isinstance(joined, Inputs) and list(joined.arrays[0]) == [0, 1, 8, 9]
    with pytest.raises(TypeError, match="several input arrays"):
        np.asarray(x)


def test_the_representative_dataset_keeps_integer_ids(tmp_path):
    from kfopt.plugins import StepContext

    y = np.arange(30) % 3
    data = load_data((_ids(30, dtype=np.int32), y, _ids(30, 1, dtype=np.int32), y))
    ctx = StepContext(train=data.train, validation=data.validation, workdir=tmp_path)
    batches = list(ctx.representative(5)())
    assert len(batches) == 5 and all(b[0].dtype == np.int32 and b[0].shape == (1, 8) for b in batches)
