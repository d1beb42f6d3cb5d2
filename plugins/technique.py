"""What a technique is, what it receives, and what it returns."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import pydantic

if TYPE_CHECKING:
    from kfopt.signature import ModelInfo
    from kfopt.task import Task

#: Model formats kfopt knows how to load, evaluate and save.
FORMATS = ("keras", "tflite", "saved_model")

#: File or folder name a model of each format is saved under.
ARTIFACT_NAMES = {"keras": "model.keras", "tflite": "model.tflite", "saved_model": "saved_model"}


#: A config value naming layers: a list of names, or one name (``keep_dense=dense_2`` in an inline recipe).
LayerNames = Annotated[list[str], pydantic.BeforeValidator(lambda value: [value] if isinstance(value, str) else value)]


class Technique:
    """Base class for an optimization technique.

    Subclasses set ``name`` (what recipes call it), ``kind`` (prune, quantize,
    distill, accelerate, or a new word), ``accepts`` (formats it takes),
    ``produces`` (format it returns), a pydantic ``Config``, and ``apply``.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    accepts: ClassVar[set[str]] = {"keras"}
    produces: ClassVar[str] = "keras"
    #: True when the technique trains (fine-tunes) and so belongs on the accelerator pool.
    trains: ClassVar[bool] = False

    class Config(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

    def produces_for(self, config: pydantic.BaseModel) -> str:
        """Format this technique returns for ``config`` (override when it depends on the config)."""
        return self.produces

    def trains_for(self, config: pydantic.BaseModel) -> bool:
        """Whether ``config`` fine-tunes the model (placement uses this)."""
        return self.trains

    def check(self, model: ModelInfo, config: Any) -> None:
        """Refuse a model this technique cannot work on, before any work is done (default: accept every model).

        ``model`` describes the baseline: its ``format``, ``inputs`` and
        ``outputs`` (name, shape, dtype), the class names of its ``layers`` and
        its ``recurrent`` layers; ``model.keras()`` gives the tf_keras model for
        deeper checks. Raise ``KfoptError(why, fix)`` to refuse: ``kfopt
        optimize`` stops before the baseline is measured, ``kfopt search`` marks
        the recipe skipped with that line and runs the others. An error raised
        later, in ``apply``, fails only its candidate.
        """

    def apply(self, model: ModelHandle, config: Any, ctx: StepContext) -> ModelHandle:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Technique {self.name} ({self.kind}): {sorted(self.accepts)} -> {self.produces}>"


class ModelHandle:
    """A model in one format, in memory or on disk, plus facts measured on the way.

    ``info`` carries facts a later step or the evaluator needs and the artifact
    itself cannot tell (e.g. ``sparsity`` of the Keras model a TFLite file was
    converted from, or the ``threads`` a TFLite model is meant to run with).
    """

    def __init__(
        self,
        format: str,
        *,
        keras_model=None,
        tflite_bytes: bytes | None = None,
        path: str | os.PathLike | None = None,
        info: dict | None = None,
    ):
        if format not in FORMATS:
            raise ValueError(f"unknown model format {format!r}; known: {', '.join(FORMATS)}")
        self.format = format
        self._tflite = tflite_bytes
        self._path = Path(path) if path is not None else None
        self.info: dict[str, Any] = dict(info or {})
        self._keras = self._remember_flavor(keras_model) if keras_model is not None else None

    # -- constructors -------------------------------------------------
    @classmethod
    def from_keras(cls, model, info: dict | None = None) -> ModelHandle:
        """A Keras model: tf_keras, or Keras 3 (rebuilt in tf_keras, proven, and saved back as Keras 3)."""
        return cls("keras", keras_model=model, info=info)

    @classmethod
    def from_tflite(cls, data: bytes, info: dict | None = None) -> ModelHandle:
        return cls("tflite", tflite_bytes=bytes(data), info=info)

    @classmethod
    def from_saved_model(cls, path: str | os.PathLike, info: dict | None = None) -> ModelHandle:
        return cls("saved_model", path=path, info=info)

    # -- accessors ----------------------------------------------------
    def keras(self):
        """The model as a tf_keras model (loads it from disk if needed)."""
        if self.format != "keras":
            raise TypeError(f"a {self.format} model cannot be used as a Keras model")
        if self._keras is None:
            from kfopt.models import load_keras

            self._keras = self._remember_flavor(load_keras(self._path))
        return self._keras

    def _remember_flavor(self, model):
        """The tf_keras model to work on; notes in ``info`` when the user's Keras is Keras 3.

        A Keras 3 model object is rebuilt in tf_keras here (proven, see kfopt.keras3),
        so a Python caller can hand over the model it has.
        """
        from kfopt import keras3

        if keras3.is_keras3_model(model):
            model = keras3.to_tf_keras(model)
        if keras3.flavor_of(model) == keras3.KERAS3:
            self.info.setdefault(keras3.FLAVOR_KEY, keras3.KERAS3)
        return model

    def tflite(self) -> bytes:
        """The model as TFLite flatbuffer bytes."""
        if self.format != "tflite":
            raise TypeError(f"a {self.format} model is not a TFLite model")
        if self._tflite is None:
            self._tflite = Path(self._path).read_bytes()
        return self._tflite

    def saved_model_path(self) -> Path:
        """Directory of the SavedModel."""
        if self.format != "saved_model":
            raise TypeError(f"a {self.format} model is not a SavedModel")
        return self._path

    @property
    def path(self) -> Path | None:
        """Where the model is on disk, if it has been saved or loaded from a file."""
        return self._path

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the deployable artifact into ``directory`` atomically; return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / ARTIFACT_NAMES[self.format]
        if self.format == "tflite":
            _atomic_write_bytes(target, self.tflite())
        elif self.format == "keras":
            from kfopt import keras3

            tmp = directory / f".{target.name}.{os.getpid()}.tmp.keras"
            if self.info.get(keras3.FLAVOR_KEY) == keras3.KERAS3:
                # The user's Keras out: a Keras 3 user gets a file Keras 3 loads (kfopt reads it back too).
                keras3.save(self.keras(), tmp)
            else:
                _without_optimizer(self.keras()).save(tmp)
            os.replace(tmp, target)
        else:
            staging = Path(tempfile.mkdtemp(prefix=".saved_model.", dir=directory))
            shutil.copytree(self._path, staging, dirs_exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        self._path = target
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, info: dict | None = None) -> ModelHandle:
        """Open a saved artifact, telling its format from its name."""
        path = Path(path)
        if path.suffix == ".tflite":
            return cls("tflite", path=path, info=info)
        if path.is_dir() and not (path / "keras_metadata.pb").exists():
            return cls("saved_model", path=path, info=info)
        return cls("keras", path=path, info=info)

    def __repr__(self) -> str:
        return f"<ModelHandle {self.format}{' at ' + str(self._path) if self._path else ''}>"


def _without_optimizer(model):
    """The model without its training state: a deployable file carries no optimizer slots."""
    if getattr(model, "optimizer", None) is None:
        return model
    from kfopt.errors import KfoptError
    from kfopt.models import copy_model

    try:
        return copy_model(model)
    except KfoptError:  # subclassed models cannot be cloned; save them as they are
        return model


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


@dataclass
class StepContext:
    """What a technique gets besides the model and its config.

    ``train`` and ``validation`` are :class:`kfopt.data.Split` objects (numpy or
    tf.data underneath; ``fit_args()`` hands them to Keras). The test split is
    never given to techniques: it is kept for the final, honest evaluation.
    """

    train: Any
    validation: Any
    workdir: Path
    seed: int = 0
    device: str = "cpu"
    progress: Any = None
    num_classes: int | None = None
    #: The user's task (kfopt.task.Task: kind, outputs, logits, metric, compiled loss), read from the baseline and
    #: the data; fine-tuning picks its loss from it (kfopt.training.task_loss). None: read from the model when needed.
    task: Task | None = None
    #: The name of the model output the metric is computed on (``--output``); None: the first (or the only) one.
    output: str | None = None
    _strategy: Any = field(default=None, repr=False)

    @property
    def strategy(self):
        """The ``tf.distribute`` strategy for this device (default, Mirrored on several GPUs, TPU)."""
        if self._strategy is None:
            from kfopt.device import strategy_for

            self._strategy = strategy_for(self.device)
        return self._strategy

    def representative(self, samples: int = 200) -> Callable[[], Iterator[list]]:
        """A TFLite representative-dataset generator of training inputs (batch 1, each in its own dtype).

        Yields ``[x]`` for a model with one input and, for several, ``{name: x}``
        keyed by the model's input names (``[x1, x2, ...]`` in the model's order
        when the data numbers them); integer inputs (token ids) stay integers.
        """
        from kfopt.data import Inputs, input_list

        train = self.train

        def one(x):
            if isinstance(x, Inputs) and x.names != tuple(map(str, range(len(x.names)))):
                return dict(zip(x.names, x.arrays))
            return input_list(x)

        def generate():
            yield from (one(x) for x in train.samples(samples))

        return generate
