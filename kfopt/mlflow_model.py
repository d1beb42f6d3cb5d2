"""The MLflow pyfunc model of a TFLite or SavedModel candidate ("models from code").

MLflow copies this file into the logged model and runs it when the model is
loaded, so ``mlflow.pyfunc.load_model(uri).predict(x)`` runs the artifact with
kfopt's own runner (the one the evaluator measured it with). Loading needs
kfopt installed. Not meant to be imported: it calls ``mlflow.models.set_model``.
"""

import threading

import mlflow
import numpy as np


class CandidateModel(mlflow.pyfunc.PythonModel):
    """Predicts class scores (float32, one row per input) for a batch of inputs."""

    def load_context(self, context):
        from kfopt.evaluate import runner_for
        from kfopt.plugins.technique import ModelHandle

        config = context.model_config or {}
        handle = ModelHandle(
            config["format"], path=context.artifacts["model"], info={"threads": int(config.get("threads", 1))}
        )
        self._runner = runner_for(handle)
        self._lock = threading.Lock()  # a TFLite interpreter is not thread-safe

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        with self._lock:
            return self._runner(np.asarray(model_input, np.float32))


mlflow.models.set_model(CandidateModel())
