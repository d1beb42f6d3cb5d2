"""Weight sparsity of a Keras model: the fraction of exact zeros in its kernels."""

from __future__ import annotations

import numpy as np


def kernels(keras_model) -> list[np.ndarray]:
    """The weight matrices/filters (ndim >= 2) that pruning acts on; biases excluded."""
    return [w for w in keras_model.get_weights() if w.ndim >= 2]


def weight_sparsity(keras_model) -> float:
    """Fraction of kernel weights that are exactly zero."""
    weights = kernels(keras_model)
    total = sum(w.size for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else 0.0
