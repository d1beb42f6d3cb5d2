"""Fine-tuning and baseline training: one place that compiles and fits Keras models."""

from __future__ import annotations

from . import _tf
from .progress import keras_callback


def outputs_probabilities(model) -> bool:
    """True when the model ends in a softmax (so losses must not treat outputs as logits)."""
    last = model.layers[-1]
    while hasattr(last, "layer"):  # tfmot prune/quantize wrappers hide the wrapped layer
        last = last.layer
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return name == "softmax" or type(last).__name__ == "Softmax"


def classifier_loss(model):
    """Sparse categorical cross-entropy matching the model's output (probabilities or logits)."""
    keras = _tf.keras()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model))


def fine_tune(
    model,
    ctx,
    *,
    epochs: int,
    learning_rate: float,
    description: str,
    callbacks=(),
    loss=None,
    batch_size: int = 32,
    early_stopping: bool = False,
):
    """Compile ``model`` with Adam and fit it on ``ctx.train``, validating on ``ctx.validation``.

    Call inside ``ctx.strategy.scope()`` when the model was built there.
    """
    keras = _tf.keras()
    with ctx.strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=loss or classifier_loss(model),
            metrics=["accuracy"],
        )
    callbacks = list(callbacks) + [keras_callback(ctx.progress, description, epochs)]
    if early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True))
    val_x, val_y = ctx.validation.arrays()
    return model.fit(
        **ctx.train.fit_args(batch_size),
        validation_data=(val_x, val_y),
        epochs=epochs,
        callbacks=callbacks,
        verbose=0,
        shuffle=True,
    )


def train_demo(name: str, ctx, *, epochs: int = 40, learning_rate: float = 1e-3):
    """Train a demo baseline (``demo:mlp`` / ``demo:cnn``) on ``ctx.train``, seeded."""
    from .models import build_demo

    with ctx.strategy.scope():
        model = build_demo(name, num_classes=ctx.num_classes or 10, seed=ctx.seed)
    fine_tune(
        model,
        ctx,
        epochs=epochs,
        learning_rate=learning_rate,
        description=f"training baseline {name}",
        early_stopping=True,
    )
    return model
