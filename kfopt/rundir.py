"""The run directory: its file names, atomic writes, JSON I/O and where its model files are.

Every kfopt command that writes results (``optimize``, ``search``, the
pipeline's steps, ``promote --from``) goes through this module, so the layout
of a run directory is defined once::

    OUT/metrics.json         the run record (kfopt.result.RunResult)
    OUT/tracking.json        what was logged to MLflow, so a retry logs nothing twice
    OUT/report.html          the HTML report
    OUT/baseline/            the baseline model
    OUT/candidate/ ...       candidate models (``candidates/`` in a search)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import KfoptError

METRICS_FILE = "metrics.json"
TRACKING_FILE = "tracking.json"
#: The HTML report (see :mod:`kfopt.html_report`), in the run directory and on the MLflow parent run.
REPORT_FILE = "report.html"
BASELINE_DIR = "baseline"


def writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kfopt-write-check"):
            pass
    except OSError as exc:
        raise KfoptError(
            f"Output directory '{path}' is not writable ({exc.strerror or exc}).",
            "pass --out a directory you can write to.",
        ) from None
    return path


def jsonable(value):
    """``json.dumps`` default for what results hold besides plain JSON: records, numpy scalars, paths."""
    if hasattr(value, "to_dict"):  # kfopt.result records
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=jsonable) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, what: str):
    """The JSON content of ``path``; a KfoptError naming ``what`` it should be when missing or broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KfoptError(
            f"The {what} '{path}' does not exist.", "pass the output directory of the step that writes it."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KfoptError(f"The {what} '{path}' is not valid JSON ({exc}).", "re-run the step that writes it.") from None


def resolve_artifact(directory: str | os.PathLike, artifact: str) -> Path:
    """Find a candidate's model file whether ``artifact`` is absolute, cwd-relative, or
    written on another machine (a pipeline pod): the longest tail of it inside ``directory`` wins."""
    directory, given = Path(directory), Path(artifact)
    parts = [p for p in given.parts if p != given.anchor]
    for start in range(len(parts)):
        candidate = directory.joinpath(*parts[start:])
        if candidate.exists():
            return candidate
    if given.exists():
        return given
    raise KfoptError(
        f"Model file '{artifact}' named in {directory}/{METRICS_FILE} is missing.",
        "keep the run directory as kfopt wrote it (baseline/, candidate/, metrics.json).",
    )


def slug(text: str) -> str:
    """A file-name-safe form of a recipe label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80] or "recipe"


@contextmanager
def tracking_uri(uri: str | None):
    """Make ``uri`` MLflow's default tracking URI inside the block, then restore what was there.

    Parts of MLflow ignore the client they are given: the fluent API used by
    ``log_model``, and the model registry resolving ``models:/`` sources, open
    a client on the default URI. ``mlflow.set_tracking_uri`` also sets
    ``MLFLOW_TRACKING_URI`` in the environment; left behind, it would turn
    tracking on for later runs, so both are restored.
    """
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
