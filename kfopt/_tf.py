"""The one place that imports TensorFlow.

tensorflow-model-optimization needs Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be
set before TensorFlow is first imported. Every kfopt module gets TensorFlow,
tf_keras and tfmot from here, never by importing them at module level, so that
``import kfopt`` and ``kfopt --help`` stay fast and TensorFlow-free.
"""

from __future__ import annotations

import os


def _prepare_environment() -> None:
    # kfopt itself only uses tf_keras (never ``tf.keras``), and tfmot imports tf_keras on its own, so
    # TensorFlow imported earlier by the user (``import keras`` in a notebook) is fine: the variable
    # only has to be set before tfmot and the subprocesses kfopt starts (kfp.local steps) import it.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tf():
    """Return the ``tensorflow`` module, importing it with Keras 2 selected."""
    _prepare_environment()
    import tensorflow

    return tensorflow


def keras():
    """Return ``tf_keras`` (Keras 2), the Keras that tfmot works with."""
    tf()
    import tf_keras

    return tf_keras


def tfmot():
    """Return ``tensorflow_model_optimization``."""
    tf()
    import tensorflow_model_optimization

    return tensorflow_model_optimization
