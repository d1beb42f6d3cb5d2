"""Which device this process runs on, and the tf.distribute strategy for it."""

from __future__ import annotations

import os

from . import _tf


def detect_device() -> str:
    """``tpu`` when a TPU is attached, ``gpu`` when TensorFlow sees a GPU, else ``cpu``."""
    tf = _tf.tf()
    if os.environ.get("TPU_NAME") or os.path.exists("/dev/accel0") or tf.config.list_logical_devices("TPU"):
        return "tpu"
    if tf.config.list_physical_devices("GPU"):
        return "gpu"
    return "cpu"


def strategy_for(device: str):
    """TPUStrategy on a TPU, MirroredStrategy on several GPUs, else the default strategy."""
    tf = _tf.tf()
    if device == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", "local"))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if device == "gpu" and len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
