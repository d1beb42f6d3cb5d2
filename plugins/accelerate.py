"""Compile a Keras model for the hardware it will run on.

Backends: ``xla`` (an XLA-compiled serving SavedModel), ``tflite`` (a float32
TFLite model run with XNNPACK, TFLite's default CPU delegate, on ``threads``
threads), ``mixed_precision`` (float16 compute on a GPU, bfloat16 on a TPU) and
``tensorrt`` (TF-TRT). A backend this host cannot run raises
:class:`TechniqueSkipped` with the reason; the input model is never handed back
as if it had been accelerated.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import Field

from kfopt import _tf
from kfopt.convert import to_saved_model, to_tflite
from kfopt.errors import TechniqueSkipped
from kfopt.sparsity import weight_sparsity

from .spec import hookimpl
from .technique import ModelHandle, StepContext, Technique

PRODUCES = {"xla": "saved_model", "tflite": "tflite", "mixed_precision": "keras", "tensorrt": "saved_model"}
MIXED_POLICIES = {"gpu": "mixed_float16", "tpu": "mixed_bfloat16"}


class Accelerate(Technique):
    """Compile for the target: XLA SavedModel, TFLite/XNNPACK, mixed precision, or TF-TRT."""

    name = "accelerate"
    kind = "accelerate"
    accepts = {"keras"}
    produces = "saved_model"  # the default backend's (xla); see produces_for

    class Config(Technique.Config):
        backend: Literal["xla", "tflite", "mixed_precision", "tensorrt"] = Field(
            "xla",
            description="xla: XLA-compiled SavedModel; tflite: float32 TFLite run with XNNPACK; "
            "mixed_precision: float16 (GPU) / bfloat16 (TPU) Keras model; tensorrt: TF-TRT SavedModel "
            "(needs an NVIDIA GPU and a TensorFlow built with TensorRT).",
        )
        threads: int = Field(
            1,
            ge=1,
            description="CPU threads the TFLite interpreter runs with (backend=tflite only). Default 1: batch-1 "
            "latency of small models is usually best on one thread, results are reproducible, and "
            "candidates measured side by side on one node do not fight over cores. Raise it for large "
            "conv models on a host with dedicated cores.",
        )

        @pydantic.model_validator(mode="after")
        def _threads_only_for_tflite(self):
            # Silently ignoring a setting the user asked for would be worse than refusing it.
            if "threads" in self.model_fields_set and self.backend != "tflite":
                raise ValueError(f"threads only applies to backend=tflite, not backend={self.backend}")
            return self

    def produces_for(self, config: Accelerate.Config) -> str:
        return PRODUCES[config.backend]

    def trains_for(self, config: Accelerate.Config) -> bool:
        # mixed_precision does not fine-tune, but it only runs on a GPU/TPU, so it
        # must be placed on the accelerator pool like training steps are.
        return config.backend == "mixed_precision"

    def apply(self, model: ModelHandle, config: Accelerate.Config, ctx: StepContext) -> ModelHandle:
        keras_model = model.keras()
        # Facts the evaluator cannot read back from a SavedModel or TFLite file.
        info = {
            **model.info,
            "accelerate": config.backend,
            "params": int(keras_model.count_params()),
            "sparsity": weight_sparsity(keras_model),
        }
        if config.backend == "xla":
            path = to_saved_model(keras_model, _new_dir(ctx, "xla") / "saved_model", jit_compile=True)
            if not is_xla_compiled(path):
                raise RuntimeError(f"the SavedModel at {path} was exported without XLA compilation")
            return ModelHandle.from_saved_model(path, info=info)
        if config.backend == "tflite":
            # The default TFLite interpreter applies XNNPACK to float32 models, so a
            # float32 conversion plus the thread count is all this backend needs.
            return ModelHandle.from_tflite(to_tflite(keras_model, "fp32"), info={**info, "threads": config.threads})
        if config.backend == "mixed_precision":
            return ModelHandle.from_keras(_mixed_precision(keras_model, ctx), info=info)
        return ModelHandle.from_saved_model(_tensorrt(keras_model, ctx), info=info)


def _new_dir(ctx: StepContext, backend: str) -> Path:
    """A fresh folder in the workdir (a recipe may accelerate more than once)."""
    Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"accelerate-{backend}-", dir=ctx.workdir))


def is_xla_compiled(saved_model_path) -> bool:
    """True when the SavedModel's ``serving_default`` runs its model under ``jit_compile=True``.

    ``tf.function(jit_compile=True)`` marks the call (and the function) with the
    ``_XlaMustCompile`` attribute, which survives saving and loading.
    """
    tf = _tf.tf()
    graph_def = tf.saved_model.load(str(saved_model_path)).signatures["serving_default"].graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    functions = list(graph_def.library.function)
    return any("_XlaMustCompile" in n.attr and n.attr["_XlaMustCompile"].b for n in nodes) or any(
        "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b for f in functions
    )


# -- mixed precision -----------------------------------------------------------
def _mixed_precision(keras_model, ctx: StepContext):
    if ctx.device not in MIXED_POLICIES:
        raise TechniqueSkipped("mixed precision needs a GPU (float16) or TPU (bfloat16); this host has only a CPU")
    with ctx.strategy.scope():
        return with_policy(keras_model, MIXED_POLICIES[ctx.device])


def with_policy(keras_model, policy: str):
    """A copy of ``keras_model`` computing in ``policy`` (weights copied), its output layer kept float32.

    A float32 output keeps the softmax (and any loss on it) numerically stable,
    as the Keras mixed-precision guide recommends.
    """
    keras = _tf.keras()
    output_layer = keras_model.outputs[0]._keras_history.layer if keras_model.outputs else keras_model.layers[-1]

    def rebuild(layer):
        if isinstance(layer, keras.Model):  # a nested model: rebuild its layers too
            return keras.models.clone_model(layer, clone_function=rebuild)
        config = layer.get_config()
        # Layer configs record their dtype policy ("float32"), which would override
        # the global policy, so set it explicitly on every layer.
        config["dtype"] = "float32" if layer is output_layer else policy
        return layer.__class__.from_config(config)

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed = keras.models.clone_model(keras_model, clone_function=rebuild)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    mixed.set_weights(keras_model.get_weights())  # variables stay float32 under a mixed policy
    return mixed


# -- TF-TRT --------------------------------------------------------------------
def tensorrt_unavailable() -> str | None:
    """Why TF-TRT cannot run here, or None when it can."""
    tf = _tf.tf()
    from tensorflow.compiler.tf2tensorrt import _pywrap_py_utils

    reasons = []
    if not tf.config.list_physical_devices("GPU"):
        reasons.append("no NVIDIA GPU is visible")
    if not _pywrap_py_utils.is_tensorrt_enabled():
        reasons.append(
            f"this TensorFlow ({tf.__version__}) was built without TensorRT "
            "(TF-TRT is not in the pip wheels since 2.18; use NVIDIA's TensorFlow container)"
        )
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append("the tensorrt package is not installed (pip install tensorrt)")
    return f"TF-TRT cannot run on this host: {'; '.join(reasons)}" if reasons else None


def _tensorrt(keras_model, ctx: StepContext) -> Path:
    reason = tensorrt_unavailable()
    if reason:
        raise TechniqueSkipped(reason)
    from tensorflow.python.compiler.tensorrt import trt_convert as trt

    work = _new_dir(ctx, "tensorrt")
    source = to_saved_model(keras_model, work / "source")
    # FP16 is where TensorRT's speed comes from; the evaluator measures any
    # accuracy cost like for every other candidate. Engines are built on first
    # use (the evaluator's warm-up), for the input shapes actually seen.
    converter = trt.TrtGraphConverterV2(input_saved_model_dir=str(source), precision_mode=trt.TrtPrecisionMode.FP16)
    converter.convert()
    target = work / "saved_model"
    converter.save(str(target))
    return target


@hookimpl
def kfopt_register_techniques(register):
    register(Accelerate())
