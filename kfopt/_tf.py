"""The one place that imports TensorFlow.

tensorflow-model-optimization needs Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be
set before TensorFlow is first imported. Every kfopt module gets TensorFlow,
tf_keras and tfmot from here, never by importing them at module level, so that
``import kfopt`` and ``kfopt --help`` stay fast and TensorFlow-free.
"""

from __future__ import annotations

import os
import sys


def _prepare_environment() -> None:
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        import warnings

        warnings.warn(
            "TensorFlow was imported before kfopt could set TF_USE_LEGACY_KERAS=1; "
            "tensorflow-model-optimization may fail. Import kfopt (or set the variable) first.",
            stacklevel=3,
        )
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
