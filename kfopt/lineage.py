"""Where a logged model came from: the data it was measured on, the code and plugins, the pipeline run.

What :class:`kfopt.tracking.RunLogger` puts on MLflow runs besides metrics:

- the data, as MLflow datasets (``log_inputs``) per split (train, validation,
  test) with name, digest, source and sizes, read again from the run's data
  spec (an .npz file or URI, or ``digits``; data passed from Python and
  ``py:`` loaders cannot be read again without running code, so their runs say
  why they carry no datasets in the tag ``kfopt.datasets``);
- tags: kfopt's version, the package version of every technique a recipe
  used, and the Kubeflow Pipelines run (id and URL) when the run is a
  pipeline's;
- each candidate's recipe as a YAML file that ``kfopt optimize --recipe`` takes back;
- the text of a registered version's description.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import __version__

#: Set inside a Kubeflow pipeline's promote step (its ``kfp_run_id`` input: the pipeline run's UUID).
KFP_RUN_ID_ENV = "KFOPT_KFP_RUN_ID"
#: The KFP UI's base URL (e.g. https://kubeflow.example.com/pipeline), to link a run: set it in the image or chart.
KFP_UI_ENV = "KFOPT_KFP_UI"
#: Where ``digits`` comes from.
DIGITS_SOURCE = "sklearn.datasets.load_digits"
SPLITS = ("train", "validation", "test")


@dataclass
class RunData:
    """The run's data read again for lineage and input examples, or why it could not be."""

    data: object | None  # kfopt.data.Data
    why_not: str | None = None


def load_run_data(model: str, data: str, seed: int, baseline: str | os.PathLike | None) -> RunData:
    """Read the data of a run again, split as the run split it, to log it and take input examples from it.

    ``baseline`` is the run's saved baseline model (its inputs decide how
    ``digits`` is shaped and which dtype each input has). Never runs code: a
    ``py:`` loader or data passed from Python is not read again.
    """
    from .data import FROM_PYTHON_ARRAYS, FROM_PYTHON_DATASETS, load_data
    from .models import DEMO_MODELS

    if data in (FROM_PYTHON_ARRAYS, FROM_PYTHON_DATASETS):
        return RunData(None, "the data was passed from Python, so it cannot be read again")
    if data.startswith("py:"):
        return RunData(None, f"the data loader {data} is code, which logging does not run")
    if baseline is None or not Path(baseline).exists():
        return RunData(None, "the run directory has no baseline model")
    try:
        from .plugins.technique import ModelHandle
        from .signature import model_info

        info = model_info(ModelHandle.load(baseline))
        validation_from = "train" if model in DEMO_MODELS else "test"  # as engine.prepare split it
        return RunData(load_data(data, inputs=info.inputs, seed=seed, validation_from=validation_from))
    except Exception as exc:  # moved, deleted, unreadable: the run is logged without datasets
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RunData(None, f"reading {data} again failed: {first[:200]}")


def dataset_inputs(data, spec: str) -> list:
    """MLflow ``DatasetInput``s of the train, validation and test splits of ``data`` (read from ``spec``).

    Each dataset is named after its source and split, with MLflow's digest of
    its content and the shapes in its profile; the input's tags give the split
    (``mlflow.data.context``), its number of samples and where validation came from.
    """
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from .data import input_list

    source = DIGITS_SOURCE if spec == "digits" else spec
    stem = "digits" if spec == "digits" else Path(spec.rstrip("/")).stem or "data"
    inputs = []
    for split in SPLITS:
        part = getattr(data, split)
        if part.x is None:  # a tf.data split: not read whole just to hash it
            continue
        x = part.x
        features = dict(zip(x.names, input_list(x))) if hasattr(x, "names") else x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's note on inferring a local source
            dataset = mlflow.data.from_numpy(features, source=source, targets=part.y, name=f"{stem}-{split}")
            entity = dataset._to_mlflow_entity()
        tags = [
            InputTag(MLFLOW_DATASET_CONTEXT, split),
            InputTag("kfopt.samples", str(len(part.y))),
        ]
        if split == "validation":
            tags.append(InputTag("kfopt.validation_source", str(data.validation_source)))
        inputs.append(DatasetInput(entity, tags))
    return inputs


def kfp_tags() -> dict[str, str]:
    """``kfopt.kfp_run_id`` and ``kfopt.kfp_run_url`` when this process is a Kubeflow pipeline's step."""
    run_id = os.environ.get(KFP_RUN_ID_ENV, "").strip()
    if not run_id or run_id.startswith("{{"):  # an unresolved placeholder is no run id
        return {}
    tags = {"kfopt.kfp_run_id": run_id}
    ui = os.environ.get(KFP_UI_ENV, "").strip().rstrip("/")
    if ui:
        tags["kfopt.kfp_run_url"] = f"{ui}/#/runs/details/{run_id}"
    return tags


def plugin_versions(steps: list[dict]) -> dict[str, str]:
    """``kfopt.plugin.<technique>``: the package (and version) that provides each technique of ``steps``."""
    from importlib.metadata import PackageNotFoundError, version

    from .plugins.manager import registry

    owners = registry().owners
    tags = {}
    for step in steps:
        technique = step.get("technique")
        package = owners.get(technique)
        if not technique or package is None:
            continue
        try:
            found = __version__ if package == "kfopt" else version(package)
        except PackageNotFoundError:
            found = "unknown"
        tags[f"kfopt.plugin.{technique}"] = f"{package}=={found}"
    return tags


def recipe_yaml(label: str, steps: list[dict]) -> str:
    """The recipe as a YAML file ``kfopt optimize --recipe FILE`` runs again (every config value spelled out)."""
    import yaml

    data = {"name": label, "steps": [{step["technique"]: dict(step.get("config") or {})} for step in steps]}
    return yaml.safe_dump(data, sort_keys=False)


def version_description(candidate, baseline) -> str:
    """What was done to the registered model and what it measured against its baseline, in a few lines."""

    def number(key, fmt):
        value = candidate.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"

    metric = candidate.get("metric_name") or "accuracy"
    value = candidate.get("metric") if candidate.get("metric") is not None else candidate.get("accuracy")
    base = baseline.get("metric") if baseline.get("metric") is not None else baseline.get("accuracy")
    drop = candidate.get("metric_drop") if candidate.get("metric_drop") is not None else candidate.get("accuracy_drop")
    lines = [
        f"kfopt {__version__}: recipe {candidate.recipe} ({candidate.format}).",
        f"{metric}: {_f(value)} vs baseline {_f(base)} (drop {_f(drop)}, on the test split).",
        f"compression: {number('compression_ratio', '.2f')}x (gzip {number('gzip_bytes', ',.0f')} bytes); "
        f"speedup: {number('speedup', '.2f')}x (p50 {number('latency_p50_ms', '.3f')} ms, batch 1).",
    ]
    if candidate.get("sparsity") is not None:
        lines.append(f"sparsity: {number('sparsity', '.2f')}.")
    return "\n".join(lines)


def _f(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"
