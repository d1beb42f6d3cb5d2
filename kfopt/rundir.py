"""The run directory: its file names, atomic writes, JSON I/O and where its model files are.

Every kfopt command that writes results (``optimize``, ``search``, the
pipeline's steps, ``promote --from``) goes through this module, so the layout
of a run directory is defined once::

    OUT/metrics.json         the run record (kfopt.result.RunResult)
    OUT/tracking.json        what was logged to MLflow, so a retry logs nothing twice
    OUT/report.html          the HTML report
    OUT/baseline/            the baseline model
    OUT/candidate/ ...       candidate models (``candidates/`` in a search)
    OUT/.kfopt.lock          who writes the directory now (pid, command, start time)

A run directory can be trusted by what reads it later (``kfopt promote
--from``): it is locked while a run writes it (:func:`locked`), every write
is atomic, every model file it lists is a path inside it with its sha256
(:func:`digest`, :func:`resolve_artifact`), and a new run into it first
removes what an earlier run left (:func:`clear_run`), so a record never
describes files it did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import KfoptError

METRICS_FILE = "metrics.json"
TRACKING_FILE = "tracking.json"
#: The HTML report (see :mod:`kfopt.html_report`), in the run directory and on the MLflow parent run.
REPORT_FILE = "report.html"
BASELINE_DIR = "baseline"
LOCK_FILE = ".kfopt.lock"
#: What a run writes, and what a new run into the same directory removes first (metrics.json first of all).
RUN_FILES = (METRICS_FILE, TRACKING_FILE, REPORT_FILE)
RUN_DIRS = (BASELINE_DIR, "candidate", "candidates")


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
    """Write JSON atomically: readers never see a half-written file, and an interruption leaves no temporary file."""
    path = Path(path)
    text = json.dumps(data, indent=2, default=jsonable) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file: a crash leaves one or the other
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt (SIGINT, and SIGTERM under locked()) included
        tmp.unlink(missing_ok=True)
        raise
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


def resolve_artifact(directory: str | os.PathLike, artifact: str | os.PathLike, sha256: str | None = None) -> Path:
    """The model file (or SavedModel directory) ``artifact``, which must be inside the run directory ``directory``.

    ``artifact`` is a path as this process sees it (absolute, or relative to
    the current directory): what :meth:`kfopt.result.RunResult.load` makes of
    the relative paths metrics.json stores. Refused (a KfoptError) when it
    resolves outside ``directory`` (``..``, an absolute path elsewhere, a
    symbolic link pointing out, or one inside a model directory), is missing,
    or, with ``sha256``, when its content is not what metrics.json recorded.
    """
    directory = Path(directory)
    path = Path(artifact)
    where = f"{directory}/{METRICS_FILE}"
    root = directory.resolve()
    real = path.resolve()
    if real == root or not real.is_relative_to(root):
        raise KfoptError(
            f"Model file '{artifact}' named in {where} is outside the run directory; refused.",
            "use the run directory as kfopt wrote it: metrics.json lists only files inside it "
            "(re-run kfopt if the file was edited).",
        )
    if not path.exists():
        raise KfoptError(
            f"Model file '{artifact}' named in {where} is missing.",
            "keep the run directory as kfopt wrote it (baseline/, candidate/, metrics.json).",
        )
    if path.is_dir():
        _files(path, where)  # refuses a link inside
    if sha256 is not None and digest(path) != sha256:
        raise KfoptError(
            f"Model file '{artifact}' is not the one {where} describes (its sha256 differs); refused.",
            "re-run kfopt into this directory: its files were changed or replaced after the run.",
        )
    return path


def stored_artifact(directory: str | os.PathLike, artifact: str | os.PathLike) -> str:
    """``artifact`` (a path this process can open) as metrics.json stores it: relative to ``directory``.

    Relative paths keep a run directory valid wherever it is copied, and keep
    a record from naming anything outside it. A path outside ``directory`` is a
    bug of whoever built the record (ValueError).
    """
    root, path = Path(os.path.abspath(directory)), Path(os.path.abspath(artifact))
    if not path.is_relative_to(root):  # the same place reached through a symbolic link
        root, path = Path(directory).resolve(), Path(artifact).resolve()
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"artifact '{artifact}' is not inside the run directory '{directory}'")
    return path.relative_to(root).as_posix()


def digest(path: str | os.PathLike) -> str:
    """The sha256 of a model: of a file's bytes, or of a directory's files in sorted order (path and sha256 each).

    A directory digest does not depend on where the directory is or on file
    times, so a copied run directory keeps its digests. Symbolic links are
    refused: kfopt never writes them, and one could point outside the run.
    """
    path = Path(path)
    if path.is_symlink():
        raise KfoptError(f"'{path}' is a symbolic link; refused.", "replace it with the file it points to.")
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model file or directory at '{path}'")
    tree = hashlib.sha256()
    for file in _files(path, str(path)):
        tree.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return tree.hexdigest()


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _files(directory: Path, where: str) -> list[Path]:
    """Every file under ``directory``, sorted; a KfoptError at the first symbolic link (kfopt writes none)."""
    files = []
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            if (Path(root) / name).is_symlink():
                raise KfoptError(
                    f"'{Path(root) / name}' (in a model named in {where}) is a symbolic link; refused.",
                    "use the run directory as kfopt wrote it: it writes no links.",
                )
        files += [Path(root) / name for name in names]
    return sorted(files)


def slug(text: str) -> str:
    """A file-name-safe form of a recipe label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80] or "recipe"


# -- one writer at a time ---------------------------------------------------------------------
#: Run directories this process holds the lock of (resolved path -> depth): the lock is re-entrant,
#: so ``kfopt.optimize`` can hold it while a function it calls takes it again.
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


@contextmanager
def locked(
    directory: str | os.PathLike,
    what: str,
    *,
    wait: float = 0.0,
    fresh: bool = False,
    inputs: Iterable = (),
) -> Iterator[Path]:
    """Hold the exclusive lock of the run directory while ``what`` (e.g. ``"kfopt optimize"``) writes it.

    Another kfopt process that wants the directory waits up to ``wait``
    seconds, then gets a KfoptError (exit 2) naming the holder: its pid,
    command and start time, from the lock file. The lock is an ``fcntl`` lock,
    so the system releases it when a process dies: there are no stale locks.

    ``fresh`` is for a new run: ``inputs`` (the model and data paths) are
    refused when they are inside what the run replaces, and temporary files a
    killed run left are removed. The run then calls :func:`clear_run` itself
    once its model and data loaded, so a wrong path loses nothing. Inside the block SIGTERM and SIGHUP
    raise KeyboardInterrupt like SIGINT, so temporary files and directories are
    removed on the way out and the lock is released.
    """
    directory = writable_dir(directory)
    key = directory.resolve()
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield directory
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = _acquire(directory, what, wait)
    with _held_guard:
        _held[key] = 1
    try:
        with _interrupted_by_signals():
            if fresh:
                check_inputs(directory, inputs)
                _remove_leftovers(directory)
            yield directory
    finally:
        with _held_guard:
            del _held[key]
        _release(fd)


def _acquire(directory: Path, what: str, wait: float) -> int | None:
    import fcntl

    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise KfoptError(
            f"Cannot lock the run directory '{directory}' ({exc.strerror or exc}).",
            "pass a directory you can write to.",
        ) from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(path)
                os.close(fd)
                raise KfoptError(
                    f"The run directory '{directory}' is in use by another kfopt process ({holder}).",
                    "wait until it finishes, or pass another --out.",
                ) from None
            time.sleep(0.1)
        except OSError as exc:  # a file system without locks (some network mounts): go on, and say so
            warnings.warn(
                f"cannot lock '{directory}' ({exc.strerror}): concurrent runs into it are not kept apart", stacklevel=4
            )
            os.close(fd)
            return None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Only the command name, never its arguments: they may hold credentials (a tracking URI with a password).
    holder = {"pid": os.getpid(), "command": what, "started": started, "host": socket.gethostname()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "it is starting up"
    return f"pid {holder['pid']}, {holder.get('command', 'kfopt')}, started {holder.get('started', '?')}" + (
        f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    )


def _release(fd: int | None) -> None:
    import fcntl

    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # the file stays (removing it would race with a process about to lock it)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def _interrupted_by_signals():
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the block (the main thread only: Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            saved[sig] = signal.signal(sig, _interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def clear_run(directory: str | os.PathLike) -> None:
    """Remove what an earlier run wrote into ``directory`` (metrics.json first), so a new run starts clean.

    A re-run into a finished ``--out`` replaces that run rather than mixing
    with it: with metrics.json gone first, an interrupted re-run never leaves
    new model files under the old record. Only kfopt's own names
    (:data:`RUN_FILES`, :data:`RUN_DIRS`, its temporary files) are removed.
    """
    directory = Path(directory)
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)
    _remove_leftovers(directory)
    for name in RUN_DIRS:
        path = directory / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def _remove_leftovers(directory: Path) -> None:
    """Remove the temporary files and directories of a run that was killed (only the lock holder may)."""
    for leftover in [*directory.glob(".*.tmp"), *directory.glob(".work-*")]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def check_inputs(directory: str | os.PathLike, inputs: Iterable) -> None:
    """Refuse (exit 2) an input path that a run into ``directory`` would remove or overwrite.

    E.g. ``--model OUT/candidate`` with ``--out OUT``: the run replaces
    ``OUT/candidate``, so it would delete the model it reads. Non-path inputs
    (``demo:mlp``, ``digits``, ``py:...``, URIs, in-memory objects) are skipped.
    """
    root = Path(directory).resolve()
    replaced = [root / name for name in (*RUN_FILES, *RUN_DIRS)]
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)) or (":" in str(given) and not Path(given).exists()):
            continue  # demo:mlp, py:module:function, a URI, arrays
        path = Path(given).resolve()
        if path == root:
            raise KfoptError(
                f"'{given}' is the output directory itself.", "pass --out a directory of its own, e.g. runs/NAME."
            )
        inside = next((r for r in replaced if path.is_relative_to(r)), None)
        if inside is not None:
            raise KfoptError(
                f"'{given}' is inside {inside}, which this run into '{directory}' replaces: "
                "it would be deleted before it is read.",
                "copy it out of the run directory first, or pass another --out.",
            )


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
