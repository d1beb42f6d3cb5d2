"""The kfopt plugin contract, and the one module plugin authors import from.

Everything a plugin needs is here (and the test kit in :mod:`kfopt.testing`);
other kfopt modules are internal and may change between releases.

Declaring and registering a technique:

- ``hookimpl``, ``hookspec``: the pluggy markers (project name ``kfopt``); the
  hooks are documented in :mod:`kfopt.plugins.spec` and docs/plugins.md.
- ``Technique``: the base class (``name``, ``kind``, ``accepts``, ``produces``,
  ``Config``, ``apply``).
- ``ModelHandle``: a model in one format (``FORMATS``: keras, tflite,
  saved_model), what ``apply`` takes and returns.
- ``StepContext``: what ``apply`` gets: train/validation data, workdir, seed,
  device, ``tf.distribute`` strategy, progress.
- ``ModelInfo``: what ``Technique.check(model, config)`` gets to refuse a model
  before any work: inputs, outputs (``TensorInfo``), layers, recurrent layers.
- ``TechniqueSkipped``: raise it when this host cannot run the technique.
- ``KfoptError``: raise ``KfoptError(message, fix)`` for a config or a model
  the technique cannot work with.

TensorFlow, only inside ``apply`` (these select Keras 2 before TensorFlow is
first imported, which tfmot needs):

- ``tf()``, ``keras()``, ``tfmot()``: the ``tensorflow``, ``tf_keras`` and
  ``tensorflow_model_optimization`` modules.

Helpers the built-in techniques use:

- ``copy_model(keras_model)``: an independent copy to train or wrap.
- ``fine_tune(model, ctx, epochs=..., learning_rate=..., ...)``: compile and
  fit on ``ctx.train`` with validation, as the built-ins do.
- ``classifier_loss(keras_model)``: the loss matching the model's output
  (probabilities or logits).
- ``task_loss(keras_model, ctx)``: the loss to fine-tune with: the model's own
  compiled loss, else the task's (``ctx.task``).
- ``weight_sparsity(keras_model)``: the fraction of zero kernel weights.
- ``unit_stride_pointwise(keras_model)``: a context manager to train in when a
  technique runs its own ``fit`` or loop (``fine_tune`` already does): it
  routes strided 1x1 convolutions on fewer than 16 channels around a
  TensorFlow CPU kernel that crashes the process on them (oneDNN#6035).

Metrics (``kfopt_register_metrics``):

- ``Metric``: a quality metric that ``--metric NAME`` budgets: ``name``,
  ``compute(y_true, y_score)``, ``tasks``, ``higher_is_better``.

Observers (``kfopt_run_started``, ``kfopt_candidate_finished``,
``kfopt_run_finished``):

- ``RunContext``: the ``context`` they get: the run's settings as attributes
  and ``context.state(name)``, each observer's own state.

Importing this module does not import TensorFlow.
"""

from kfopt._tf import keras, tf, tfmot
from kfopt.errors import KfoptError, TechniqueSkipped
from kfopt.models import copy_model
from kfopt.observers import RunContext
from kfopt.signature import ModelInfo, TensorInfo
from kfopt.sparsity import weight_sparsity
from kfopt.task import Metric
from kfopt.training import classifier_loss, fine_tune, task_loss, unit_stride_pointwise

from .spec import hookimpl, hookspec
from .technique import FORMATS, ModelHandle, StepContext, Technique

__all__ = [
    "hookimpl",
    "hookspec",
    "Technique",
    "ModelHandle",
    "StepContext",
    "ModelInfo",
    "TensorInfo",
    "TechniqueSkipped",
    "KfoptError",
    "FORMATS",
    "tf",
    "keras",
    "tfmot",
    "copy_model",
    "fine_tune",
    "classifier_loss",
    "task_loss",
    "unit_stride_pointwise",
    "Metric",
    "weight_sparsity",
    "RunContext",
]
