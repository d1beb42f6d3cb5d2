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
    configs = _model_configs(path)
    if not unsafe:
        named = _code_layer_names(configs)
        if named:
            raise KfoptError(
                f"Model '{path}' has Lambda layer {', '.join(repr(n) for n in named)}, which runs arbitrary Python "
                "code when loaded; refused in safe mode.",
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


def _code_layer_names(configs: list) -> list[str]:
    """Names of the layers whose config carries Python code: ``Lambda`` layers and serialized functions.

    Decided on the parsed configs (every nested model included), never on the
    raw text, so a class name written with JSON escapes (``"\\u004cambda"``)
    is found like any other.
    """
    names: list[str] = []

    def visit(value, owner: str = "?") -> None:
        if isinstance(value, dict):
            config = value.get("config") if isinstance(value.get("config"), dict) else {}
            name = str(config.get("name") or value.get("name") or owner)
            if value.get("class_name") == "Lambda" or "function_type" in value or "function_type" in config:
                names.append(name)
            for item in value.values():
                visit(item, name)
        elif isinstance(value, list):
            for item in value:
                visit(item, owner)

    for config in configs:
        visit(config)
    return sorted(set(names))


def _model_configs(path: Path) -> list:
    """The model's architecture as parsed JSON, read without building the model.

    A SavedModel's ``keras_metadata.pb`` holds one JSON document per saved
    object (layers, nested models); each is parsed.
    """
    import json

    try:
        if path.is_dir():
            meta = path / "keras_metadata.pb"
            if not (path / "saved_model.pb").exists():
                raise ValueError("no saved_model.pb in the directory")
            if not meta.exists():  # a graph export: served through its signature, no Python to run
                return []
            from tf_keras.protobuf import saved_metadata_pb2

            saved = saved_metadata_pb2.SavedMetadata()
            saved.ParseFromString(meta.read_bytes())
            return [json.loads(node.metadata) for node in saved.nodes if node.metadata]
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return [json.loads(archive.read("config.json").decode())]
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                config = f.attrs.get("model_config")
                if config is None:
                    raise ValueError("no model_config in the file (weights only?)")
                return [json.loads(config.decode() if isinstance(config, bytes) else str(config))]
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
    if path.suffix == ".keras" and path.is_file() and not _code_layer_names(_model_configs(path)):
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
