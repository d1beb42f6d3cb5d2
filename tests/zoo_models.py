"""The architectures users bring, built small with random weights and trained an epoch or two (no downloads).

Shared by tests/test_zoo.py and bench/zoo.py. Each :class:`ZooModel` builds its
model, saves it where a user's file would be (a ``.keras`` file, or a
SavedModel directory for the subclassed model) and returns it with its data:

- images: scikit-learn's digits upsampled to 32x32x3 (``tf.image.resize``) for
  ``keras.applications`` MobileNetV2 / EfficientNetB0 and a small ResNet;
- text: generated integer token sequences with a learnable rule (the class is
  the keyword token that appears in the sequence) for a Transformer encoder and
  LSTM / GRU classifiers (integer inputs, kept integers end to end);
- digits as 64-vectors for the MLPs (tf_keras and Keras 3), a two-input model
  (left and right half of each image, npz-style keys ``x_train_left``/``x_train_right``),
  a two-output model (the digit, and whether it is even) and a subclassed
  Keras 3 model exported as a SavedModel (``model.export``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kfopt import _tf

SEED = 0
IMAGE = (32, 32, 3)
VOCAB, SEQUENCE, KEYWORDS = 64, 24, 3
#: Post-training recipes (no fine-tuning): what every zoo model is run through in the tests.
POST_TRAINING = ("quantize(mode=dynamic)", "quantize(mode=int8)", "quantize(mode=float16)")


@dataclass
class ZooModel:
    """One zoo architecture: how to build it, and what a user would pass with it."""

    name: str
    build: Callable[[Path], tuple[str, dict]]
    #: Heavy to build, train or convert (tests mark it slow).
    slow: bool = False
    #: Which output the metric is computed on (None: the first).
    output: str | None = None
    notes: list[str] = field(default_factory=list)


# -- data ---------------------------------------------------------------------------------
def digits_flat() -> dict[str, np.ndarray]:
    """Digits as 64-vectors in [0, 1]: x_train, y_train, x_test, y_test (80/20, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.2, random_state=SEED, stratify=bunch.target
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def digits_images() -> dict[str, np.ndarray]:
    """Digits upsampled to 32x32x3 (grey repeated over three channels)."""
    tf = _tf.tf()
    flat = digits_flat()

    def images(x):
        resized = tf.image.resize(x.reshape(-1, 8, 8, 1), IMAGE[:2], method="bilinear").numpy()
        return np.repeat(resized, 3, axis=-1).astype(np.float32)

    return {**flat, "x_train": images(flat["x_train"]), "x_test": images(flat["x_test"])}


def token_sequences(samples: int = 2400) -> dict[str, np.ndarray]:
    """Integer token ids (int32) whose class is the keyword token (1, 2 or 3) planted in them three times."""
    rng = np.random.default_rng(SEED)
    x = rng.integers(KEYWORDS + 1, VOCAB, size=(samples, SEQUENCE)).astype(np.int32)
    y = rng.integers(0, KEYWORDS, size=samples)
    for row, label in enumerate(y):
        x[row, rng.choice(SEQUENCE, size=3, replace=False)] = label + 1
    cut = samples * 4 // 5
    return {"x_train": x[:cut], "y_train": y[:cut], "x_test": x[cut:], "y_test": y[cut:]}


# -- training ----------------------------------------------------------------------------------
def _trained(model, x, y, *, epochs: int = 1, learning_rate: float = 3e-3, loss="sparse_categorical_crossentropy"):
    keras = _keras3() if _is_keras3(model) else _tf.keras()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def _fast_batchnorm(model):
    """``model`` with BatchNorm momentum 0.9, so it can be trained briefly (and is saved so).

    keras.applications use 0.99-0.999, so after an epoch or two the moving
    statistics are still near their initial values and inference is at
    chance level; at 0.9 they follow the data within a few dozen steps.
    """
    for layer in _all_layers(model):
        if hasattr(layer, "moving_mean"):
            layer.momentum = 0.9
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _is_keras3(model) -> bool:
    return isinstance(model, _keras3().Model)


def _keras3():
    from kfopt.keras3 import keras3

    return keras3()


def _save(model, directory: Path, name: str) -> str:
    path = directory / f"{name}.keras"
    model.save(path)
    return str(path)


# -- the architectures --------------------------------------------------------------------------------
def mobilenet_v2(directory: Path) -> tuple[str, dict]:
    keras = _tf.keras()
    keras.utils.set_random_seed(SEED)
    model = keras.applications.MobileNetV2(weights=None, input_shape=IMAGE, alpha=0.35, classes=10)
    data = digits_images()
    _trained(_fast_batchnorm(model), data["x_train"], data["y_train"], epochs=2)
    return _save(model, directory, "mobilenet_v2"), data


def efficientnet_b0(directory: Path) -> tuple[str, dict]:
    keras = _tf.keras()
    keras.utils.set_random_seed(SEED)
    model = keras.applications.EfficientNetB0(weights=None, input_shape=IMAGE, classes=10)
    data = digits_images()
    _trained(_fast_batchnorm(model), data["x_train"], data["y_train"], epochs=2)
    return _save(model, directory, "efficientnet_b0"), data


def resnet(directory: Path) -> tuple[str, dict]:
    """Two residual blocks: Conv, BatchNorm, ReLU and an Add (a 1x1 projection where the width changes)."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(SEED)

    def block(x, filters: int, stride: int):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization()(y))
        y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = layers.BatchNormalization()(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x))
        return layers.ReLU()(layers.Add()([y, shortcut]))

    inputs = keras.Input(IMAGE)
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)))
    x = block(x, 16, 1)
    x = block(x, 32, 2)
    outputs = layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs, name="small_resnet")
    data = digits_images()
    _trained(_fast_batchnorm(model), data["x_train"], data["y_train"], epochs=2)
    return _save(model, directory, "resnet"), data


def transformer(directory: Path) -> tuple[str, dict]:
    """One encoder block on integer tokens: Embedding, MultiHeadAttention, LayerNormalization, a feed-forward block."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(SEED)
    tokens = keras.Input((SEQUENCE,), dtype="int32", name="tokens")
    x = layers.Embedding(VOCAB, 32)(tokens)  # no positions: the class is which keyword occurs, not where
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=16)(x, x)
    x = layers.LayerNormalization()(layers.Add()([x, attended]))
    ffn = layers.Dense(32)(layers.Dense(64, activation="relu")(x))
    x = layers.LayerNormalization()(layers.Add()([x, ffn]))
    outputs = layers.Dense(KEYWORDS, activation="softmax")(layers.GlobalAveragePooling1D()(x))
    model = keras.Model(tokens, outputs, name="transformer")
    data = token_sequences()
    return _save(_trained(model, data["x_train"], data["y_train"], epochs=2), directory, "transformer"), data


def _recurrent(directory: Path, cell: str) -> tuple[str, dict]:
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [
            keras.Input((SEQUENCE,), dtype="int32", name="tokens"),
            layers.Embedding(VOCAB, 16),
            getattr(layers, cell)(24),
            layers.Dense(KEYWORDS, activation="softmax"),
        ],
        name=cell.lower(),
    )
    data = token_sequences()
    return _save(
        _trained(model, data["x_train"], data["y_train"], epochs=2, learning_rate=1e-2), directory, cell.lower()
    ), data


def lstm(directory: Path) -> tuple[str, dict]:
    return _recurrent(directory, "LSTM")


def gru(directory: Path) -> tuple[str, dict]:
    return _recurrent(directory, "GRU")


def two_inputs(directory: Path) -> tuple[str, dict]:
    """Left and right half of each digit image as two named inputs; the data names its arrays after them."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(SEED)
    left, right = keras.Input((32,), name="left"), keras.Input((32,), name="right")
    x = layers.Concatenate()([layers.Dense(32, activation="relu")(left), layers.Dense(32, activation="relu")(right)])
    model = keras.Model([left, right], layers.Dense(10, activation="softmax")(x), name="two_inputs")
    flat = digits_flat()
    data = {f"{key}_{side}": flat[key][:, part] for key in ("x_train", "x_test") for side, part in _HALVES.items()}
    data.update(y_train=flat["y_train"], y_test=flat["y_test"])
    x = {side: data[f"x_train_{side}"] for side in _HALVES}
    return _save(_trained(model, x, flat["y_train"], epochs=3), directory, "two_inputs"), data


_HALVES = {"left": slice(0, 32), "right": slice(32, 64)}


def two_outputs(directory: Path) -> tuple[str, dict]:
    """The digit (softmax, first output) and whether it is even (sigmoid); the labels are the digit's."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((64,), name="pixels")
    hidden = layers.Dense(64, activation="relu")(inputs)
    digit = layers.Dense(10, activation="softmax", name="digit")(hidden)
    even = layers.Dense(1, activation="sigmoid", name="even")(hidden)
    model = keras.Model(inputs, [digit, even], name="two_outputs")
    data = digits_flat()
    targets = {"digit": data["y_train"], "even": (data["y_train"] % 2 == 0).astype(np.float32)}
    losses = {"digit": "sparse_categorical_crossentropy", "even": "binary_crossentropy"}
    _trained(model, data["x_train"], targets, epochs=3, loss=losses)
    return _save(model, directory, "two_outputs"), data


def mlp_tf_keras(directory: Path) -> tuple[str, dict]:
    keras = _tf.keras()
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    data = digits_flat()
    return _save(_trained(model, data["x_train"], data["y_train"], epochs=3), directory, "mlp_tf_keras"), data


def mlp_keras3(directory: Path) -> tuple[str, dict]:
    keras = _keras3()
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    data = digits_flat()
    return _save(_trained(model, data["x_train"], data["y_train"], epochs=3), directory, "mlp_keras3"), data


def subclassed_saved_model(directory: Path) -> tuple[str, dict]:
    """A subclassed Keras 3 model exported with ``model.export``: a SavedModel with no Keras layers to load."""
    keras = _keras3()
    keras.utils.set_random_seed(SEED)

    class Classifier(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.hidden = keras.layers.Dense(64, activation="relu")
            self.out = keras.layers.Dense(10, activation="softmax")

        def call(self, x):
            return self.out(self.hidden(x))

    model = Classifier()
    data = digits_flat()
    _trained(model, data["x_train"], data["y_train"], epochs=3)
    path = directory / "subclassed_saved_model"
    model.export(str(path), verbose=False)
    return str(path), data


ZOO = [
    ZooModel("mlp (tf_keras)", mlp_tf_keras),
    ZooModel("mlp (Keras 3)", mlp_keras3),
    ZooModel("two inputs", two_inputs),
    ZooModel("two outputs", two_outputs),
    ZooModel("subclassed SavedModel", subclassed_saved_model),
    ZooModel("transformer", transformer),
    ZooModel("lstm", lstm),
    ZooModel("gru", gru),
    ZooModel("resnet", resnet),
    ZooModel("mobilenet_v2", mobilenet_v2, slow=True),
    ZooModel("efficientnet_b0", efficientnet_b0, slow=True),
]
