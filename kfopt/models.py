"""Loading Keras models safely, and the demo baselines trained on the fly."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from . import _tf
from .errors import KfoptError

DEMO_MODELS = ("demo:mlp", "demo:cnn")
#: Input shape each demo model takes its digits in.
DEMO_INPUT_SHAPES = {"demo:mlp": (64,), "demo:cnn": (28, 28, 1)}


def load_keras(path: str | os.PathLike, *, unsafe: bool = False, sample=None):
    """Load a tf_keras model from a ``.keras`` file, ``.h5`` file or SavedModel directory.

    A file saved by Keras 3 is rebuilt in tf_keras and the conversion proven on
    ``sample`` (input data; generated when None), see :mod:`kfopt.keras3`; the
    returned model remembers it came from Keras 3 (:func:`kfopt.keras3.flavor_of`).
    Safe mode is on: a model containing a ``Lambda`` layer (arbitrary Python
    code) is refused unless ``unsafe=True``.
    """
    path = Path(path)
    if not path.exists():
        raise KfoptError(f"Model '{path}' does not exist.", "check the path, or use demo:mlp / demo:cnn.")
    config_text = _model_config_text(path)
    if not unsafe and '"Lambda"' in config_text:
        named = ", ".join(f"'{name}'" for name in _lambda_layer_names(config_text)) or "a layer"
        raise KfoptError(
            f"Model '{path}' has Lambda layer {named}, which runs arbitrary Python code when loaded; "
            "refused in safe mode.",
            "replace the Lambda with built-in layers, or pass --unsafe only if you trust where the model came from.",
        )
    from . import keras3

    if path.is_file() and keras3.is_keras3_file(path):
        return keras3.load(path, unsafe=unsafe, sample=sample)
    keras = _tf.keras()
    try:
        if path.suffix == ".keras":
            return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
        return keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise KfoptError(
            f"Model '{path}' could not be loaded as a Keras model ({type(exc).__name__}: {_first_line(exc)}).",
            "pass a .keras or .h5 file saved by Keras 3 or tf_keras, or a SavedModel directory saved with tf_keras.",
        ) from None


def _lambda_layer_names(config_text: str) -> list[str]:
    """Names of the Lambda layers in a model's architecture JSON (nested models included)."""
    import json

    names: list[str] = []

    def visit(value) -> None:
        if isinstance(value, dict):
            if value.get("class_name") == "Lambda":
                names.append(str((value.get("config") or {}).get("name") or value.get("name") or "?"))
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)

    try:
        visit(json.loads(config_text))
    except ValueError:  # a SavedModel's metadata is not plain JSON; the refusal still stands
        pass
    return names


def _model_config_text(path: Path) -> str:
    """The model's architecture JSON, read without building the model."""
    try:
        if path.is_dir():
            meta = path / "keras_metadata.pb"
            if not (path / "saved_model.pb").exists():
                raise ValueError("no saved_model.pb in the directory")
            if not meta.exists():  # a tf.Module or a graph export: nothing kfopt's techniques can work on
                raise ValueError("a SavedModel without Keras metadata (keras_metadata.pb) is not a Keras model")
            return meta.read_bytes().decode("utf-8", "replace")
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return archive.read("config.json").decode()
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                config = f.attrs.get("model_config")
                if config is None:
                    raise ValueError("no model_config in the file (weights only?)")
                return config.decode() if isinstance(config, bytes) else str(config)
    except Exception as exc:
        raise KfoptError(
            f"Model '{path}' is not a readable Keras model ({_first_line(exc)}).",
            "pass a .keras file, an .h5 file or a SavedModel directory saved with tf_keras.",
        ) from None
    raise KfoptError(
        f"Model '{path}' has an unknown format (suffix '{path.suffix}').",
        "pass a .keras file, an .h5 file, a SavedModel directory, or demo:mlp / demo:cnn.",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def build_demo(name: str, num_classes: int = 10, seed: int = 0):
    """An untrained demo architecture: ``demo:mlp`` (64 -> 256 -> 256 -> 10) or ``demo:cnn`` (28x28x1)."""
    keras = _tf.keras()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if name == "demo:mlp":
        return keras.Sequential(
            [
                keras.Input(shape=(64,)),
                layers.Dense(256, activation="relu"),
                layers.Dense(256, activation="relu"),
                layers.Dense(num_classes, activation="softmax"),
            ],
            name="demo_mlp",
        )
    if name == "demo:cnn":
        return keras.Sequential(
            [
                keras.Input(shape=(28, 28, 1)),
                layers.Conv2D(16, 3, activation="relu"),
                layers.MaxPooling2D(),
                layers.Conv2D(32, 3, activation="relu"),
                layers.MaxPooling2D(),
                layers.Flatten(),
                layers.Dense(64, activation="relu"),
                layers.Dense(num_classes, activation="softmax"),
            ],
            name="demo_cnn",
        )
    raise KfoptError(f"Unknown demo model '{name}'.", f"use one of {', '.join(DEMO_MODELS)}.")


def model_input_shape(spec: str, *, unsafe: bool = False) -> tuple:
    """Input shape (no batch axis) of a model spec, loading the model only if needed."""
    if spec in DEMO_INPUT_SHAPES:
        return DEMO_INPUT_SHAPES[spec]
    path = Path(spec)
    if path.suffix == ".keras" and path.is_file() and not _lambda_layer_names(_model_config_text(path)):
        from . import keras3

        # A Keras 3 file is converted (and proven) once, when the model itself is loaded.
        if keras3.is_keras3_file(path) and (shape := keras3.keras3_input_shape(path)) is not None:
            return shape
    return tuple(load_keras(spec, unsafe=unsafe).input_shape[1:])


def copy_model(keras_model):
    """A new model with the same architecture and weights.

    tfmot wrappers wrap the *same* layer objects, so training a wrapped model
    would otherwise change the caller's weights.
    """
    keras = _tf.keras()
    try:
        copy = keras.models.clone_model(keras_model)
    except ValueError as exc:  # subclassed models cannot be cloned
        raise KfoptError(
            f"Cannot copy model '{keras_model.name}' to optimize it: {exc}",
            "save the model as a Sequential or functional tf_keras model.",
        ) from None
    copy.set_weights(keras_model.get_weights())
    return copy
