"""Fine-tuning and baseline training: one place that compiles and fits Keras models."""

from __future__ import annotations

import contextlib
import functools
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
        scored = _output_model(model, scored_output(model, ctx_or_task))
        return loss_class(from_logits=output_activation(scored) not in ("softmax", "sigmoid"))
    return loss_class()


def scored_output(model, ctx) -> int:
    """The index of ``model``'s output the task is scored on: the one named ``ctx.output`` (``--output``), else
    the first. Wrapped layers keep their order and end in the user's name (``prune_low_magnitude_<name>``)."""
    name = getattr(ctx, "output", None)
    names = list(getattr(model, "output_names", None) or [])
    if name is None or len(names) < 2:
        return 0
    return next((i for i, n in enumerate(names) if n == name or n.endswith(f"_{name}")), 0)


def _output_model(model, index: int):
    """``model`` seen through one of its outputs (itself when it has one)."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) < 2:
        return model
    return _tf.keras().Model(model.inputs, outputs[index])


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
    loss = loss or task_loss(model, ctx)
    metric = _progress_metric(task)
    train, validation = ctx.train.fit_args(batch_size), keras_data(*ctx.validation.arrays())
    outputs = len(getattr(model, "outputs", None) or [])
    if outputs > 1:
        scored = scored_output(model, ctx)
        train, validation = _targets_for_every_output(model, scored, train, validation)
        # The labels train the scored output; the others learn to stay what they were (mean squared error).
        loss = [loss if i == scored else keras.losses.MeanSquaredError() for i in range(outputs)]
        metric = [[metric] if i == scored else [] for i in range(outputs)]
    else:
        metric = [metric]
    with ctx.strategy.scope():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metric)
    callbacks = list(callbacks) + [keras_callback(ctx.progress, description, epochs)]
    if early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True))
    with unit_stride_pointwise(model):
        return model.fit(
            **train, validation_data=validation, epochs=epochs, callbacks=callbacks, verbose=0, shuffle=True
        )


#: Input channels below which TensorFlow's oneDNN CPU kernel for the kernel gradient of a strided 1x1 convolution
#: writes past its workspace: its channel block (16 with AVX-512, 8 with AVX2). uxlfoundation/oneDNN#6035.
ONEDNN_CHANNEL_BLOCK = 16


@contextlib.contextmanager
def unit_stride_pointwise(model):
    """While ``model`` trains inside this block, each strided 1x1 convolution on fewer than
    ``ONEDNN_CHANNEL_BLOCK`` input channels computes as a subsample of its input followed by a unit-stride 1x1
    convolution: the same outputs and gradients, through other kernels. Yields the names of the layers it changed.

    Why: the oneDNN kernel TensorFlow uses on x86 CPUs for such a convolution's kernel gradient addresses its
    reduce-to-unit-stride workspace per input-channel *block* but sizes it per input *channel*
    (uxlfoundation/oneDNN#6035, open), so it writes past the workspace; on a batch of odd size (the last batch of
    an epoch) that corrupts the heap and the process dies with a segfault. A width-0.5 distillation student of a
    ResNet (a 1x1 stride-2 projection of 8 channels) hits it; so would fine-tuning any such model. Only the kernel
    gradient is affected: inference and the saved model keep the layer as it is.
    """
    patched = [layer for layer in _walk_layers(model) if _strided_pointwise_on_few_channels(layer)]
    for layer in patched:
        layer.convolution_op = functools.partial(_subsampled_pointwise, layer)
    try:
        yield [layer.name for layer in patched]
    finally:
        for layer in patched:
            del layer.convolution_op


def _walk_layers(model):
    from .signature import _walk_layers as walk  # opens nested models and wrappers (tfmot's, Bidirectional)

    return walk(model)


def _strided_pointwise_on_few_channels(layer) -> bool:
    keras = _tf.keras()
    layers = keras.layers
    if not isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)) or isinstance(
        layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
    ):
        return False
    kernel = getattr(layer, "kernel", None)
    return (
        kernel is not None
        and layer.groups == 1
        and all(size == 1 for size in layer.kernel_size)
        and any(stride > 1 for stride in layer.strides)
        and kernel.shape[-2] < ONEDNN_CHANNEL_BLOCK
    )


def _subsampled_pointwise(layer, inputs, kernel):
    """``layer``'s strided 1x1 convolution as a strided slice and a unit-stride 1x1 convolution.

    A 1x1 kernel reads one position per output, so with stride ``s`` output ``i`` is the input at ``i * s`` for
    every padding mode (``same`` pads nothing for a 1x1 kernel, ``causal`` pads ``kernel_size - 1 = 0``).
    """
    first = 2 if layer.data_format == "channels_first" else 1
    index = [slice(None)] * (layer.rank + 2)
    for axis, stride in enumerate(layer.strides):
        index[first + axis] = slice(None, None, stride)
    return _tf.tf().nn.convolution(
        inputs[tuple(index)], kernel, strides=1, padding="VALID", data_format=layer._tf_data_format, name=layer.name
    )


def keras_data(x, y) -> tuple:
    """``(x, y)`` as Keras takes them: several inputs as a list in the model's order."""
    from .data import Inputs

    return (list(x.arrays) if isinstance(x, Inputs) else x), y


def _targets_for_every_output(model, scored: int, train: dict, validation: tuple) -> tuple[dict, tuple]:
    """Fit data for a model with several outputs: the labels for output ``scored``, and for every other output
    the model's own predictions before fine-tuning, so the outputs the user's labels do not cover keep working."""
    from .errors import KfoptError

    if "y" not in train:
        raise KfoptError(
            f"Fine-tuning '{model.name}' ({len(model.outputs)} outputs) needs the other outputs' current predictions "
            "as targets, which kfopt computes from array data, not from a tf.data dataset.",
            "pass the data as arrays (an .npz or a dict of arrays), or use a post-training recipe "
            "(quantize(mode=int8|dynamic|float16)).",
        )

    def with_targets(x, y):
        predicted = model.predict(x, batch_size=256, verbose=0)
        return [y if i == scored else p for i, p in enumerate(predicted)]

    train = {**train, "y": with_targets(train["x"], train["y"])}
    return train, (validation[0], with_targets(*validation))


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
