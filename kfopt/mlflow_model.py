"""How a kfopt model becomes an MLflow model that serves anywhere.

- TFLite and SavedModel models are pyfunc models whose loader is
  :mod:`kfopt.serving_loader`, shipped inside the model (``code/``): serving
  them needs numpy and LiteRT (TFLite) or TensorFlow (a SavedModel, or a
  TFLite model with Select TF ops), never kfopt.
- A Keras model is logged in the Keras the user has: a Keras 3 file with
  MLflow's ``keras`` flavor (Keras 3 loads it), a tf_keras model with the
  ``tensorflow`` flavor.
- The input example is a few real test rows in their own dtype (token ids
  stay integers); the signature is read from the model run on them, with one
  named tensor per input for a model with several inputs.
- Requirements are only what loading the model needs, pinned to the versions
  that measured it.

MLflow is imported when a model is logged, not when this module is imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import serving_loader

#: Rows of the test split logged as a model's input example.
EXAMPLE_ROWS = 3
#: The name the loader has inside a logged model (top level in its ``code/`` folder, unlikely to clash).
LOADER_MODULE = "kfopt_serving_loader"
#: LiteRT where a wheel exists (Linux, macOS); elsewhere TensorFlow's interpreter runs the model.
LITERT_PLATFORMS = 'platform_system == "Linux" or platform_system == "Darwin"'
OTHER_PLATFORMS = 'platform_system != "Linux" and platform_system != "Darwin"'  # markers have no "not"
#: LiteRT releases the loader is written against, when LiteRT is not installed here to pin its version.
LITERT_RANGE = ">=2.0,<3"


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _pinned(package: str) -> str:
    found = installed(package)
    return f"{package}=={found}" if found else package


def logged_model_name(label: str) -> str:
    """A LoggedModel name for a recipe label (MLflow refuses ``/ : . % " '`` in names): its readable slug.

    ``prune(target_sparsity=0.5)>quantize(mode=int8)`` -> ``prune-target_sparsity-0_5-quantize-mode-int8``.
    """
    text = re.sub(r"(\d)\.(\d)", r"\1_\2", label)
    text = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return text[:200] or "model"


@dataclass(frozen=True)
class Examples:
    """A few real input rows: one array, or arrays keyed by the model's input names (several inputs)."""

    arrays: tuple[np.ndarray, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, x, rows: int = EXAMPLE_ROWS) -> Examples:
        """The first ``rows`` of ``x`` (an array, or :class:`kfopt.data.Inputs`), dtypes kept."""
        from .data import Inputs, input_list

        names = tuple(x.names) if isinstance(x, Inputs) else ("input",)
        return cls(tuple(np.asarray(a[:rows]) for a in input_list(x)), names)

    def for_model(self, input_names: list[str]):
        """What a client sends this model: one array, or a dict keyed by ``input_names`` (several inputs).

        Arrays keyed by the model's names go to those names; numbered ones (data given as a list) by position.
        """
        if len(input_names) == 1:
            return self.arrays[0]
        if set(self.names) == set(input_names):
            return {name: self.arrays[self.names.index(name)] for name in input_names}
        return dict(zip(input_names, self.arrays))


@dataclass(frozen=True)
class LoggedModel:
    """What ``log_model`` logged: the LoggedModel's id and ``models:/`` URI."""

    model_id: str
    model_uri: str


def requirements(format: str, *, runtime: str = serving_loader.LITERT, keras3: bool = False) -> list[str]:
    """The pip requirements of a served model: what loading it needs, at the versions that measured it."""
    numpy = _pinned("numpy")
    tensorflow = _pinned("tensorflow")
    if format == "tflite" and runtime == serving_loader.LITERT:
        litert = installed("ai-edge-litert")
        litert = f"ai-edge-litert=={litert}" if litert else f"ai-edge-litert{LITERT_RANGE}"
        return [numpy, f"{litert}; {LITERT_PLATFORMS}", f"{tensorflow}; {OTHER_PLATFORMS}"]
    if format == "keras":
        return [numpy, tensorflow, _pinned("keras") if keras3 else _pinned("tf-keras")]
    return [numpy, tensorflow]


def log_model(
    run_id: str,
    format: str,
    path: Path,
    *,
    name: str,
    examples: Examples | None = None,
    threads: int = 1,
) -> LoggedModel:
    """Log the model file ``path`` (a candidate or the baseline) on the run ``run_id`` as a LoggedModel ``name``.

    MLflow's fluent ``log_model`` is used inside the run, so the caller switches
    MLflow's tracking URI to the run's first (:func:`kfopt.rundir.tracking_uri`).
    """
    import mlflow

    path = Path(path)
    # Keras prints prediction progress bars on stdout; keep stdout for --json.
    with (
        redirect_stdout(sys.stderr),
        warnings.catch_warnings(),
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None),
    ):
        warnings.simplefilter("ignore")  # MLflow's notes on integer columns and pip inference
        if format == "keras":
            info = _log_keras(path, name, examples)
        else:
            info = _log_served(format, path, name, examples, threads)
    return LoggedModel(model_id=info.model_id, model_uri=info.model_uri)


def _log_served(format: str, path: Path, name: str, examples: Examples | None, threads: int):
    """A TFLite or SavedModel model as a pyfunc whose loader ships with it (no kfopt at serving time)."""
    import mlflow

    runtime = serving_loader.LITERT
    if format == "tflite":
        from .convert import SELECT_TF_OPS, tflite_ops

        if SELECT_TF_OPS in tflite_ops(path.read_bytes())["tflite_ops"]:
            runtime = serving_loader.TENSORFLOW  # LiteRT has no Select TF ops
    else:
        runtime = serving_loader.TENSORFLOW
    with tempfile.TemporaryDirectory(prefix="kfopt-mlflow-model-") as folder:
        data = Path(folder, "model")
        data.mkdir()
        if path.is_dir():
            shutil.copytree(path, data / path.name)
        else:
            shutil.copy2(path, data / path.name)
        config = {"format": format, "file": path.name, "threads": int(threads or 1), "runtime": runtime}
        (data / serving_loader.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        loader = Path(folder, f"{LOADER_MODULE}.py")
        shutil.copy2(serving_loader.__file__, loader)
        # The loader, run here on the example: the signature is what serving returns, and a model the
        # loader cannot run is found now, not by the first request.
        served = serving_loader._load_pyfunc(str(data))
        example, signature = _example_and_signature(served, examples)
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=LOADER_MODULE,
            data_path=str(data),
            code_paths=[str(loader)],
            signature=signature,
            input_example=example,
            pip_requirements=requirements(format, runtime=runtime),
        )


def _log_keras(path: Path, name: str, examples: Examples | None):
    """A Keras model in the user's Keras: a Keras 3 file with MLflow's keras flavor, tf_keras with tensorflow's."""
    import mlflow

    from . import keras3

    if keras3.is_keras3_file(path):
        model = keras3.keras3().saving.load_model(path, compile=False)
        names = [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(model.inputs)]
        predict = _keras_predict(model)
        example, signature = _example_and_signature(_Predictor(names, predict, list(model.inputs)), examples)
        # mlflow.keras.log_model itself, but with a save_model that creates the model's folder first:
        # MLflow's keras flavor writes the input example before it makes the folder (FileNotFoundError).
        return mlflow.models.Model.log(
            artifact_path=None,
            name=name,
            flavor=SimpleNamespace(__name__=mlflow.keras.__name__, save_model=_save_keras3),
            model=model,
            signature=signature,
            input_example=example,
            pip_requirements=requirements("keras", keras3=True),
        )
    from .models import load_keras

    model = load_keras(path)
    names = list(getattr(model, "input_names", None) or ["input"])
    example, signature = _example_and_signature(_Predictor(names, _keras_predict(model), list(model.inputs)), examples)
    return mlflow.tensorflow.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        pip_requirements=requirements("keras"),
    )


def _save_keras3(path, **kwargs):
    """``mlflow.keras.save_model`` into a folder that exists (see _log_keras)."""
    import mlflow.keras

    os.makedirs(path, exist_ok=True)
    return mlflow.keras.save_model(path=path, **kwargs)


def _keras_predict(model):
    def predict(x):
        out = model.predict(x, verbose=0)
        if isinstance(out, dict):
            return {k: np.asarray(v, np.float32) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            names = list(getattr(model, "output_names", None) or range(len(out)))
            return {str(k): np.asarray(v, np.float32) for k, v in zip(names, out)}
        return np.asarray(out, np.float32)

    return predict


@dataclass
class _Predictor:
    """A Keras model as :func:`_example_and_signature` sees a served one."""

    input_names: list[str]
    predict: object
    inputs: list = None  # the model's input tensors

    def input_specs(self):
        return [
            (
                name,
                np.dtype(getattr(t.dtype, "name", None) or str(t.dtype)),
                tuple(-1 if d is None else int(d) for d in t.shape),
            )
            for name, t in zip(self.input_names, self.inputs or [])
        ]


def _example_and_signature(model, examples: Examples | None):
    """(input example, signature) from the real rows run through ``model``.

    Without real rows (data passed from Python cannot be read again) there is
    no example, rather than zeros that look like data, and the signature is the
    model's inputs alone (names, dtypes, shapes).
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    if examples is None:
        specs = model.input_specs()
        named = len(specs) > 1
        inputs = [TensorSpec(dtype, (-1, *shape[1:]), name if named else None) for name, dtype, shape in specs]
        return None, ModelSignature(inputs=Schema(inputs))

    example = examples.for_model(list(model.input_names))
    return example, infer_signature(example, model.predict(example))
