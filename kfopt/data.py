"""Loading the data a model is optimized and evaluated on.

Three sources: an ``.npz`` file (x_train, y_train, x_test, y_test; any
tf.io.gfile URI), ``py:module:function`` returning ``(train, test)`` tf.data
datasets of ``(x, y)`` batches (for data larger than memory), or ``digits``
(scikit-learn's bundled 8x8 handwritten digits). Validation data always comes
out of the training split; the test split is only used for the final score.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import KfoptError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
VALIDATION_FRACTION = 0.1


class Split:
    """One split of the data: numpy arrays, or a tf.data dataset of (x, y) batches."""

    def __init__(self, x: np.ndarray | None = None, y: np.ndarray | None = None, dataset: Any = None):
        if dataset is None and (x is None or y is None):
            raise ValueError("a Split needs x and y arrays or a tf.data dataset")
        self.x, self.y, self.dataset = x, y, dataset

    def __len__(self) -> int:
        if self.x is not None:
            return len(self.x)
        return sum(len(y) for _, y in self.batches())

    def batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield numpy ``(x, y)`` batches (the dataset's own batches for tf.data)."""
        if self.x is not None:
            for i in range(0, len(self.x), batch_size):
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]
        else:
            for x, y in self.dataset.as_numpy_iterator():
                yield np.asarray(x), np.asarray(y)

    def samples(self, count: int) -> Iterator[np.ndarray]:
        """Yield up to ``count`` single inputs with a batch axis of 1, as float32."""
        seen = 0
        for x, _ in self.batches():
            for row in x:
                if seen >= count:
                    return
                seen += 1
                yield np.asarray(row, dtype=np.float32)[None, ...]

    def fit_args(self, batch_size: int = 32) -> dict:
        """Keyword arguments for ``model.fit`` / ``model.evaluate``."""
        if self.x is not None:
            return {"x": self.x, "y": self.y, "batch_size": batch_size}
        return {"x": self.dataset}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All of the split as two arrays (fine for test and validation splits)."""
        if self.x is not None:
            return self.x, self.y
        xs, ys = zip(*self.batches())
        return np.concatenate(xs), np.concatenate(ys)


@dataclass
class Data:
    """Train, validation and test splits, and what they are."""

    train: Split
    validation: Split
    test: Split
    num_classes: int
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        x, _ = next(self.test.batches(1))
        return tuple(x.shape[1:])


def load_data(spec: str, *, input_shape: tuple | None = None, seed: int = 0) -> Data:
    """Load ``spec`` (an .npz path/URI, ``py:module:function`` or ``digits``).

    ``input_shape`` (the model's input, without batch axis) lets ``digits`` be
    served as flat 64-vectors or as images of any size with one channel.
    """
    if spec == "digits":
        data = _digits(input_shape, seed)
    elif spec.startswith("py:"):
        data = _python_datasets(spec)
    elif spec.endswith(".npz") or "://" in spec:
        data = _npz(spec, seed)
    else:
        raise KfoptError(
            f"Unknown data source '{spec}'.",
            "pass an .npz file (x_train, y_train, x_test, y_test), 'py:module:function' or 'digits'.",
        )
    if input_shape is not None:
        check_fits(data, input_shape)
    return data


def check_fits(data: Data, input_shape: tuple) -> None:
    """Fail with a clear message when the data's inputs do not fit the model."""
    want = tuple(d for d in input_shape)
    got = data.input_shape
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        raise KfoptError(
            f"Data from '{data.source}' has inputs of shape {got}, but the model expects {tuple(want)}.",
            "reshape the arrays to the model's input shape, or pass the model the data was made for.",
        )


def _labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    return y.reshape(-1).astype(np.int64)


def _split_validation(x, y, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, int(round(len(x) * VALIDATION_FRACTION)))
    val, train = order[:n_val], order[n_val:]
    return Split(x[train], y[train]), Split(x[val], y[val])


def _digits(input_shape: tuple | None, seed: int) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)  # (n, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x = _digits_as(x, input_shape)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    train, validation = _split_validation(x_train, y_train, seed)
    return Data(train, validation, Split(x_test, y_test), 10, "digits")


def _digits_as(images: np.ndarray, input_shape: tuple | None) -> np.ndarray:
    if input_shape is None or tuple(input_shape) == (64,):
        return images.reshape(len(images), 64)
    if len(input_shape) == 3 and input_shape[-1] == 1:
        height, width = input_shape[0], input_shape[1]
        if (height, width) == (8, 8):
            return images[..., None]
        from . import _tf

        tf = _tf.tf()
        resized = tf.image.resize(images[..., None], (height, width), method="bilinear")
        return resized.numpy().astype(np.float32)
    raise KfoptError(
        f"The 'digits' data (8x8 grey images) cannot be fed to a model with input shape {tuple(input_shape)}.",
        "use a model whose input is (64,) or (H, W, 1), or pass your own data as .npz.",
    )


def _npz(uri: str, seed: int) -> Data:
    from . import _tf

    tf = _tf.tf()
    if not tf.io.gfile.exists(uri):
        raise KfoptError(f"Data file '{uri}' does not exist.", "check the path or URI.")
    try:
        with tf.io.gfile.GFile(uri, "rb") as f:
            arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
            missing = [k for k in NPZ_KEYS if k not in arrays.files]
            if missing:
                raise KfoptError(
                    f"Data file '{uri}' is missing the arrays {', '.join(missing)} (it has: {', '.join(arrays.files) or 'none'}).",
                    f"save it with np.savez(path, {', '.join(k + '=...' for k in NPZ_KEYS)}).",
                )
            x_train, y_train, x_test, y_test = (arrays[k] for k in NPZ_KEYS)
    except KfoptError:
        raise
    except Exception as exc:
        raise KfoptError(
            f"Data file '{uri}' is not a readable .npz file ({exc}).", "re-create it with np.savez."
        ) from None
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise KfoptError(
                f"Data file '{uri}': x_{split} has {len(x)} rows but y_{split} has {len(y)}.",
                "save matching inputs and labels.",
            )
    y_train, y_test = _labels(y_train, uri), _labels(y_test, uri)
    train, validation = _split_validation(x_train.astype(np.float32), y_train, seed)
    classes = int(max(y_train.max(), y_test.max()) + 1)
    return Data(train, validation, Split(x_test.astype(np.float32), y_test), classes, uri)


def _python_datasets(spec: str) -> Data:
    target = spec[len("py:") :]
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise KfoptError(f"Data source '{spec}' is not of the form 'py:module:function'.", "e.g. py:my_data:load.")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise KfoptError(
            f"Cannot load data function '{target}': {exc}.",
            "check the module is importable (PYTHONPATH) and defines the function.",
        ) from None
    result = function()
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise KfoptError(
            f"'{target}' must return (train, test) tf.data datasets, got {type(result).__name__}.",
            "return a pair of datasets of (x, y) batches.",
        )
    train_ds, test_ds = result
    train_ds, val_ds = _take_validation(train_ds)
    test = Split(dataset=test_ds)
    labels = np.concatenate([y for _, y in test.batches()])
    return Data(Split(dataset=train_ds), Split(dataset=val_ds), test, int(labels.max()) + 1, spec)


def _take_validation(dataset):
    """Hold out the first batches of the training dataset (about 10%) for validation."""
    count = int(dataset.cardinality())
    n_val = max(1, int(round(count * VALIDATION_FRACTION))) if count > 0 else 1
    return dataset.skip(n_val), dataset.take(n_val)
