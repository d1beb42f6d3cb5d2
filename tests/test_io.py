"""Loading models and data: every format, safe mode, and clear errors for bad files."""

import numpy as np
import pytest

from kfopt import _tf
from kfopt.data import load_data
from kfopt.errors import KfoptError
from kfopt.models import load_keras


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
    assert digits_flat.input_shape == (64,) and digits_images.input_shape == (28, 28, 1)
    train_x, _ = digits_flat.train.arrays()
    val_x, _ = digits_flat.validation.arrays()
    test_x, _ = digits_flat.test.arrays()
    assert len(train_x) + len(val_x) + len(test_x) == 1797
    assert len(test_x) == 360 and len(val_x) == round(0.1 * (1797 - 360))


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
    assert data.num_classes == 3 and len(data.train) + len(data.validation) == 4


def test_python_datasets_hold_out_validation_batches(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "import numpy as np\n"
        "from kfopt import _tf\n"
        "def load():\n"
        "    tf = _tf.tf()\n"
        "    x = np.random.default_rng(0).random((200, 8), dtype=np.float32)\n"
        "    y = (x.sum(axis=1) > 4).astype('int64')\n"
        "    ds = lambda a, b: tf.data.Dataset.from_tensor_slices((a, b)).batch(10)\n"
        "    return ds(x[:160], y[:160]), ds(x[160:], y[160:])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data("py:my_data:load")
    assert len(data.validation) == 20 and len(data.train) == 140 and len(data.test) == 40
    assert data.num_classes == 2


def test_unknown_data_source():
    with pytest.raises(KfoptError, match="Unknown data source 'imagenet'"):
        load_data("imagenet")
