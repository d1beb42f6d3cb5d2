"""Built-in ``quantize`` technique: post-training quantization or quantization-aware training to TFLite."""

from __future__ import annotations

import contextlib
from typing import Literal

import pydantic
from pydantic import Field

from kfopt import _tf
from kfopt.convert import to_tflite
from kfopt.errors import KfoptError
from kfopt.models import copy_model
from kfopt.sparsity import weight_sparsity
from kfopt.training import fine_tune, task_loss

from .layers import kernels, note, require_layer_graph, with_note
from .prune import check_layer_names
from .spec import hookimpl
from .technique import LayerNames, ModelHandle, StepContext, Technique

#: Above this kernel sparsity the input counts as pruned, and QAT keeps its zeros.
PRUNED_SPARSITY = 0.1


class Quantize(Technique):
    """Convert a Keras model to a quantized TFLite model.

    ``dynamic``: int8 weights, float activations (no data needed).
    ``float16``: float16 weights (halves size; GPU delegates run it natively).
    ``int8``: full-integer weights, activations, inputs and outputs, calibrated
    on ``calibration_samples`` training inputs (for integer-only accelerators).
    ``qat``: quantization-aware fine-tuning with tfmot, then full-integer int8;
    a pruned input keeps its zeros (tfmot's prune-preserving scheme).
    ``float_layers`` (qat only) leaves the named layers unannotated, so they
    stay float (selective QAT); the TFLite model then mixes int8 and float
    ops and takes and returns float32.

    QAT annotates the layers tfmot's default 8-bit scheme supports (Dense,
    Conv, DepthwiseConv2D, activations, pooling, Add, ...; a BatchNormalization
    right after a linear Conv/Dense, which it folds) and trains every other one
    (Rescaling, Normalization, Multiply, Embedding, MultiHeadAttention,
    LayerNormalization, ...) in float, so those never block it; the int8
    conversion then calibrates them like post-training int8.
    ``info["float_layers"]`` maps each layer QAT left float to why and
    ``info["notes"]`` says it in one line.

    Zero weights stay exactly zero in every mode, so a pruned model keeps its
    sparsity and compresses well.
    """

    name = "quantize"
    kind = "quantize"
    # A SavedModel without Keras layers is quantized post-training through its serving signature.
    accepts = {"keras", "saved_model"}
    produces = "tflite"

    class Config(Technique.Config):
        mode: Literal["dynamic", "float16", "int8", "qat"] = Field(
            "int8",
            description="dynamic: int8 weights; float16: float16 weights; int8: full-integer with "
            "calibration; qat: quantization-aware fine-tuning, then full-integer int8.",
        )
        epochs: int = Field(3, ge=1, description="qat only: quantization-aware fine-tuning epochs.")
        learning_rate: float = Field(1e-4, gt=0, description="qat only: Adam learning rate for fine-tuning.")
        calibration_samples: int = Field(
            200, ge=1, description="int8 and qat: training inputs used to calibrate activation ranges."
        )
        float_layers: LayerNames = Field(
            [],
            description="qat only: names of layers to keep in float (not annotated for quantization, e.g. the "
            "most sensitive ones); the model then takes and returns float32.",
        )

        @pydantic.model_validator(mode="after")
        def _float_layers_need_qat(self):
            if self.float_layers and self.mode != "qat":
                raise ValueError(
                    f"float_layers applies to mode=qat only (mode={self.mode} quantizes every layer); "
                    "use mode=qat, or drop float_layers"
                )
            return self

    def trains_for(self, config: Quantize.Config) -> bool:
        return config.mode == "qat"

    def check(self, model, config: Quantize.Config) -> None:
        if model.format == "saved_model" and config.mode == "qat":
            raise KfoptError(
                f"quantize(mode=qat) fine-tunes Keras layers, but the model is {model.kind}.",
                "use quantize(mode=int8), dynamic or float16 (through the SavedModel's signature), or pass the "
                "Keras model.",
            )
        if model.has_keras_layers and config.mode == "qat":
            source = model.keras()
            require_layer_graph(source, "quantize(mode=qat)")
            check_layer_names(source, config.float_layers, "quantize", "float_layers")
            qat_float_layers(source, config.float_layers, qat_scheme(preserve=False))

    def apply(self, model: ModelHandle, config: Quantize.Config, ctx: StepContext) -> ModelHandle:
        if model.format == "saved_model":
            representative = ctx.representative(config.calibration_samples) if config.mode == "int8" else None
            data = to_tflite(model.saved_model_path(), config.mode, representative=representative)
            return ModelHandle.from_tflite(data, info={**model.info, "quantization": config.mode})
        source = model.keras()
        sparsity = weight_sparsity(source)
        info = {**model.info, "params": source.count_params(), "quantization": config.mode}
        if config.mode == "qat":
            require_layer_graph(source, "quantize(mode=qat)")
            check_layer_names(source, config.float_layers, "quantize", "float_layers")
            to_convert, sparsity, floats = _quantization_aware(source, config, ctx, sparsity)
            if floats:
                info["float_layers"] = floats
                line = note("quantize(mode=qat)", floats, _layer_count(source), "float")
                info["notes"] = with_note(model.info, line)
            # With float layers the converter takes the int8 ranges QAT learned and leaves the
            # rest float ("dynamic" adds no calibration; int8-only conversion would quantize them too).
            mode = "dynamic" if config.float_layers else "int8"
        else:
            to_convert, mode = source, config.mode
        representative = ctx.representative(config.calibration_samples) if mode == "int8" else None
        # A recurrent model is rebuilt from its config to be unrolled for TFLite: a QAT model's wrappers and
        # quantizers are custom objects Keras finds only inside tfmot's scope (imported for QAT only: 1.5 s).
        scope = _tf.tfmot().quantization.keras.quantize_scope() if config.mode == "qat" else contextlib.nullcontext()
        with scope:
            data = to_tflite(to_convert, mode, representative=representative)
        return ModelHandle.from_tflite(data, info={**info, "sparsity": sparsity})


def qat_scheme(preserve: bool):
    """tfmot's default 8-bit scheme, or its prune-preserving variant (which masks kernels with their zeros)."""
    quant = _tf.tfmot().quantization.keras
    if preserve:
        return quant.collab_opts.Default8BitPrunePreserveQuantizeScheme()
    return quant.default_8bit.Default8BitQuantizeScheme()


#: Layers tfmot's 8-bit transforms fold a following BatchNormalization into (when their activation is linear).
_FOLDS_BATCHNORM = ("Conv2D", "DepthwiseConv2D", "Dense")


def _layer_count(keras_model) -> int:
    return sum(1 for layer in keras_model.layers if type(layer).__name__ != "InputLayer")


def qat_float_layers(keras_model, float_layers: list[str], scheme) -> dict[str, str]:
    """The layers QAT leaves float (not annotated), each with why: named in ``float_layers``, or not in
    ``scheme``'s registry. Raises a KfoptError when no layer with weights is left to quantize."""
    keras = _tf.keras()
    registry = scheme.get_quantize_registry()
    named = set(float_layers)
    floats: dict[str, str] = {}
    annotated_kernels = 0
    for layer in keras_model.layers:  # top level: tfmot does not look into nested models
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if layer.name in named:
            why = "kept float by float_layers"
        elif isinstance(layer, keras.Model):
            why = "tfmot does not quantize layers inside a nested model"
        elif kind in ("BatchNormalization", "SyncBatchNormalization"):
            why = None if _folded(layer, floats) else f"tfmot quantizes {kind} only right after a linear Conv or Dense"
        elif not registry.supports(layer):
            why = f"tfmot's 8-bit scheme has no {kind}"
        else:
            why = None
        if why:
            floats[layer.name] = why
        elif kernels(layer):
            annotated_kernels += 1
    if not annotated_kernels:
        listed = "; ".join(f"{name}: {why}" for name, why in list(floats.items())[:3])
        raise KfoptError(
            f"quantize(mode=qat) has no layer with weights of '{keras_model.name}' to train quantization-aware "
            f"({listed}).",
            "use quantize(mode=int8) (post-training, takes any layer), or keep fewer layers in float_layers.",
        )
    return floats


def _folded(batchnorm, floats: dict[str, str]) -> bool:
    """True when tfmot folds ``batchnorm`` into the annotated, linear Conv/Dense that alone feeds it."""
    nodes = batchnorm._inbound_nodes  # the layer graph: tfmot's transforms match on it too
    if len(nodes) != 1:
        return False
    inbound = _tf.tf().nest.flatten(nodes[0].inbound_layers)
    if len(inbound) != 1:
        return False
    producer = inbound[0]
    activation = getattr(getattr(producer, "activation", None), "__name__", None)
    return (
        type(producer).__name__ in _FOLDS_BATCHNORM and activation in (None, "linear") and producer.name not in floats
    )


def _quantization_aware(source, config: Quantize.Config, ctx: StepContext, input_sparsity: float):
    """Fine-tune with fake quantization; return the QAT model, its effective kernel sparsity and the layers
    it left float (name -> why)."""
    _tf.keras().utils.set_random_seed(ctx.seed)
    preserve = input_sparsity > PRUNED_SPARSITY
    # The prune-preserving scheme masks each kernel with its zero pattern inside the
    # weight quantizer, so fine-tuning cannot bring pruned weights back.
    scheme = qat_scheme(preserve)
    # The model's compiled loss, else the task's; decided on the plain model (wrappers hide the activation).
    loss = task_loss(source, ctx)
    with ctx.strategy.scope():
        qat_model, floats = quantization_aware_model(source, config.float_layers, scheme)
        if preserve:  # the scheme masks annotated kernels only: float layers keep their zeros by not training
            for name in floats:
                layer = qat_model.get_layer(name)
                if kernels(layer):
                    layer.trainable = False
    fine_tune(
        qat_model,
        ctx,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        description="quantization-aware training",
        loss=loss,
    )
    # With the preserving scheme the kernels' zeros are masked at conversion even if the
    # float variables drifted, so the input's sparsity is what the TFLite weights have.
    return qat_model, input_sparsity if preserve else weight_sparsity(qat_model), floats


def quantization_aware_model(source, float_layers: list[str], scheme):
    """A copy of ``source`` with fake quantization on every layer ``scheme`` supports (tfmot's
    ``quantize_apply``), and the layers left float (name -> why, see :func:`qat_float_layers`).

    Build it inside the strategy scope it will be trained in.
    """
    keras = _tf.keras()
    quant = _tf.tfmot().quantization.keras
    floats = qat_float_layers(source, float_layers, scheme)
    copy = copy_model(source)  # never train the caller's layers
    try:
        annotated = keras.models.clone_model(
            copy,
            clone_function=lambda layer: layer if layer.name in floats else quant.quantize_annotate_layer(layer),
        )
        return quant.quantize_apply(annotated, scheme), floats
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KfoptError(
            f"quantize(mode=qat) cannot wrap this model: {str(exc).splitlines()[0]}",
            "use quantize(mode=int8) (post-training, works with any model), or float_layers=NAME for the "
            "layer it names.",
        ) from None


@hookimpl
def kfopt_register_techniques(register):
    register(Quantize())
