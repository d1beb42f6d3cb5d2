"""Shared fixtures: real digits data, small real baselines trained once per session."""

from __future__ import annotations

import os

os.environ.setdefault("KFOPT_DISABLE_PLUGIN_AUTOLOAD", "1")

import numpy as np
import pytest
from pydantic import Field

from kfopt.data import load_data
from kfopt.models import copy_model
from kfopt.plugins import ModelHandle, StepContext, Technique
from kfopt.training import train_demo


@pytest.fixture(scope="session")
def digits_flat():
    """Digits as 64-vectors (for demo:mlp)."""
    return load_data("digits", input_shape=(64,), seed=0, validation_from="train")


@pytest.fixture(scope="session")
def digits_images():
    """Digits resized to 28x28x1 (for demo:cnn)."""
    return load_data("digits", input_shape=(28, 28, 1), seed=0, validation_from="train")


def make_ctx(data, tmp_path, seed=0):
    return StepContext(
        train=data.train, validation=data.validation, workdir=tmp_path, seed=seed, num_classes=data.num_classes
    )


@pytest.fixture
def ctx_factory(tmp_path):
    """Build a StepContext for some data in a fresh temp dir."""
    return lambda data, seed=0: make_ctx(data, tmp_path, seed)


@pytest.fixture(scope="session")
def mlp(digits_flat, tmp_path_factory):
    """demo:mlp trained briefly on digits (a real, accurate baseline: ~95%)."""
    ctx = make_ctx(digits_flat, tmp_path_factory.mktemp("mlp"))
    return train_demo("demo:mlp", ctx, epochs=15)


@pytest.fixture(scope="session")
def cnn(digits_images, tmp_path_factory):
    """demo:cnn trained briefly on 28x28 digits."""
    ctx = make_ctx(digits_images, tmp_path_factory.mktemp("cnn"))
    return train_demo("demo:cnn", ctx, epochs=5)


def baseline_record(directory, accuracy: float = 0.97):
    """A pipeline ``baseline`` folder for steps that read only its record (the model file is a placeholder)."""
    import json

    from kfopt.components import steps

    directory.mkdir(parents=True)
    (directory / steps.BASELINE_MODEL).write_bytes(b"keras")
    record = {"model": "demo:mlp", "data": "digits", "seed": 0, "input_shape": [64], "metrics": {"accuracy": accuracy}}
    (directory / steps.BASELINE_FILE).write_text(json.dumps(record))
    return directory


def accuracy(keras_model, data) -> float:
    x, y = data.test.arrays()
    return float((keras_model.predict(x, verbose=0).argmax(axis=1) == y).mean())


def clone(keras_model):
    """A copy with the same weights, so a test can check its input was not mutated."""
    return copy_model(keras_model)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, local artifacts) on a free port, for the whole session."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


class RoundWeights(Technique):
    """Rounds every weight to a few decimals: a tiny, real keras-in, keras-out technique for tests."""

    name = "round_weights"
    kind = "compress"
    accepts = {"keras"}
    produces = "keras"

    class Config(Technique.Config):
        decimals: int = Field(2, ge=0, le=8, description="Decimals kept.")

    def apply(self, model, config, ctx):
        copy = copy_model(model.keras())
        copy.set_weights([np.round(w, config.decimals) for w in copy.get_weights()])
        return ModelHandle.from_keras(copy)
