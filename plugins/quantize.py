"""Built-in ``quantize`` technique: post-training quantization or quantization-aware training to TFLite."""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from kfopt import _tf
from kfopt.convert import to_tflite
from kfopt.errors import KfoptError
from kfopt.models import copy_model
from kfopt.sparsity import weight_sparsity
from kfopt.training import fine_tune, task_loss

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

    Zero weights stay exactly zero in every mode, so a pruned model keeps its
    sparsity and compresses well.
    """

    name = "quantize"
    kind = "quantize"
    accepts = {"keras"}
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

    def apply(self, model: ModelHandle, config: Quantize.Config, ctx: StepContext) -> ModelHandle:
        source = model.keras()
        sparsity = weight_sparsity(source)
        if config.mode == "qat":
            check_layer_names(source, config.float_layers, "quantize", "float_layers")
            to_convert, sparsity = _quantization_aware(source, config, ctx, sparsity)
            # With float layers the converter takes the int8 ranges QAT learned and leaves the
            # rest float ("dynamic" adds no calibration; int8-only conversion would quantize them too).
            mode = "dynamic" if config.float_layers else "int8"
        else:
            to_convert, mode = source, config.mode
        representative = ctx.representative(config.calibration_samples) if mode == "int8" else None
        data = to_tflite(to_convert, mode, representative=representative)
        info = {**model.info, "sparsity": sparsity, "params": source.count_params(), "quantization": config.mode}
        return ModelHandle.from_tflite(data, info=info)


def _quantization_aware(source, config: Quantize.Config, ctx: StepContext, input_sparsity: float):
    """Fine-tune with fake quantization; return the QAT model and its effective kernel sparsity."""
    keras = _tf.keras()
    tfmot = _tf.tfmot()
    quant = tfmot.quantization.keras
    keras.utils.set_random_seed(ctx.seed)
    preserve = input_sparsity > PRUNED_SPARSITY
    # The prune-preserving scheme masks each kernel with its zero pattern inside the
    # weight quantizer, so fine-tuning cannot bring pruned weights back.
    scheme = (
        quant.collab_opts.Default8BitPrunePreserveQuantizeScheme()
        if preserve
        else quant.default_8bit.Default8BitQuantizeScheme()
    )
    # The model's compiled loss, else the task's; decided on the plain model (wrappers hide the activation).
    loss = task_loss(source, ctx)
    floats = set(config.float_layers)
    with ctx.strategy.scope():
        copy = copy_model(source)  # never train the caller's layers
        try:
            annotated = (
                keras.models.clone_model(
                    copy,
                    clone_function=lambda layer: (
                        layer if layer.name in floats else quant.quantize_annotate_layer(layer)
                    ),
                )
                if floats
                else quant.quantize_annotate_model(copy)
            )
            qat_model = quant.quantize_apply(annotated, scheme)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise KfoptError(
                f"quantize(mode=qat) cannot wrap this model: {exc}",
                "use quantize(mode=int8) (post-training, works with any model), or a Sequential/"
                "functional model of layers tfmot supports.",
            ) from None
        if preserve:  # the scheme masks annotated kernels only: float layers keep their zeros by not training
            for name in floats:
                qat_model.get_layer(name).trainable = False
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
    return qat_model, input_sparsity if preserve else weight_sparsity(qat_model)


@hookimpl
def kfopt_register_techniques(register):
    register(Quantize())
