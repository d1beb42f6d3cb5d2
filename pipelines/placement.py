"""Which node pool each pipeline step runs on: values in a YAML file, applied at compile time.

Two pools. ``accelerator``: optimize steps of recipes that fine-tune (any step
whose ``Technique.trains_for(config)`` is true: QAT, pruning, distillation,
mixed precision). ``cpu``: everything else (prepare, post-training recipes,
evaluation, select, report, promote). A pool sets an accelerator type and
count, CPU and memory requests/limits, node selectors and tolerations.

The shipped files (``--placement gke`` / ``gke-tpu``) are examples for GKE;
copy one and change the values for your cluster. Leaving out the
``accelerator`` pool puts every step on the CPU pool.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import Field

from kfopt.errors import KfoptError

#: Placement files shipped with kfopt, by the name ``--placement`` accepts.
BUILTIN = {"gke": "placement.gke.yaml", "gke-tpu": "placement.gke-tpu.yaml"}
DEFAULT = "gke"


class Accelerator(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    type: str = Field(description="Kubernetes resource name, e.g. nvidia.com/gpu or google.com/tpu.")
    count: int = Field(1, ge=1, description="How many the step's pod requests (TPU: chips of the slice).")


class Toleration(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Equal", "Exists"] | None = None
    value: str | None = None
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = None


class Pool(pydantic.BaseModel):
    """Resources and scheduling of the steps placed on one node pool."""

    model_config = pydantic.ConfigDict(extra="forbid")

    accelerator: Accelerator | None = None
    cpu: str | None = Field(None, description="CPU request, e.g. '2' or '500m'.")
    memory: str | None = Field(None, description="Memory request, e.g. '8Gi'.")
    cpu_limit: str | None = None
    memory_limit: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class Placement(pydantic.BaseModel):
    """The two pools; ``source`` says which file they came from."""

    model_config = pydantic.ConfigDict(extra="forbid")

    cpu: Pool = Field(default_factory=Pool)
    accelerator: Pool | None = None
    source: str | None = Field(None, exclude=True)

    def pool_for(self, trains: bool) -> Pool:
        """The pool a step belongs on: the accelerator pool when it fine-tunes (and one is defined)."""
        return self.accelerator if trains and self.accelerator is not None else self.cpu


def apply_pool(task, pool: Pool):
    """Set ``pool``'s resources, node selectors and tolerations on a pipeline task; return the task."""
    from kfp import kubernetes

    if pool.accelerator is not None:
        task.set_accelerator_type(pool.accelerator.type)
        task.set_accelerator_limit(pool.accelerator.count)
    if pool.cpu:
        task.set_cpu_request(pool.cpu)
    if pool.memory:
        task.set_memory_request(pool.memory)
    if pool.cpu_limit:
        task.set_cpu_limit(pool.cpu_limit)
    if pool.memory_limit:
        task.set_memory_limit(pool.memory_limit)
    for key, value in pool.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in pool.tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump())
    return task


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("kfopt.pipelines").joinpath(BUILTIN[name])))


def load_placement(source: str | os.PathLike | None = None) -> Placement:
    """Read a placement file, or a built-in one by name (``gke``, ``gke-tpu``); None = ``gke``."""
    import yaml

    source = DEFAULT if source is None else source
    path = builtin_path(str(source)) if str(source) in BUILTIN else Path(source)
    if not path.is_file():
        raise KfoptError(
            f"Placement file '{source}' does not exist.",
            f"pass a YAML file like {builtin_path(DEFAULT)}, or one of: {', '.join(BUILTIN)}.",
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise KfoptError(
            f"Placement file '{path}' is not valid YAML ({str(exc).splitlines()[0]}).", "fix the YAML syntax."
        ) from None
    pools = data.get("pools") if isinstance(data, dict) else None
    if not isinstance(pools, dict) or set(data) - {"pools"}:
        raise KfoptError(
            f"Placement file '{path}' must have one top-level key 'pools' with 'cpu' and optionally 'accelerator'.",
            f"see {builtin_path(DEFAULT)}.",
        )
    try:
        placement = Placement(**pools)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"pools.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KfoptError(
            f"Placement file '{path}': {problems}.", f"see {builtin_path(DEFAULT)} for the keys a pool takes."
        ) from None
    placement.source = str(path)
    return placement
