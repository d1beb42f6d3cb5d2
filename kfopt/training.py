"""Fine-tuning and baseline training: one place that compiles and fits Keras models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _tf
from .progress import keras_callback

if TYPE_CHECKING:
    from .task import Task


def outputs_probabilities(model) -> bool:
    """True when the model ends in a softmax (so losses must not treat outputs as logits)."""
    from .task import output_activation

    return output_activation(model) == "softmax"


def classifier_loss(model):
    """Sparse categorical cross-entropy matching the model's output (probabilities or logits)."""
    keras = _tf.keras()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model))


def task_of(model, ctx) -> Task:
    """The task fine-tuning serves: ``ctx.task`` (kfopt reads it from the baseline and the data), else read
    from ``model`` and the validation labels (a context built by hand, e.g. in a plugin's tests)."""
    task = getattr(ctx, "task", None)
    if task is not None:
        return task
    from .data import labels
    from .task import compiled_loss, infer_task

    _, y = ctx.validation.arrays()
    return infer_task(model, [labels(y)], loss=compiled_loss(model))


#: Keras loss classes by canonical loss name (kfopt.task.LOSSES); cross-entropies take ``from_logits``.
_LOSS_CLASSES = {
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
    "categorical_crossentropy": "SparseCategoricalCrossentropy",  # kfopt feeds class ids, never one-hot rows
    "binary_crossentropy": "BinaryCrossentropy",
    "binary_focal_crossentropy": "BinaryFocalCrossentropy",
    "mean_squared_error": "MeanSquaredError",
    "mean_absolute_error": "MeanAbsoluteError",
    "mean_absolute_percentage_error": "MeanAbsolutePercentageError",
    "mean_squared_logarithmic_error": "MeanSquaredLogarithmicError",
    "huber": "Huber",
    "log_cosh": "LogCosh",
}
#: The task's loss when the model was not compiled with one that fits it.
_TASK_LOSSES = {
    "multiclass": "sparse_categorical_crossentropy",
    "binary": "binary_crossentropy",
    "multilabel": "binary_crossentropy",
    "regression": "mean_squared_error",
}


def task_loss(model, ctx_or_task):
    """The loss to fine-tune ``model`` with: the model's own compiled loss when it has a built-in one that fits
    its task, else the task's (sparse cross-entropy, binary cross-entropy, mean squared error).

    ``ctx_or_task`` is the technique's StepContext (its ``task``) or a
    :class:`kfopt.task.Task`. Cross-entropies read probabilities or logits from
    ``model``'s own output, so pass the plain model (tfmot wrappers hide the
    activation).
    """
    from .task import Task, output_activation

    task = ctx_or_task if isinstance(ctx_or_task, Task) else task_of(model, ctx_or_task)
    name = task.loss or _TASK_LOSSES[task.kind]
    loss_class = getattr(_tf.keras().losses, _LOSS_CLASSES[name])
    if name.endswith("crossentropy"):
        return loss_class(from_logits=output_activation(model) not in ("softmax", "sigmoid"))
    return loss_class()


def _progress_metric(task: Task | None) -> str:
    """What Keras shows while fine-tuning (progress only; kfopt's Evaluator does the measuring)."""
    return {"binary": "binary_accuracy", "multilabel": "binary_accuracy", "regression": "mae"}.get(
        task.kind if task else "", "accuracy"
    )


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

    ``loss`` defaults to :func:`task_loss` (the model's compiled loss, else the
    task's). Call inside ``ctx.strategy.scope()`` when the model was built there.
    """
    keras = _tf.keras()
    task = getattr(ctx, "task", None)
    with ctx.strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=loss or task_loss(model, ctx),
            metrics=[_progress_metric(task)],
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
