"""Knowledge distillation: train a smaller student on the teacher's softened logits.

The loss is Hinton et al.'s: ``alpha * CE(y, student) + (1 - alpha) * T^2 *
KL(softmax(teacher / T) || softmax(student / T))``. The ``T^2`` factor keeps the
soft term's gradients on the same scale as the hard term's whatever ``T`` is.
Both terms work on logits, so a model that ends in softmax is first given a
logits view (see :func:`logits_model`); the student that comes back keeps the
output convention it was built with (the teacher's, for a built student).

The task (:mod:`kfopt.task`) decides the two terms: for a binary or
multi-label model the soft targets are ``sigmoid(teacher / T)`` per output and
the hard term is binary cross-entropy (a sigmoid output gets a logits view like
a softmax); for regression the soft term is the mean squared difference to the
teacher's outputs (no temperature) and the hard term the model's compiled loss,
else mean squared error.

Two student architectures can be built (``architecture``):

- ``same``: the teacher's own architecture with its Dense ``units``, Conv
  ``filters``, Embedding and recurrent widths scaled by ``width``, planned on
  the layer graph so residual adds, squeeze-excite multiplies, reshapes and
  attention stay consistent and the inputs and outputs keep their shapes
  (:mod:`kfopt.plugins.student`);
- ``dense``: a plain MLP, ``Flatten`` then ``DENSE_HIDDEN_LAYERS`` ReLU Dense
  layers of ``width`` times the teacher's widest layer (its largest ``units`` or
  ``filters`` outside the output layer) each, then the output Dense
  (:func:`build_dense_student`). For a small CNN on small inputs a TFLite conv
  model spends most of its time in per-op interpreter overhead whatever its
  width; a couple of fully connected ops run several times faster.
"""

from __future__ import annotations

import functools
from typing import Literal

import pydantic
from pydantic import Field

from kfopt import _tf
from kfopt.errors import KfoptError
from kfopt.models import copy_model
from kfopt.progress import keras_callback
from kfopt.training import keras_data, task_of, unit_stride_pointwise

from .layers import all_layers, note, require_layer_graph, with_note
from .spec import hookimpl
from .student import WidthPlan, build_student, plan_widths, width_key
from .technique import ModelHandle, StepContext, Technique

#: Epochs without improvement of the validation distillation loss before stopping early.
PATIENCE = 5
#: Hidden Dense layers of an ``architecture=dense`` student.
DENSE_HIDDEN_LAYERS = 2
#: Facts about the input model that do not hold for a new student.
_STALE_INFO = ("sparsity", "params", "left_dense", "float_layers", "kept_width", "channels", "full_width")


class Distill(Technique):
    """Train a smaller student by distillation.

    The student is the teacher's architecture at a width multiplier
    (``architecture=same``, the default), a Flatten + Dense MLP whose hidden
    layers are ``width`` x the teacher's widest layer (``architecture=dense``,
    e.g. to replace a CNN whose conv ops cost more in per-op overhead than in
    arithmetic), or a given model file (``student``, not with ``dense``).
    """

    name = "distill"
    kind = "distill"
    accepts = {"keras"}
    produces = "keras"
    trains = True

    class Config(Technique.Config):
        architecture: Literal["same", "dense"] = Field(
            "same",
            description="Student architecture: `same` = the teacher's layers with their widths scaled by `width`; "
            f"`dense` = Flatten, then {DENSE_HIDDEN_LAYERS} ReLU Dense layers of `width` x the teacher's "
            "widest layer (largest `units`/`filters` except the output layer) each, then the output "
            "layer (no convs: fast where conv ops' per-op overhead dominates). Not with `student`.",
        )
        width: float = Field(
            0.5,
            gt=0,
            le=1,
            description="Student width as a fraction of the teacher's. architecture=same: every Dense `units` and "
            "Conv `filters` is multiplied by it (at least 1), except the output layer. architecture=dense: "
            "each hidden layer has `width` x the teacher's widest layer units (at least 1). Ignored when "
            "`student` is given.",
        )
        student: str | None = Field(
            None,
            description="Path to a Keras model file to use as the student (trained from its current weights); "
            "it must take the teacher's inputs and give the teacher's number of classes.",
        )
        temperature: float = Field(
            4.0,
            gt=0,
            description="Softmax temperature T for the soft targets; higher shows more of the teacher's "
            "knowledge about wrong classes.",
        )
        alpha: float = Field(
            0.1,
            ge=0,
            le=1,
            description="Weight of the hard-label cross-entropy; 1 - alpha weighs the distillation (KL) term.",
        )
        epochs: int = Field(
            30,
            ge=1,
            description=f"Maximum training epochs; stops early when the validation loss has not improved "
            f"for {PATIENCE} epochs (keeping the best weights).",
        )
        learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate for the student.")

        @pydantic.model_validator(mode="after")
        def _dense_is_built(self):
            if self.student and self.architecture != "same":
                raise ValueError(
                    f"architecture={self.architecture} builds a student, but student={self.student!r} "
                    "gives one; drop architecture, or drop student"
                )
            return self

    def check(self, model, config: Distill.Config) -> None:
        """Refuse, before any work, a teacher no student of the config can be built for."""
        if model.has_keras_layers:  # the recipe check refuses other formats itself
            check_teacher(model.keras(), config)

    def apply(self, model: ModelHandle, config: Distill.Config, ctx: StepContext) -> ModelHandle:
        keras = _tf.keras()
        teacher = model.keras()
        task = task_of(teacher, ctx)
        keras.utils.set_random_seed(ctx.seed)
        plan = check_teacher(teacher, config)
        with ctx.strategy.scope():
            # Work on copies built inside the strategy scope: the teacher must not
            # be mutated, and on several GPUs/TPU cores its variables must be
            # mirrored like the student's.
            teacher_logits, _ = logits_model(copy_model(teacher), task.kind)
            teacher_logits.trainable = False
            if config.student:
                student = _load_student(config.student, teacher)
            elif config.architecture == "dense":
                student = build_dense_student(teacher, config.width)
            else:
                student = build_student(teacher, config.width, plan)
            student_logits, shares_weights = logits_model(student, task.kind)
            distiller = _distiller_class()(
                student_logits, teacher_logits, config.temperature, config.alpha, task.kind, task.loss
            )
            distiller.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
        with unit_stride_pointwise(student_logits):  # a narrow strided 1x1 conv would crash TensorFlow (see there)
            distiller.fit(
                **ctx.train.fit_args(),
                validation_data=keras_data(*ctx.validation.arrays()),
                epochs=config.epochs,
                callbacks=[
                    keras_callback(ctx.progress, "distill", config.epochs),
                    keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE, restore_best_weights=True),
                ],
                verbose=0,
                shuffle=True,
            )
        if not shares_weights:  # the logits view was a copy: put the trained weights back
            student.set_weights(student_logits.get_weights())
        info = {k: v for k, v in model.info.items() if k not in _STALE_INFO}
        if plan and plan.kept:  # layers tied to the outputs are the classes: only the others are news
            info["kept_width"] = plan.kept
            total = sum(1 for layer in all_layers(teacher) if width_key(layer))
            line = note(f"distill(width={config.width:g})", plan.kept, total, "full width")
            info["notes"] = with_note(model.info, line)
        return ModelHandle.from_keras(student, info=info)


def check_teacher(teacher, config: Distill.Config) -> WidthPlan | None:
    """Refuse a teacher no student of ``config`` can be built for (one line: why, and what to do instead).

    Returns the width plan of an ``architecture=same`` student (None for a dense or given student).
    """
    require_layer_graph(teacher, "distill")
    outputs = teacher.outputs or []
    if len(outputs) != 1:
        raise KfoptError(
            f"distill trains a student on one output, but '{teacher.name}' has {len(outputs)}"
            + (f" ({', '.join(teacher.output_names)})." if outputs else " (it was never built on an input shape)."),
            "distill a single-output model built with keras.Input, or use prune/quantize, which keep every output.",
        )
    if config.student:
        return None  # checked against the teacher when it is loaded
    if config.architecture == "dense":
        _check_dense_teacher(teacher)
        return None
    plan = plan_widths(teacher)
    if not plan.scaled and config.width < 1:
        kept = "; ".join(
            [f"{name}: {why}" for name, why in list(plan.kept.items())[:3]]
            + [f"{name}: it sets the model's output" for name in plan.outputs[:1]]
        )
        raise KfoptError(
            f"distill(width={config.width:g}) cannot make '{teacher.name}' narrower: every layer that sets a "
            f"width keeps the teacher's ({kept}).",
            "use architecture=dense, or pass a student model file with student=PATH.",
        )
    return plan


# -- building the student ------------------------------------------------------
# build_student and plan_widths live in .student (how a narrower student of the teacher's graph is planned).


def _check_dense_teacher(teacher) -> None:
    """Refuse a teacher a Flatten + Dense student cannot stand in for (several inputs/outputs, non-vector output)."""
    if not teacher.outputs or len(teacher.outputs) != 1 or len(teacher.inputs) != 1:
        raise KfoptError(
            f"A dense student needs a built teacher with one input and one output; '{teacher.name}' has "
            f"{len(teacher.inputs or [])} and {len(teacher.outputs or [])}.",
            "distill a single-input classifier with architecture=same, or pass a student model file with student=PATH.",
        )
    out_shape = tuple(teacher.output_shape[1:])
    if len(out_shape) != 1 or out_shape[0] is None:
        raise KfoptError(
            f"A dense student predicts a vector of classes, but '{teacher.name}' outputs shape {out_shape}.",
            "use architecture=same, or pass a student model file with student=PATH.",
        )


def build_dense_student(teacher, width: float):
    """A Flatten + Dense student for ``teacher``, freshly initialised (``architecture=dense``).

    It takes the teacher's input shape; ``DENSE_HIDDEN_LAYERS`` ReLU Dense layers
    of ``max(1, round(width * widest))`` units each, where ``widest`` is the
    largest ``units``/``filters`` of the teacher's layers outside the output
    layer (its output width if it has no other); then a Dense layer with the
    teacher's number of outputs and the teacher's output activation (softmax
    when it ends in a softmax activation or a ``Softmax`` layer, sigmoid,
    linear, ...).
    """
    keras = _tf.keras()
    _check_dense_teacher(teacher)
    out_shape = tuple(teacher.output_shape[1:])
    keep = _output_width_layers(teacher)
    widths = [
        layer.get_config()[key] for layer in all_layers(teacher) if (key := width_key(layer)) and id(layer) not in keep
    ]
    widest = max(widths, default=out_shape[0])
    hidden = max(1, int(round(widest * width)))
    last = teacher.outputs[0]._keras_history[0]
    activation = "softmax" if type(last).__name__ == "Softmax" else _activation_name(last)
    layers = keras.layers
    inputs = keras.Input(teacher.input_shape[1:], dtype=teacher.inputs[0].dtype)
    x = layers.Flatten()(inputs) if len(teacher.input_shape) > 2 else inputs
    for _ in range(DENSE_HIDDEN_LAYERS):
        x = layers.Dense(hidden, activation="relu")(x)
    outputs = layers.Dense(out_shape[0], activation=None if activation in (None, "linear") else activation)(x)
    return keras.Model(inputs, outputs, name=f"{teacher.name}_dense_student")


def _output_width_layers(model) -> set[int]:
    """ids of the layers whose width is the model's output width."""
    keras = _tf.keras()
    keep: set[int] = set()
    if not model.outputs:  # a Sequential that was never built on an input shape
        last = next((layer for layer in reversed(model.layers) if width_key(layer)), None)
        return {id(last)} if last is not None else keep
    stack = list(model.outputs)
    while stack:
        layer, node_index, _ = stack.pop()._keras_history
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            keep |= _output_width_layers(layer)
        elif width_key(layer):
            keep.add(id(layer))
        else:  # activation, reshape, add, ...: its width comes from its inputs
            stack.extend(layer._inbound_nodes[node_index].keras_inputs)
    return keep


def _load_student(path: str, teacher):
    from kfopt.models import load_keras

    loaded = load_keras(path)
    for what, got, want in (
        ("input", loaded.input_shape, teacher.input_shape),
        ("output", loaded.output_shape, teacher.output_shape),
    ):
        if tuple(got[1:]) != tuple(want[1:]):
            raise KfoptError(
                f"Student model '{path}' has {what} shape {tuple(got[1:])}, but the teacher's is {tuple(want[1:])}.",
                "pass a student that takes the same inputs and predicts the same classes as the teacher.",
            )
    return copy_model(loaded)  # rebuilt in the caller's strategy scope


# -- logits --------------------------------------------------------------------
def _activation_name(layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


def logits_model(model, kind: str = "multiclass"):
    """A model computing ``model``'s logits, and whether it shares ``model``'s weights.

    ``kind`` is the task (kfopt.task): a classifier's probabilities come from a
    softmax (multiclass) or a sigmoid (binary, multilabel); a regression model
    has no logits and is returned as it is.

    - ends in a separate ``Softmax`` / ``Activation("softmax"|"sigmoid")`` layer:
      the model cut before it (shares the weights, so training it trains ``model``);
    - ends in a layer with ``activation="softmax"`` (or sigmoid): a copy whose last
      layer is linear (a copy, so ``model`` is untouched; the caller copies weights back);
    - ends without an activation: ``model`` itself.
    """
    keras = _tf.keras()
    if not model.outputs or len(model.outputs) != 1:
        raise KfoptError(
            f"Distillation needs a built model with one output; '{model.name}' has {len(model.outputs or [])}.",
            "distill a single-output model (build it with keras.Input first).",
        )
    if kind == "regression":  # the outputs themselves are what the student learns
        return model, True
    last, node_index, _ = model.outputs[0]._keras_history
    activation = _activation_name(last)
    if isinstance(last, keras.Model):
        raise KfoptError(
            f"The output of '{model.name}' comes from the nested model '{last.name}', whose logits cannot be reached.",
            "flatten the model so its last layer is a plain Keras layer.",
        )
    probability = "softmax" if kind == "multiclass" else "sigmoid"
    if type(last).__name__ == "Softmax" and kind == "multiclass" or (activation == probability and not width_key(last)):
        logits = last._inbound_nodes[node_index].input_tensors
        return keras.Model(model.inputs, logits, name=f"{model.name}_logits"), True
    if activation == probability:

        def linear_output(layer):
            config = layer.get_config()
            if layer is last:
                config["activation"] = "linear"
            return layer.__class__.from_config(config)

        copy = keras.models.clone_model(model, clone_function=linear_output)
        copy.set_weights(model.get_weights())
        return copy, False
    if activation in (None, "linear"):
        return model, True
    raise KfoptError(
        f"The output layer '{last.name}' of '{model.name}' uses activation '{activation}'; distilling a {kind} "
        f"model needs logits or a {probability}.",
        f"distill a {kind} classifier whose last layer is linear or {probability}.",
    )


# -- training ------------------------------------------------------------------
@functools.cache
def _distiller_class():
    """The Keras model that trains a student against a frozen teacher (built lazily: tf_keras is heavy)."""
    tf = _tf.tf()
    keras = _tf.keras()

    class Distiller(keras.Model):
        def __init__(
            self,
            student,
            teacher,
            temperature: float,
            alpha: float,
            kind: str = "multiclass",
            loss: str | None = None,
        ):
            super().__init__()
            self.student, self.teacher = student, teacher
            self.temperature, self.alpha = float(temperature), float(alpha)
            self.kind = kind
            # Regression's hard term: the model's compiled loss (kfopt.task.LOSSES names Keras's functions).
            self.regression_loss = keras.losses.get(loss or "mean_squared_error")
            self.loss_tracker = keras.metrics.Mean(name="loss")
            if kind == "multiclass":
                self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            elif kind == "regression":
                self.accuracy_tracker = keras.metrics.MeanAbsoluteError(name="mae")
            else:  # a positive logit is a yes
                self.accuracy_tracker = keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.0)

        @property
        def metrics(self):
            return [self.loss_tracker, self.accuracy_tracker]

        def call(self, x, training=False):
            return self.student(x, training=training)

        def _target(self, y, student):
            """Labels shaped like the student's output (class ids stay as they are for multiclass)."""
            if self.kind == "multiclass":
                return y
            return tf.reshape(tf.cast(y, tf.float32), tf.shape(student))

        def _terms(self, y, teacher, student):
            """(hard, soft) per-example terms on logits (classifiers) or outputs (regression)."""
            t = self.temperature
            if self.kind == "multiclass":
                hard = keras.losses.sparse_categorical_crossentropy(y, student, from_logits=True)
                soft_teacher = tf.nn.softmax(teacher / t)
                kl = tf.reduce_sum(
                    soft_teacher * (tf.nn.log_softmax(teacher / t) - tf.nn.log_softmax(student / t)), axis=-1
                )
                return hard, (t * t) * kl
            if self.kind == "regression":
                return self.regression_loss(y, student), tf.reduce_mean(tf.square(teacher - student), axis=-1)
            hard = keras.losses.binary_crossentropy(y, student, from_logits=True)
            # KL between the Bernoulli distributions sigmoid(teacher / T) and sigmoid(student / T), per output.
            p = tf.sigmoid(teacher / t)
            log_sig = tf.math.log_sigmoid
            kl = p * (log_sig(teacher / t) - log_sig(student / t)) + (1.0 - p) * (
                log_sig(-teacher / t) - log_sig(-student / t)
            )
            return hard, (t * t) * tf.reduce_mean(kl, axis=-1)

        def _loss(self, x, y, training: bool):
            teacher = tf.cast(self.teacher(x, training=False), tf.float32)
            student = tf.cast(self.student(x, training=training), tf.float32)
            hard, soft = self._terms(self._target(y, student), teacher, student)
            per_example = self.alpha * hard + (1.0 - self.alpha) * soft
            # Divides by the global batch size, so gradients summed over replicas
            # (MirroredStrategy, TPU) equal the mean over the whole batch.
            loss = tf.nn.compute_average_loss(per_example)
            if self.student.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.student.losses))
            return loss, student

        def _report(self, loss, y, logits):
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            self.loss_tracker.update_state(loss * replicas)  # undo the per-replica scaling for display
            self.accuracy_tracker.update_state(self._target(y, logits), logits)
            return {m.name: m.result() for m in self.metrics}

        def train_step(self, data):
            x, y = data[0], data[1]
            with tf.GradientTape() as tape:
                loss, logits = self._loss(x, y, training=True)
            variables = self.student.trainable_variables
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return self._report(loss, y, logits)

        def test_step(self, data):
            x, y = data[0], data[1]
            loss, logits = self._loss(x, y, training=False)
            return self._report(loss, y, logits)

    return Distiller


@hookimpl
def kfopt_register_techniques(register):
    register(Distill())
