"""Loading the data a model is optimized and evaluated on.

Three sources: an ``.npz`` file (x_train, y_train, x_test, y_test, optionally
x_val, y_val; any tf.io.gfile URI), ``py:module:function`` returning
``(train, test)`` or ``(train, test, validation)`` tf.data datasets of
``(x, y)`` batches (for data larger than memory), or ``digits``
(scikit-learn's bundled 8x8 handwritten digits).

Validation decides early stopping and refinement, so it must be data the
baseline has not seen. It comes from, in this order:

1. the data itself: ``x_val``/``y_val`` in the npz, or the loader's third dataset;
2. the test split (``validation_from="test"``, the default): a user's model was
   usually trained on all of ``x_train``, so validation is held out of the
   test split (seeded, stratified by class) and the test split shrinks;
3. the training split (``validation_from="train"``), only when kfopt trains the
   baseline itself on the rest (the ``demo:*`` models).

The test split is only used for the final score. :attr:`Data.splits` says
where validation came from and how many samples each split has.
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from .errors import KfoptError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
VALIDATION_KEYS = ("x_val", "y_val")
ValidationFrom = Literal["train", "test"]
VALIDATION_FROM = ("train", "test")
# Of the training split, when kfopt trains the baseline on the rest.
VALIDATION_FRACTION = 0.1
# Of the test split, when the baseline was trained elsewhere: enough to choose on,
# at least MIN_TEST_VALIDATION samples, never more than half of the test split.
TEST_VALIDATION_FRACTION = 0.2
MIN_TEST_VALIDATION = 50

FROM_NPZ = "x_val/y_val in the npz"
FROM_LOADER = "the loader's third dataset"
FROM_TRAIN = "held out of the training data (kfopt trained the baseline on the rest)"


class Inputs:
    """The input arrays of a model with several inputs, indexed by row together.

    ``x[:10]``, ``x[rows]``, ``len(x)`` and ``np.concatenate([x, ...])`` work as
    on one array, so splitting and batching code serves one input and several
    alike. ``names`` are the model's input names (or positions ``"0"``,
    ``"1"``, ... when the data gave a list); ``arrays`` are in the model's order
    once matched to it (:func:`match_inputs`).
    """

    __slots__ = ("names", "arrays")

    def __init__(self, arrays: Sequence | Mapping, names: Sequence[str] | None = None):
        if isinstance(arrays, Mapping):
            names, arrays = [str(k) for k in arrays], list(arrays.values())
        self.arrays = tuple(np.asarray(a) for a in arrays)
        self.names = tuple(str(n) for n in names) if names is not None else tuple(map(str, range(len(self.arrays))))
        if not self.arrays or len(self.names) != len(self.arrays):
            raise ValueError("Inputs needs one name per array, and at least one array")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, rows) -> Inputs:
        return Inputs([a[rows] for a in self.arrays], self.names)

    def __iter__(self) -> Iterator[Inputs]:
        return (self[i] for i in range(len(self)))

    def __array__(self, *args, **kwargs):
        # A silent object array would hide the several inputs: code that needs arrays says so.
        raise TypeError("Inputs holds several input arrays; use .arrays (or kfopt.data.input_list(x))")

    def __array_function__(self, func, types, args, kwargs):
        if func is np.concatenate:
            parts = list(args[0])
            return Inputs(
                [np.concatenate([p.arrays[i] for p in parts], **kwargs) for i in range(len(self.arrays))], self.names
            )
        return NotImplemented

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {a.shape} {a.dtype}" for n, a in zip(self.names, self.arrays))
        return f"Inputs({shapes})"


def input_list(x) -> list[np.ndarray]:
    """The arrays of ``x`` (one array, or :class:`Inputs`), in the model's input order."""
    return list(x.arrays) if isinstance(x, Inputs) else [np.asarray(x)]


def _structured(x):
    """A batch as kfopt keeps it: one array, or :class:`Inputs` for a tuple/list/dict of arrays (tf.data elements)."""
    if isinstance(x, Inputs):
        return x
    if isinstance(x, Mapping):
        return Inputs(x) if len(x) > 1 else np.asarray(next(iter(x.values())))
    if isinstance(x, (tuple, list)):
        return Inputs(x) if len(x) > 1 else np.asarray(x[0])
    return np.asarray(x)


def _input_dtype(x: np.ndarray) -> np.ndarray:
    """Inputs keep their kind: floats become float32, integers (token ids) stay integers."""
    return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype != np.float32 else x


def _as_input(x):
    """An input split as kfopt keeps it (before it is matched to a model): see :func:`_input_dtype`."""
    if isinstance(x, Inputs):
        return Inputs([_input_dtype(a) for a in x.arrays], x.names)
    return _input_dtype(np.asarray(x))


class Split:
    """One split of the data: numpy arrays, or a tf.data dataset of (x, y) batches."""

    def __init__(
        self, x: np.ndarray | None = None, y: np.ndarray | None = None, dataset: Any = None, size: int | None = None
    ):
        if dataset is None and (x is None or y is None):
            raise ValueError("a Split needs x and y arrays or a tf.data dataset")
        self.x, self.y, self.dataset = x, y, dataset
        self._size = size

    def __len__(self) -> int:
        size = self.count()
        if size is None:
            raise KfoptError(
                "A tf.data dataset repeats forever, so its samples cannot be counted.",
                "return datasets without .repeat() from the py: loader; kfopt iterates them epoch by epoch.",
            )
        return size

    def digest(self) -> str | None:
        """sha256 (first 16 hex digits) of the arrays' values, dtypes and shapes; None for a tf.data split."""
        if self.x is None:
            return None
        sha = hashlib.sha256()
        for array in (*input_list(self.x), self.y):
            array = np.ascontiguousarray(array)
            sha.update(f"{array.dtype.str}{array.shape}".encode())
            sha.update(array.tobytes())
        return sha.hexdigest()[:16]

    def count(self) -> int | None:
        """The number of samples (``None`` for a dataset that repeats forever).

        A tf.data split is read once to count it (then remembered).
        """
        if self.x is not None:
            return len(self.x)
        if self._size is None:
            if _repeats_forever(self.dataset):
                return None
            self._size = sum(len(y) for y in _label_batches(self.dataset))
        return self._size

    def batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield numpy ``(x, y)`` batches (the dataset's own batches for tf.data)."""
        if self.x is not None:
            for i in range(0, len(self.x), batch_size):
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]
        else:
            for x, y in self.dataset.as_numpy_iterator():
                yield _structured(x), np.asarray(y)

    def samples(self, count: int) -> Iterator[np.ndarray | Inputs]:
        """Yield up to ``count`` single inputs with a batch axis of 1, in their own dtype (token ids stay integers)."""
        seen = 0
        for x, _ in self.batches():
            for start in range(len(x)):
                if seen >= count:
                    return
                seen += 1
                yield x[start : start + 1]

    def fit_args(self, batch_size: int = 32) -> dict:
        """Keyword arguments for ``model.fit`` / ``model.evaluate``.

        Several inputs go as a dict keyed by the model's input names (Keras
        matches them by name), or as a list when the data numbers them.
        """
        if self.x is not None:
            x = self.x
            if isinstance(x, Inputs):
                positional = x.names == tuple(map(str, range(len(x.names))))
                x = list(x.arrays) if positional else dict(zip(x.names, x.arrays))
            return {"x": x, "y": self.y, "batch_size": batch_size}
        return {"x": self.dataset}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All of the split as two arrays (fine for test and validation splits)."""
        if self.x is not None:
            return self.x, self.y
        xs, ys = zip(*self.batches())
        return np.concatenate(xs), np.concatenate(ys)


@dataclass(frozen=True)
class Splits:
    """How many samples each split has and where validation came from (for metrics.json and the tables)."""

    train: int | None  # None: a tf.data training dataset that repeats forever
    validation: int
    test: int
    validation_source: str
    #: sha256 (16 hex digits) of the test split's inputs and labels: which test data every number was measured
    #: on, so a champion measured on other data is never compared with (None for a tf.data test split).
    test_digest: str | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        """``{"train", "validation", "test", "validation_source"}``, JSON-ready."""
        return asdict(self)


@dataclass
class Data:
    """Train, validation and test splits, and what they are."""

    train: Split
    validation: Split
    test: Split
    num_classes: int
    source: str
    validation_source: str = "given with the data"
    # What load_data was asked for, so a later pipeline step reloads the very same splits.
    validation_from: ValidationFrom = "test"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the (first) input, without the batch axis."""
        return self.input_shapes[0]

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        """The shape of one sample of each input, without the batch axis."""
        x, _ = next(self.test.batches(1))
        return [tuple(a.shape[1:]) for a in input_list(x)]

    @cached_property
    def splits(self) -> Splits:
        """Sample counts of the splits and where validation came from (a tf.data train split is read once)."""
        return Splits(
            train=self.train.count(),
            validation=len(self.validation),
            test=len(self.test),
            validation_source=self.validation_source,
            test_digest=self.test.digest(),
        )


#: What ``Data.source`` says for data handed over in memory (the Python API).
FROM_PYTHON_ARRAYS = "arrays passed from Python"
FROM_PYTHON_DATASETS = "tf.data datasets passed from Python"


def describe(spec: str | dict | tuple | list) -> str:
    """How a data source is named in the run record: the spec as given, or what was passed from Python."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) != 4 or hasattr(next(iter(spec), None), "as_numpy_iterator"):
        return FROM_PYTHON_DATASETS
    return FROM_PYTHON_ARRAYS


def load_data(
    spec: str | dict | tuple | list,
    *,
    input_shape: tuple | None = None,
    inputs: Sequence | None = None,
    seed: int = 0,
    validation_from: ValidationFrom = "test",
) -> Data:
    """Load ``spec``: an .npz path/URI, ``py:module:function`` or ``digits``; or, from Python, a dict
    of arrays (``x_train``, ``y_train``, ``x_test``, ``y_test``, optional ``x_val``/``y_val``), a tuple
    of those four arrays, or a ``(train, test[, validation])`` tuple of tf.data datasets.

    ``input_shape`` (the model's input, without batch axis) lets ``digits`` be
    served as flat 64-vectors or as images of any size with one channel.
    ``inputs`` (the model's inputs, :class:`kfopt.signature.TensorInfo`) checks
    the data against every input (count, shape, dtype) and matches the arrays
    of a model with several inputs to them (by name, or by position). Inputs
    keep their dtype: floats become float32, integers (token ids) stay
    integers, in the integer type the model's input declares.

    ``validation_from`` says where validation is held out when the data does
    not bring its own (``x_val``/``y_val``, a loader's third dataset):
    ``"test"`` (the default) for a model kfopt did not train, which has usually
    seen all of the training data; ``"train"`` only when kfopt trains the
    baseline itself on the rest of the training split (``demo:*``).
    """
    if validation_from not in VALIDATION_FROM:
        raise ValueError(f"validation_from must be one of {VALIDATION_FROM}, not {validation_from!r}")
    if input_shape is None and inputs:
        input_shape = inputs[0].shape
    if isinstance(spec, dict):
        data = _from_arrays(_checked_arrays(spec, "The data"), FROM_PYTHON_ARRAYS, seed, validation_from)
    elif isinstance(spec, (tuple, list)) and len(spec) == 4 and not hasattr(spec[0], "as_numpy_iterator"):
        arrays = _checked_arrays(dict(zip(NPZ_KEYS, spec)), "The data")
        data = _from_arrays(arrays, FROM_PYTHON_ARRAYS, seed, validation_from)
    elif isinstance(spec, (tuple, list)):
        data = _from_datasets(spec, FROM_PYTHON_DATASETS, FROM_PYTHON_DATASETS, seed, validation_from)
    elif not isinstance(spec, str):
        raise KfoptError(
            f"Data of type {type(spec).__name__} is not something kfopt reads.",
            "pass (x_train, y_train, x_test, y_test) arrays, a dict of them, a (train, test) pair of tf.data "
            "datasets, or a data spec (an .npz path, py:module:function, digits).",
        )
    elif spec == "digits":
        data = _digits(input_shape, seed, validation_from)
    elif spec.startswith("py:"):
        data = _python_datasets(spec, seed, validation_from)
    elif spec.endswith(".npz") or "://" in spec:
        data = _npz(spec, seed, validation_from)
    else:
        raise KfoptError(
            f"Unknown data source '{spec}'.",
            "pass an .npz file (x_train, y_train, x_test, y_test), 'py:module:function' or 'digits'.",
        )
    data.validation_from = validation_from
    if inputs:
        fit_to_model(data, inputs)
    elif input_shape is not None:
        check_fits(data, input_shape)
    return data


def check_fits(data: Data, input_shape: tuple) -> None:
    """Fail with a clear message when the data's inputs do not fit the model."""
    want = tuple(d for d in input_shape)
    got = data.input_shape
    # Several inputs are matched to the model by fit_to_model; a bare shape only speaks for the first one.
    if not _shape_fits(want, got):
        raise KfoptError(
            f"Data from '{data.source}' has inputs of shape {_shapes(data.input_shapes)}, but the model expects "
            f"{tuple(want)}.",
            "reshape the arrays to the model's input shape, or pass the model the data was made for.",
        )


def fit_to_model(data: Data, inputs: Sequence) -> None:
    """Match every split's inputs to the model's ``inputs`` (in place), or fail with one line that says how.

    Array splits are put in the model's input order and cast to the dtype each
    input declares (integer ids stay integers; float ids for an integer input
    are refused unless they are whole numbers). A tf.data split is checked on
    its first batch; Keras and the runners cast its batches as they come.
    """
    for name, split in (("train", data.train), ("validation", data.validation), ("test", data.test)):
        if split.x is not None:
            split.x = match_inputs(split.x, inputs, f"Data from '{data.source}' ({name} split)")
        elif name == "test":
            first, _ = next(split.batches(1))
            match_inputs(first, inputs, f"Data from '{data.source}' ({name} dataset)")


def match_inputs(x, inputs: Sequence, where: str = "The data"):
    """``x`` (one array, or :class:`Inputs`) matched to the model's ``inputs``: ordered, checked, cast.

    Several arrays are matched by name when their names are the model's input
    names, else by position (a list, or npz keys ``x_train_0``, ``x_train_1``, ...).
    """
    arrays = input_list(x)
    given = x.names if isinstance(x, Inputs) else None
    wanted = [spec.name for spec in inputs]
    if len(arrays) != len(inputs):
        have = f"{len(arrays)} input array{'s' if len(arrays) != 1 else ''} ({_described(arrays, given)})"
        takes = f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}: {', '.join(s.describe() for s in inputs)}"
        raise KfoptError(
            f"{where} has {have}, but the model takes {takes}.",
            "give one array per model input: x_train_<input name> (or x_train_0, x_train_1, ...) and the same for "
            "x_test/x_val in the npz, or a list or dict of arrays from Python (README: Data).",
        )
    if given is not None and set(given) == set(wanted):
        arrays = [arrays[given.index(name)] for name in wanted]
    elif given is not None and list(given) != [str(i) for i in range(len(given))]:
        raise KfoptError(
            f"{where} names its input arrays {', '.join(given)}, but the model's inputs are {', '.join(wanted)}.",
            "name the arrays after the model's inputs (x_train_<input name>), or number them by position "
            "(x_train_0, x_train_1, ...).",
        )
    matched = [_cast_to(array, spec, where) for array, spec in zip(arrays, inputs)]
    return matched[0] if len(matched) == 1 else Inputs(matched, wanted)


def _cast_to(array: np.ndarray, spec, where: str) -> np.ndarray:
    """``array`` in the dtype of the model input ``spec``, after checking its shape fits."""
    if not _shape_fits(spec.shape, array.shape[1:]):
        raise KfoptError(
            f"{where} has inputs of shape {tuple(array.shape[1:])} for the model's input {spec.describe()}.",
            "reshape the arrays to the model's input shape, or pass the model the data was made for.",
        )
    dtype = np.dtype(spec.dtype) if spec.dtype not in ("string", "variant", "resource") else None
    if dtype is None or (array.dtype == dtype and not spec.vocabulary):
        return array
    if dtype.kind in "iu" and array.dtype.kind == "f":
        whole = np.isfinite(array).all() and (array == np.round(array)).all()
        if not whole:
            raise KfoptError(
                f"{where} has float values (e.g. {array[array != np.round(array)].flat[0]!r}) for the model's "
                f"integer input {spec.describe()}.",
                "give integer ids (token or category ids) for that input, or a model whose input takes floats.",
            )
    if dtype.kind in "iu" and array.dtype.kind in "iuf" and array.size:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise KfoptError(
                f"{where} has values from {array.min()} to {array.max()}, outside the range of the model's input "
                f"{spec.describe()}.",
                "give ids the model's input type can hold, or a model whose input has a wider type.",
            )
    if spec.vocabulary and array.size and (array.min() < 0 or array.max() >= spec.vocabulary):
        raise KfoptError(
            f"{where} has ids from {array.min()} to {array.max()} for the model's input {spec.describe()}, which "
            f"an Embedding of {spec.vocabulary} ids reads (0 to {spec.vocabulary - 1}).",
            "map the ids the model never learned to an id it knows (e.g. its out-of-vocabulary id), or pass the "
            "model the data was made for.",
        )
    return array.astype(dtype)


def _shape_fits(want: Sequence, got: Sequence) -> bool:
    return len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got))


def _shapes(shapes: list[tuple]) -> str:
    return str(shapes[0]) if len(shapes) == 1 else ", ".join(map(str, shapes))


def _described(arrays: list[np.ndarray], names: Sequence[str] | None) -> str:
    names = names or ["x"] * len(arrays)
    return ", ".join(f"{n}: {tuple(a.shape[1:])} {a.dtype}" for n, a in zip(names, arrays))


def labels(y: np.ndarray, one_hot: bool | None = None) -> np.ndarray:
    """Labels as kfopt keeps them: class ids stay integers, anything else keeps its values.

    - class ids (integers, or floats that are whole numbers) and one-hot rows
      become int64 class ids, one per sample (a ``(n, 1)`` column is flattened);
    - a 0/1 matrix with any number of 1s per row (multi-label) stays a matrix, as int64;
    - float targets (regression, one column or several) stay floats (float32).

    ``one_hot`` says whether a 0/1 matrix is one-hot classes; None decides from
    ``y`` alone (pass :func:`is_one_hot` of every split, so that a small split of
    multi-label data whose rows happen to have one 1 each is not read as classes).
    The task (:mod:`kfopt.task`) then checks the labels against the model's outputs.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim >= 2:
        if _zero_one_matrix(y):
            return (
                y.argmax(axis=1).astype(np.int64)
                if (is_one_hot(y) if one_hot is None else one_hot)
                else y.astype(np.int64)
            )
        return y.astype(np.float32) if y.dtype.kind == "f" else y
    whole = y.dtype.kind in "biu" or (
        y.dtype.kind == "f" and bool(np.isfinite(y).all()) and bool((y == np.round(y)).all())
    )
    return y.astype(np.int64) if whole else y.astype(np.float32)


def _zero_one_matrix(y: np.ndarray) -> bool:
    return y.ndim == 2 and y.size > 0 and (y.dtype.kind in "biuf") and bool(np.isin(y, (0, 1)).all())


def is_one_hot(*arrays: np.ndarray | None) -> bool:
    """True when every 2-D label array given is a 0/1 matrix with exactly one 1 per row (one-hot classes)."""
    matrices = [
        np.asarray(y) for y in arrays if y is not None and np.asarray(y).ndim == 2 and np.asarray(y).shape[1] > 1
    ]
    return bool(matrices) and all(_zero_one_matrix(y) and bool((y.sum(axis=1) == 1).all()) for y in matrices)


def _labels(y: np.ndarray, source: str, one_hot: bool | None = None) -> np.ndarray:
    return labels(y, one_hot)


def _num_classes(*arrays: np.ndarray) -> int:
    """Classes of class-id labels (largest id + 1), columns of a label matrix, 0 for float targets."""
    arrays = [a for a in arrays if a is not None and len(a)]
    if not arrays:
        return 0
    if arrays[0].ndim == 2:
        return int(arrays[0].shape[1]) if arrays[0].dtype.kind in "biu" else 0
    if any(a.dtype.kind not in "biu" for a in arrays):
        return 0
    return int(max(int(a.max()) for a in arrays) + 1)


def _class_ids(y: np.ndarray) -> np.ndarray | None:
    """The class of each row when the labels are classes (ids or one-hot), else None (nothing to stratify by)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        one_hot = np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()
        return y.argmax(axis=1) if one_hot else None  # multi-hot or multi-output targets: no single class
    if y.ndim != 1:
        return None
    if y.dtype.kind in "biu" or (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()):
        return y.astype(np.int64)
    return None


def _split_validation(x, y, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, int(round(len(x) * VALIDATION_FRACTION)))
    val, train = order[:n_val], order[n_val:]
    return Split(x[train], y[train]), Split(x[val], y[val])


def validation_count(test_size: int) -> int:
    """How many of ``test_size`` test samples are held out for validation (at least 1, at most half)."""
    wanted = max(int(round(test_size * TEST_VALIDATION_FRACTION)), MIN_TEST_VALIDATION)
    return max(1, min(wanted, test_size // 2))


def _held_out_rows(classes: np.ndarray | None, size: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` of ``size`` rows, seeded; each class in proportion when ``classes`` is given."""
    rng = np.random.default_rng(seed)
    if classes is None:
        return np.sort(rng.permutation(size)[:count])
    _, inverse = np.unique(classes, return_inverse=True)
    sizes = np.bincount(inverse)
    quota = count * sizes / size
    take = np.floor(quota).astype(np.int64)
    # The rows left over go to the classes with the largest remainders (ties broken by the seed).
    order = np.lexsort((rng.random(len(sizes)), -(quota - take)))
    take[order[: count - int(take.sum())]] += 1
    held = [rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(len(sizes))]
    return np.sort(np.concatenate(held))


def _hold_out_of_test(
    x: np.ndarray, y: np.ndarray, classes: np.ndarray | None, seed: int, source: str
) -> tuple[Split, Split, str]:
    """(the smaller test split, validation, where validation came from): seeded, stratified by ``classes``.

    ``classes`` is the class of each row, or None when the labels are not
    classes (regression, multi-label): then the rows are drawn at random.
    """
    if len(x) < 2:
        raise KfoptError(
            f"Data from '{source}' has {len(x)} test sample(s): too few to hold validation out of the test split.",
            "give more test data, or your own validation split (x_val/y_val in the npz).",
        )
    held = _held_out_rows(classes, len(x), validation_count(len(x)), seed)
    keep = np.setdiff1d(np.arange(len(x)), held)
    percent = round(100 * len(held) / len(x))
    how = "seeded, stratified by class" if classes is not None else "seeded"
    return Split(x[keep], y[keep]), Split(x[held], y[held]), f"held out of the test split ({percent}%, {how})"


def _digits(input_shape: tuple | None, seed: int, validation_from: ValidationFrom) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)  # (n, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x = _digits_as(x, input_shape)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    if validation_from == "train":
        train, validation = _split_validation(x_train, y_train, seed)
        return Data(train, validation, Split(x_test, y_test), 10, "digits", FROM_TRAIN)
    test, validation, how = _hold_out_of_test(x_test, y_test, y_test, seed, "digits")
    return Data(Split(x_train, y_train), validation, test, 10, "digits", how)


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


#: dtype kinds no model reads as inputs or labels, and what to call them in an error.
_UNUSABLE_KINDS = {
    "U": "text",
    "S": "bytes",
    "O": "Python objects",
    "c": "complex numbers",
    "V": "records",
    "M": "dates",
    "m": "time spans",
}


def _refuse_unusable_arrays(arrays: dict, where: str) -> None:
    """Refuse, by name, an array that is empty, holds what no model reads (text, complex numbers, objects),
    or an input with NaN or infinite values: before any work, rather than a number that means nothing."""
    for key, value in arrays.items():
        if isinstance(value, Mapping):  # a model with several inputs, given from Python
            parts = [(f"{key}[{name!r}]", array) for name, array in value.items()]
        elif isinstance(value, (list, tuple)) and all(isinstance(a, np.ndarray) for a in value):
            parts = [(f"{key}[{index}]", array) for index, array in enumerate(value)]
        else:
            parts = [(key, value)]
        for name, array in parts:
            if not isinstance(array, np.ndarray):
                continue
            kind = _UNUSABLE_KINDS.get(array.dtype.kind)
            if kind:
                raise KfoptError(
                    f"{where}: {name} holds {kind} (dtype {array.dtype}, {array.size} values); a model reads numbers.",
                    "convert it to numbers (floats, class ids, token ids) before saving it.",
                )
            if (array.ndim == 0 or not len(array)) and "_val" not in key:
                raise KfoptError(
                    f"{where}: {name} is empty (shape {array.shape}).", "give every split at least one sample."
                )
            if key.startswith("x_") and array.dtype.kind == "f":
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                if bad:
                    raise KfoptError(
                        f"{where}: {name} has {bad} NaN or infinite value{'s' if bad != 1 else ''}.",
                        "fix or drop those samples before optimizing (a model scored on them scores nothing).",
                    )


def _read_npz(uri: str) -> dict[str, np.ndarray]:
    from . import _tf
    from .limits import check_npz

    tf = _tf.tf()
    try:
        exists = tf.io.gfile.exists(uri)
    except tf.errors.UnimplementedError:
        scheme = uri.split("://", 1)[0]
        raise KfoptError(
            f"Data file '{uri}': tf.io.gfile cannot read {scheme}:// URIs (no file system for that scheme).",
            "download it first (e.g. curl -o data.npz URL) and pass the local path.",
        ) from None
    if not exists:
        raise KfoptError(f"Data file '{uri}' does not exist.", "check the path or URI.")
    try:
        with tf.io.gfile.GFile(uri, "rb") as f:
            # Sizes from the zip and .npy headers first: nothing is allocated for a file over the limit.
            check_npz(f, f"Data file '{uri}'")
            arrays = np.load(f, allow_pickle=False)
            return _checked_arrays({k: arrays[k] for k in arrays.files}, f"Data file '{uri}'")
    except KfoptError:
        raise
    except Exception as exc:
        raise KfoptError(
            f"Data file '{uri}' is not a readable .npz file ({exc}).", "re-create it with np.savez."
        ) from None


def _checked_arrays(arrays: dict, where: str) -> dict[str, np.ndarray]:
    """The arrays kfopt reads (x/y train and test, and x_val/y_val when both are given), or a KfoptError.

    A model with several inputs gets one array per input and split:
    ``x_train_<input name>`` (or ``x_train_0``, ``x_train_1``, ...) keys, or, from
    Python, a list or dict of arrays as ``x_train``; they become :class:`Inputs`.
    """
    _refuse_unusable_arrays(arrays, where)
    arrays = _grouped_inputs(dict(arrays), where)
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise KfoptError(
            f"{where} is missing the arrays {', '.join(missing)} (it has: {', '.join(arrays) or 'none'}).",
            f"give {', '.join(k + '=...' for k in NPZ_KEYS)} (np.savez(path, ...) for a file; a model with several "
            "inputs takes x_train_<input name> or x_train_0, x_train_1, ...).",
        )
    given = [k for k in VALIDATION_KEYS if k in arrays]
    if len(given) == 1:
        (present,) = given
        (absent,) = set(VALIDATION_KEYS) - set(given)
        raise KfoptError(
            f"{where} has {present} but no {absent}: a validation split needs both.",
            f"save {absent} too, or neither to hold validation out of the test split.",
        )
    return {k: arrays[k] if k.startswith("x_") else np.asarray(arrays[k]) for k in NPZ_KEYS + tuple(given)}


def _grouped_inputs(arrays: dict, where: str) -> dict:
    """``arrays`` with each split's inputs as one array or :class:`Inputs` (from ``x_<split>_<name>`` keys or a
    list/dict given as ``x_<split>``)."""
    for split in ("train", "test", "val"):
        key, prefix = f"x_{split}", f"x_{split}_"
        parts = {k[len(prefix) :]: arrays.pop(k) for k in list(arrays) if k.startswith(prefix)}
        if parts and key in arrays:
            raise KfoptError(
                f"{where} has both {key} and {', '.join(prefix + p for p in parts)}.",
                f"give {key} for a model with one input, or one {prefix}<input> array per input, not both.",
            )
        if parts:
            if all(p.isdigit() for p in parts):  # positions: x_train_0, x_train_1, ... (x_train_10 after _9)
                parts = dict(sorted(parts.items(), key=lambda item: int(item[0])))
            arrays[key] = parts
        if key in arrays:
            arrays[key] = _input_arrays(arrays[key], key, where)
    return arrays


def _input_arrays(x, key: str, where: str):
    """One split's inputs: an array, or :class:`Inputs` for several (a list, tuple or dict of arrays)."""
    if isinstance(x, Inputs):
        parts = dict(zip(x.names, x.arrays))
    elif isinstance(x, Mapping):
        parts = {str(k): np.asarray(v) for k, v in x.items()}
    elif isinstance(x, (list, tuple)) and x and all(hasattr(a, "shape") for a in x):
        parts = {str(i): np.asarray(a) for i, a in enumerate(x)}
    else:
        return np.asarray(x)
    lengths = {name: len(a) for name, a in parts.items()}
    if len(set(lengths.values())) > 1:
        raise KfoptError(
            f"{where}: the input arrays of {key} have different numbers of rows "
            f"({', '.join(f'{n}: {c}' for n, c in lengths.items())}).",
            "give every input the same rows, in the same order.",
        )
    return Inputs(parts) if len(parts) > 1 else next(iter(parts.values()))


def _npz(uri: str, seed: int, validation_from: ValidationFrom) -> Data:
    return _from_arrays(_read_npz(uri), uri, seed, validation_from)


def _from_arrays(arrays, uri: str, seed: int, validation_from: ValidationFrom) -> Data:
    """Splits from ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and ``x_val``, ``y_val``) arrays."""
    splits = ("train", "test", "val") if "x_val" in arrays else ("train", "test")
    for split in splits:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise KfoptError(
                f"Data file '{uri}': x_{split} has {len(x)} rows but y_{split} has {len(y)}.",
                "save matching inputs and labels.",
            )
        if split == "val" and not len(x):
            raise KfoptError(
                f"Data file '{uri}': x_val is empty.", "save some validation rows, or leave out x_val/y_val."
            )
    x_train, x_test = _as_input(arrays["x_train"]), _as_input(arrays["x_test"])
    one_hot = is_one_hot(arrays["y_train"], arrays["y_test"], arrays.get("y_val"))
    y_train, y_test = _labels(arrays["y_train"], uri, one_hot), _labels(arrays["y_test"], uri, one_hot)
    train = Split(x_train, y_train)
    if "x_val" in arrays:
        validation, how = Split(_as_input(arrays["x_val"]), _labels(arrays["y_val"], uri, one_hot)), FROM_NPZ
        test = Split(x_test, y_test)
    elif validation_from == "train":
        (train, validation), how = _split_validation(x_train, y_train, seed), FROM_TRAIN
        test = Split(x_test, y_test)
    else:
        # Stratify on the labels as saved (a regression target has no classes to keep in proportion).
        test, validation, how = _hold_out_of_test(x_test, y_test, _class_ids(arrays["y_test"]), seed, uri)
    classes = _num_classes(y_train, y_test, validation.y)
    return Data(train, validation, test, classes, uri, how)


def _python_datasets(spec: str, seed: int, validation_from: ValidationFrom) -> Data:
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
    except Exception as exc:  # the user's module failed as it was imported (a syntax error, an exception)
        raise KfoptError(
            f"Data module '{module_name}' failed to import: {type(exc).__name__}: {exc}.",
            "fix the module (--debug shows the traceback).",
        ) from exc
    try:
        returned = function()
    except KfoptError:
        raise
    except Exception as exc:  # the loader's own error, in its own words
        raise KfoptError(
            f"Data loader '{target}' raised {type(exc).__name__}: {exc}",
            "fix the loader or what it reads (--debug shows the traceback).",
        ) from exc
    return _from_datasets(returned, target, spec, seed, validation_from)


def _from_datasets(result, target: str, spec: str, seed: int, validation_from: ValidationFrom) -> Data:
    """Splits from ``(train, test)`` or ``(train, test, validation)`` tf.data datasets of (x, y) batches."""
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3)):
        raise KfoptError(
            f"'{target}' must return (train, test) or (train, test, validation) tf.data datasets, "
            f"got {type(result).__name__}.",
            "return a pair (or a triple) of datasets of (x, y) batches.",
        )
    for name, dataset in zip(("train", "test", "validation"), result):
        if not hasattr(dataset, "as_numpy_iterator"):
            raise KfoptError(
                f"'{target}' returned a {type(dataset).__name__} as its {name} dataset, not a tf.data.Dataset.",
                "return tf.data datasets of (x, y) batches (tf.data.Dataset.from_tensor_slices((x, y)).batch(n)).",
            )
    train_ds, test_ds = result[0], result[1]
    if _repeats_forever(test_ds):
        raise KfoptError(
            f"The test dataset of '{target}' repeats forever, so it cannot be measured.",
            "return it without .repeat().",
        )
    # Every branch reads the test and validation labels once: to count the samples and the classes.
    if len(result) == 3:
        (validation, val_labels), (test, test_labels), how = _counted(result[2]), _counted(test_ds), FROM_LOADER
    elif validation_from == "train":
        train_ds, val_ds = _take_validation(train_ds)
        (validation, val_labels), (test, test_labels), how = _counted(val_ds), _counted(test_ds), FROM_TRAIN
    else:
        test, validation, how, test_labels = _hold_out_of_test_dataset(test_ds, seed, target)
        val_labels = []
    for name, split in (("test", test), ("validation", validation)):
        if not len(split):
            raise KfoptError(f"The {name} dataset of '{target}' is empty.", f"return {name} data as (x, y) batches.")
    one_hot = is_one_hot(*test_labels, *val_labels)
    labels = np.concatenate([_labels(y, spec, one_hot) for y in [*test_labels, *val_labels]])
    return Data(Split(dataset=train_ds), validation, test, _num_classes(labels), spec, how)


def _counted(dataset) -> tuple[Split, list[np.ndarray]]:
    """A tf.data split whose sample count is known now, and its label batches (read once)."""
    labels = list(_label_batches(dataset))
    return Split(dataset=dataset, size=sum(len(y) for y in labels)), labels


def _label_batches(dataset) -> Iterator[np.ndarray]:
    """The label batch of each (x, y) batch, without turning the inputs into numpy."""
    return dataset.map(lambda *element: element[1]).as_numpy_iterator()


def _repeats_forever(dataset) -> bool:
    from . import _tf

    return int(dataset.cardinality()) == int(_tf.tf().data.INFINITE_CARDINALITY)


def _take_validation(dataset):
    """Hold out the first batches of the training dataset (about 10%) for validation."""
    count = int(dataset.cardinality())
    n_val = max(1, int(round(count * VALIDATION_FRACTION))) if count > 0 else 1
    return dataset.skip(n_val), dataset.take(n_val)


def _hold_out_of_test_dataset(dataset, seed: int, target: str) -> tuple[Split, Split, str, list[np.ndarray]]:
    """(the smaller test split, validation, where validation came from, all test labels) for a tf.data test dataset.

    The split is by position, without materializing the data: every
    ``stride``-th batch (from a seeded offset) is validation, the others stay
    test, so validation is spread over the whole test set rather than taken from
    its start (which, in a test set sorted by class, would be one class). It is
    not stratified; a warning says when validation misses a class the test split has. The dataset must give the same batches on every pass (no reshuffling
    each iteration). A test dataset of a single batch is split by rows (seeded, stratified).
    """
    from . import _tf

    tf = _tf.tf()
    label_batches = list(_label_batches(dataset))
    if not label_batches:
        raise KfoptError(f"The test dataset of '{target}' is empty.", "return a test dataset with (x, y) batches.")
    if len(label_batches) == 1:
        x, y = next(dataset.as_numpy_iterator())
        x, y = _structured(x), np.asarray(y)
        test, validation, how = _hold_out_of_test(x, y, _class_ids(y), seed, f"py:{target}")
        return test, validation, how, label_batches
    # A split by position needs the same batches on every pass: a test dataset reshuffled
    # each iteration would put different rows in validation and test each time they are read.
    if not np.array_equal(next(_label_batches(dataset)), label_batches[0]):
        raise KfoptError(
            f"The test dataset of '{target}' yields different batches on each pass (shuffled each iteration?), "
            "so validation cannot be held out of it by position.",
            "do not shuffle the test dataset (or shuffle it with reshuffle_each_iteration=False), "
            "or return a third, validation dataset.",
        )
    batches = len(label_batches)
    stride = min(int(round(1 / TEST_VALIDATION_FRACTION)), batches)
    offset = int(np.random.default_rng(seed).integers(stride))
    held = [i % stride == offset for i in range(batches)]

    def part(keep_held: bool):
        chosen = dataset.enumerate().filter(lambda i, element: tf.equal(i % stride, offset) == keep_held)
        return chosen.map(lambda i, element: element)

    sizes = [len(y) for y in label_batches]
    test = Split(dataset=part(False), size=sum(s for s, h in zip(sizes, held) if not h))
    validation = Split(dataset=part(True), size=sum(s for s, h in zip(sizes, held) if h))
    _warn_missing_classes(label_batches, held, target)
    how = (
        f"held out of the test dataset by position (every {_ordinal(stride)} batch: "
        f"{sum(held)} of {batches} batches, {round(100 * len(validation) / sum(sizes))}%, seeded, not stratified)"
    )
    return test, validation, how, label_batches


def _warn_missing_classes(label_batches: list[np.ndarray], held: list[bool], target: str) -> None:
    classes = [_class_ids(y) for y in label_batches]
    if any(c is None for c in classes):
        return
    in_validation = set(np.concatenate([c for c, h in zip(classes, held) if h]).tolist())
    in_test = set(np.concatenate([c for c, h in zip(classes, held) if not h]).tolist())
    missing = sorted(in_test - in_validation)
    if missing:
        warnings.warn(
            f"Validation held out of the test dataset of '{target}' has no samples of class(es) "
            f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}; "
            "shuffle the test dataset once (seeded) before batching, or return a third, validation dataset.",
            stacklevel=4,
        )


def _ordinal(n: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(n, f"{n}th")
