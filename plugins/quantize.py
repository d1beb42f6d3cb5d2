"""Built-in ``quantize`` technique: post-training quantization or quantization-aware training to TFLite."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kfopt import _tf
from kfopt.convert import to_tflite
from kfopt.errors import KfoptError
from kfopt.sparsity import weight_sparsity
from kfopt.training import classifier_loss, fine_tune

from kfopt.models import copy_model
from .spec import hookimpl
from .technique import ModelHandle, StepContext, Technique

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

    def trains_for(self, config: "Quantize.Config") -> bool:
        return config.mode == "qat"

    def apply(self, model: ModelHandle, config: "Quantize.Config", ctx: StepContext) -> ModelHandle:
        source = model.keras()
        sparsity = weight_sparsity(source)
        if config.mode == "qat":
            to_convert, sparsity = _quantization_aware(source, config, ctx, sparsity)
            mode = "int8"
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
    scheme = (quant.collab_opts.Default8BitPrunePreserveQuantizeScheme() if preserve
              else quant.default_8bit.Default8BitQuantizeScheme())
    # Decide the loss from the plain model: quantize wrappers hide the softmax.
    loss = classifier_loss(source)
    with ctx.strategy.scope():
        copy = copy_model(source)  # never train the caller's layers
        try:
            qat_model = quant.quantize_apply(quant.quantize_annotate_model(copy), scheme)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise KfoptError(
                f"quantize(mode=qat) cannot wrap this model: {exc}",
                "use quantize(mode=int8) (post-training, works with any model), or a Sequential/"
                "functional model of layers tfmot supports.",
            ) from None
    fine_tune(qat_model, ctx, epochs=config.epochs, learning_rate=config.learning_rate,
              description="quantization-aware training", loss=loss)
    # With the preserving scheme the kernels' zeros are masked at conversion even if the
    # float variables drifted, so the input's sparsity is what the TFLite weights have.
    return qat_model, input_sparsity if preserve else weight_sparsity(qat_model)


@hookimpl
def kfopt_register_techniques(register):
    register(Quantize())
