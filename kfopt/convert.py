"""Converting Keras models to deployable formats: one TFLite converter, one SavedModel exporter."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from . import _tf

TFLITE_MODES = ("fp32", "dynamic", "float16", "int8")


def to_tflite(keras_model, mode: str = "fp32", representative: Callable | None = None) -> bytes:
    """Convert to TFLite: ``fp32`` (no quantization), ``dynamic`` range, ``float16`` or full-integer ``int8``.

    ``int8`` needs ``representative`` (a generator function yielding ``[input]``
    batches of one) for calibration; inputs and outputs become int8 too, so the
    model runs on integer-only accelerators. Zero weights stay exactly zero
    (symmetric weight quantization), so a pruned model keeps its sparsity.
    """
    tf = _tf.tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if mode == "fp32":
        pass
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None:
            raise ValueError("int8 conversion needs a representative dataset")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    else:
        raise ValueError(f"unknown TFLite mode {mode!r}; known: {', '.join(TFLITE_MODES)}")
    with warnings.catch_warnings():
        # int8 conversion warns about missing input statistics; the representative dataset provides them.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def to_saved_model(keras_model, path: str | os.PathLike, *, jit_compile: bool = False) -> Path:
    """Export a serving SavedModel whose ``serving_default`` calls the model (XLA-compiled if asked)."""
    tf = _tf.tf()
    spec = tf.TensorSpec([None, *keras_model.input_shape[1:]], tf.float32, name="input")

    class Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[spec], jit_compile=jit_compile)
        def serve(self, x):
            return {"output": self.model(x, training=False)}

    module = Serving(keras_model)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)
