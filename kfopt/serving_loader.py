"""Serving a kfopt candidate with MLflow where kfopt is not installed: the loader shipped inside the model.

kfopt logs a TFLite or SavedModel candidate as an MLflow pyfunc model whose
``loader_module`` is this file: MLflow copies it into the model's ``code/``
folder and calls :func:`_load_pyfunc` with the model's ``data`` folder. So
``mlflow models serve -m models:/NAME@champion`` needs nothing but numpy and a
runtime: LiteRT (``ai-edge-litert``) for a TFLite model, falling back to
TensorFlow's interpreter when LiteRT is not installed (or the model uses
Select TF ops, which only TensorFlow runs); TensorFlow for a SavedModel.

This file imports nothing from kfopt, on purpose: it must run in an
environment that has only the model's requirements. It behaves as kfopt's own
runners (:mod:`kfopt.evaluate`) that measured the candidate: inputs keep their
dtype (token ids stay integers), a full-integer model's int8 inputs are
quantized from floats and its outputs dequantized, a model converted at a fixed
batch of 1 (a fused LSTM) runs a batch row by row with its state reset.

``predict`` takes one array for a model with one input, or a dict of arrays
keyed by the model's input names; it returns one float32 array for a model with
one output, or a dict keyed by output name.
"""

from __future__ import annotations

import json
import os
import threading
import warnings

import numpy as np

#: Written beside the model file in the model's data folder: what the loader needs to know.
CONFIG_FILE = "kfopt_serving.json"
#: ``runtime`` values of the config: which runtime the model needs.
LITERT = "litert"  # LiteRT if installed, else TensorFlow's interpreter
TENSORFLOW = "tensorflow"  # TensorFlow only (SavedModel; TFLite with Select TF ops)


def _load_pyfunc(data_path: str):
    """MLflow's entry point for a ``loader_module``: the model in ``data_path``, ready to predict."""
    with open(os.path.join(data_path, CONFIG_FILE)) as f:
        config = json.load(f)
    path = os.path.join(data_path, config["file"])
    if config["format"] == "tflite":
        with open(path, "rb") as f:
            content = f.read()
        return TFLiteModel(content, threads=int(config.get("threads") or 1), runtime=config.get("runtime", LITERT))
    if config["format"] == "saved_model":
        return SavedModelModel(path)
    raise ValueError(f"unknown model format {config['format']!r} in {CONFIG_FILE}")


def interpreter_class(runtime: str = LITERT):
    """LiteRT's ``Interpreter``; TensorFlow's when LiteRT is missing or ``runtime`` asks for TensorFlow."""
    if runtime != TENSORFLOW:
        try:
            from ai_edge_litert.interpreter import Interpreter

            return Interpreter
        except ImportError:  # no LiteRT wheel for this platform or Python: TensorFlow runs the same flatbuffer
            pass
    import tensorflow as tf

    return tf.lite.Interpreter


class _Model:
    """The pyfunc interface MLflow calls: ``predict(model_input, params=None)``."""

    input_names: list[str]
    output_names: list[str]

    def predict(self, model_input, params=None):
        outputs = self.outputs(self._arrays(model_input))
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs))

    def _arrays(self, model_input) -> list[np.ndarray]:
        """The input arrays in the model's order, from one array, a dict keyed by input name, or a DataFrame."""
        if hasattr(model_input, "to_numpy") and not isinstance(model_input, np.ndarray):  # a pandas DataFrame
            if len(self.input_names) > 1 and set(self.input_names) <= set(model_input.columns):
                model_input = {name: np.stack(model_input[name].to_numpy()) for name in self.input_names}
            else:
                model_input = model_input.to_numpy()
        if isinstance(model_input, dict):
            missing = [name for name in self.input_names if name not in model_input]
            if missing:
                raise ValueError(f"missing inputs {missing}; the model takes {self.input_names}")
            return [np.asarray(model_input[name]) for name in self.input_names]
        if len(self.input_names) != 1:
            raise ValueError(f"the model takes {len(self.input_names)} inputs: pass a dict keyed by {self.input_names}")
        return [np.asarray(model_input)]

    def outputs(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def input_specs(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(name, dtype a client sends, shape with -1 for any size) of each input."""
        raise NotImplementedError


class TFLiteModel(_Model):
    """A TFLite flatbuffer in LiteRT's (or TensorFlow's) interpreter, inputs and outputs named by its signature."""

    def __init__(self, content: bytes, threads: int = 1, runtime: str = LITERT):
        with warnings.catch_warnings():  # tf.lite.Interpreter's notice about LiteRT, when it is the fallback
            warnings.simplefilter("ignore")
            self.interpreter = interpreter_class(runtime)(model_content=content, num_threads=threads)
        self.runtime = type(self.interpreter).__module__.split(".")[0]
        self.interpreter.allocate_tensors()
        self._lock = threading.Lock()  # an interpreter is not thread-safe; MLflow's server may call from threads
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        self.input_names, self.output_names = tensor_names(self.interpreter)
        first = self._inputs[0]["shape_signature"]
        self.fixed_batch = int(first[0]) if len(first) and first[0] > 0 else None
        self._batch = None

    def input_specs(self):
        specs = []
        for name, detail in zip(self.input_names, self._inputs):
            dtype = np.dtype(detail["dtype"])
            if dtype in (np.int8, np.uint8, np.int16) and detail["quantization"][0]:
                dtype = np.dtype(np.float32)  # a full-integer model is fed floats, quantized here
            specs.append((name, dtype, tuple(int(d) if d > 0 else -1 for d in detail["shape_signature"])))
        return specs

    def outputs(self, arrays):
        with self._lock:
            rows = len(arrays[0])
            if self.fixed_batch is None or rows == self.fixed_batch:
                return self._run(arrays)
            step = self.fixed_batch
            parts = [self._run([a[i : i + step] for a in arrays]) for i in range(0, rows, step)]
            return [np.concatenate(column) for column in zip(*parts)]

    def _run(self, arrays):
        if len(arrays[0]) != self._batch:
            for detail, array in zip(self._inputs, arrays):
                self.interpreter.resize_tensor_input(detail["index"], [len(array), *detail["shape_signature"][1:]])
            self.interpreter.allocate_tensors()
            self._inputs = self.interpreter.get_input_details()
            self._outputs = self.interpreter.get_output_details()
            self._batch = len(arrays[0])
        for detail, array in zip(self._inputs, arrays):
            self.interpreter.set_tensor(detail["index"], to_input(array, detail))
        # A fused LSTM keeps its state in variable tensors: every request starts from zeros.
        self.interpreter.reset_all_variables()
        self.interpreter.invoke()
        return [from_output(self.interpreter.get_tensor(d["index"]), d) for d in self._outputs]


def tensor_names(interpreter) -> tuple[list[str], list[str]]:
    """The input and output names of a TFLite interpreter, in its tensor order: its one signature's names
    (the model's), else the tensors' own."""
    names: dict[int, str] = {}
    signatures = interpreter.get_signature_list()
    if len(signatures) == 1:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        for details in (runner.get_input_details(), runner.get_output_details()):
            names.update({detail["index"]: name for name, detail in details.items()})
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    return [names.get(d["index"], d["name"]) for d in inputs], [names.get(d["index"], d["name"]) for d in outputs]


def to_input(array: np.ndarray, detail: dict) -> np.ndarray:
    """``array`` as the interpreter's input ``detail`` takes it: quantized for an integer input fed floats."""
    array = np.asarray(array)
    dtype = detail["dtype"]
    scale, zero = detail["quantization"]
    if dtype in (np.int8, np.uint8, np.int16) and scale:  # full-integer model: quantize as a device would
        limits = np.iinfo(dtype)
        return np.clip(np.round(array.astype(np.float32) / scale + zero), limits.min, limits.max).astype(dtype)
    return array.astype(dtype, copy=False)  # integer ids stay integers, floats float


def from_output(out: np.ndarray, detail: dict) -> np.ndarray:
    """An output as float32 (dequantized from int8 when the model computes in integers)."""
    scale, zero = detail["quantization"]
    if out.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (out.astype(np.float32) - zero) * scale
    return out.astype(np.float32)


class SavedModelModel(_Model):
    """A SavedModel's ``serving_default`` signature, inputs and outputs by its keys (TensorFlow only)."""

    def __init__(self, path: str):
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(path)
        self._fn = self._loaded.signatures["serving_default"]
        self._specs = self._fn.structured_input_signature[1]
        self.input_names = list(self._specs)
        self.output_names = list(self._fn.structured_outputs)

    def input_specs(self):
        return [
            (name, np.dtype(spec.dtype.as_numpy_dtype), tuple(-1 if d is None else int(d) for d in spec.shape))
            for name, spec in self._specs.items()
        ]

    def outputs(self, arrays):
        feed = {
            name: self._tf.constant(np.asarray(array, self._specs[name].dtype.as_numpy_dtype))
            for name, array in zip(self.input_names, arrays)
        }
        out = self._fn(**feed)
        return [np.asarray(out[name], np.float32) for name in self.output_names]
