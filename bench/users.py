"""Benchmark: a user's own model against kfopt's demo of the same architecture, under the default search.

The two aims of the users'-models issue, measured side by side in one run:

- a Keras 3 model (``tf.keras`` on TF 2.16+, the ``keras`` package) gets the
  same search result as the same model written with tf_keras;
- a user model trained on *all* of ``x_train`` (so validation must come from
  the test side, never from training data) gets at least the compression the
  search finds on a kfopt-trained demo of that architecture, at the same budget.

For each architecture (demo:mlp, demo:cnn on the digits) it builds the user's
models in Keras 3 and in tf_keras, trained on all of ``x_train`` with a fixed
number of epochs, and runs the default ``kfopt search`` (``kfopt.search`` with
its defaults) on each and on the demo. Prints: where validation came from,
the baseline's accuracy, the winner, its compression and test drop, wall time.
Usage: .venv/bin/python bench/users.py [--archs mlp cnn] [--out runs/bench-users]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import kfopt
from kfopt import _tf
from kfopt.data import load_data
from kfopt.keras3 import keras3
from kfopt.models import build_demo
from kfopt.rundir import slug

#: Epochs a user trains the model for, on all of x_train (no validation split of their own).
USER_EPOCHS = {"mlp": 30, "cnn": 15}
INPUT_SHAPE = {"mlp": (64,), "cnn": (28, 28, 1)}


def digits_arrays(arch: str) -> dict[str, np.ndarray]:
    """The digits split the demo uses (80/20, seed 0, stratified), shaped for ``arch``: the data a user has."""
    data = load_data("digits", input_shape=INPUT_SHAPE[arch], seed=0, validation_from="train")
    # Training and validation together are the demo's x_train: the user trains on all of it.
    x_train = np.concatenate([data.train.x, data.validation.x])
    y_train = np.concatenate([data.train.y, data.validation.y])
    return {"x_train": x_train, "y_train": y_train, "x_test": data.test.x, "y_test": data.test.y}


def user_model(arch: str, flavour: str, data: dict, directory: Path) -> str:
    """The demo architecture built and trained by a user in ``flavour`` (keras3 / tf_keras), saved as .keras."""
    model = build_demo(f"demo:{arch}")  # tf_keras, untrained: the architecture, not its weights
    keras = keras3() if flavour == "keras3" else _tf.keras()
    keras.utils.set_random_seed(0)
    if flavour == "keras3":
        model = keras.Sequential.from_config(_keras3_config(model))
        keras.utils.set_random_seed(0)  # training shuffles alike in both flavours
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(data["x_train"], data["y_train"], epochs=USER_EPOCHS[arch], batch_size=32, verbose=0)
    path = directory / f"{arch}-{flavour}.keras"
    model.save(path)
    return str(path)


def _keras3_config(demo) -> dict:
    """The Sequential config of ``demo`` as Keras 3 writes it (layers rebuilt from their class and arguments)."""
    layers = [{"class_name": "InputLayer", "config": {"batch_shape": [None, *demo.input_shape[1:]]}}]
    for layer in demo.layers:
        config = {k: v for k, v in layer.get_config().items() if k in _PORTABLE}
        layers.append({"class_name": type(layer).__name__, "config": config})
    return {"name": demo.name, "layers": layers}


#: Layer arguments the demo architectures use that mean the same in tf_keras and Keras 3.
_PORTABLE = {"name", "units", "activation", "filters", "kernel_size", "pool_size", "strides", "padding"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--out", default="runs/bench-users")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)

    table = Table(title="Default kfopt search: the user's own model vs the kfopt-trained demo (budget 1 pt, test)")
    for column in ("arch", "model", "validation from", "val/test n", "base acc", "winner", "compression",
                   "test drop", "wall s"):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("arch", "model", "validation from", "winner") else "right"
        )
    for arch in args.archs:
        data = digits_arrays(arch)
        runs = [
            ("demo (kfopt-trained)", f"demo:{arch}", "digits"),
            ("user, tf_keras", user_model(arch, "tf_keras", data, out / "models"), data),
            ("user, Keras 3", user_model(arch, "keras3", data, out / "models"), data),
        ]
        for label, model, given in runs:
            started = time.perf_counter()
            result = kfopt.search(model, given, out=out / slug(f"{arch}-{label}"), progress=False)
            wall = time.perf_counter() - started
            winner = result.winning_candidate
            splits = result.splits or {}
            table.add_row(
                arch,
                label,
                str(splits.get("validation_source", "-")),
                f"{splits.get('validation', '-')}/{splits.get('test', '-')}",
                f"{result.baseline.metric:.4f}",
                winner.recipe if winner else "none",
                f"{winner.compression_ratio:.1f}x" if winner else "-",
                f"{winner.metric_drop * 100:+.2f} pt" if winner else "-",
                f"{wall:.0f}",
            )
            Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
