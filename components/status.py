"""What a pipeline step tells whoever runs the pipeline: a status record, and its progress lines.

Every component writes a :class:`StepStatus` into its ``status`` output (a
small JSON file) whether its step succeeds or fails: the step, ``ok`` or
``failed``, and for a failure the error and the fix a :class:`KfoptError`
gives; the promote step adds what it did in MLflow (:class:`Registration`,
:class:`Tracking`). kfp.local leaves the file in the task's folder under the
pipeline root even when the step fails, so the local runner builds the run's
outcome and the error it raises from these files, never from the log. On a
cluster KFP uploads the file with the step's other outputs (a failed step
uploads nothing: its pod log and the KFP UI show the error).

Progress lines (``[recipe] ok``, ``round 2: proposing ...``) are for people
watching a run: steps print them and the local runner echoes them live. Their
format and the patterns that recognise them are defined here, together.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from kfopt.errors import KfoptError
from kfopt.result import Registration, Tracking
from kfopt.rundir import read_json, write_json

#: The name of every component's status output; kfp.local keeps it at ``<task folder>/status``.
STATUS_OUTPUT = "status"


class StepStatus(BaseModel):
    """How one pipeline step went (the JSON in its ``status`` output)."""

    #: The component: fingerprint, prepare, plan-search, layer-sensitivity, optimize, optimize-group, evaluate,
    #: propose, select, report or promote.
    step: str
    #: ``ok``, or ``failed`` when the step raised (a failed recipe is a failed candidate, not a failed step).
    status: str = "ok"
    #: For a KfoptError its message (and ``fix``); for any other exception ``Type: text``.
    error: str | None = None
    fix: str | None = None
    #: The step raised a KfoptError: a problem with the run's input the user can fix.
    user_error: bool = False
    #: Per-recipe steps (optimize, evaluate): the candidate's label.
    recipe: str | None = None
    #: The promote step: what was registered and how MLflow logging went.
    registered_model: Registration | None = None
    tracking: Tracking | None = None
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def record_error(self, exc: BaseException) -> None:
        """Mark the step failed by ``exc``: a KfoptError's message and fix, else its type and text."""
        self.status = "failed"
        if isinstance(exc, KfoptError):
            self.error, self.fix, self.user_error = exc.message, exc.fix, True
        else:
            text = str(exc).strip()
            self.error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> StepStatus:
        return cls.model_validate(read_json(path, "step status"))


@contextmanager
def step_status(step: str, path: str | os.PathLike) -> Iterator[StepStatus]:
    """Run the block as pipeline step ``step``; write its :class:`StepStatus` to ``path``, also when it raises.

    The exception is re-raised, so the KFP task still fails (and is retried
    where the pipeline says so); the status file says why in a form a program reads.
    In a KFP step's own process, a step that succeeded ends without the interpreter's
    teardown (:func:`_skip_teardown_after_success`).
    """
    status = StepStatus(step=step)
    started = time.perf_counter()
    succeeded = _skip_teardown_after_success() if _in_kfp_step_process() else None
    try:
        yield status
    except BaseException as exc:
        status.record_error(exc)
        raise
    finally:
        status.seconds = round(time.perf_counter() - started, 2)
        status.save(path)
    if succeeded is not None:
        succeeded.set()


def _in_kfp_step_process() -> bool:
    """True in the process KFP starts for one step (``python -m kfp.dsl.executor_main``), never in a test or CLI."""
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", None) == "kfp.dsl.executor_main"


def _skip_teardown_after_success() -> threading.Event:
    """Let a step's process exit right after its last exit handler, without the interpreter's teardown.

    With TensorFlow loaded, tearing the interpreter down (freeing every module
    and TensorFlow's C++ state) takes seconds, measured at 2-10 s per step on
    2 cores: more than a post-training recipe, for every step of a run. Nothing
    in it matters once KFP's executor has written the step's outputs, so the
    handler registered here, at the start of the step and therefore run after
    every exit handler registered later (MLflow's, logging's, TensorFlow's),
    ends the process with ``os._exit``: status 0 when the step's body succeeded
    and nothing raised afterwards (KFP writing the outputs), else 1. A body that
    raised (even ``SystemExit``) exits the ordinary way, with its own status.
    Returns the event the step sets when its body succeeded.
    """
    succeeded, raised = threading.Event(), threading.Event()
    hook = sys.excepthook

    def record(*exc_info):
        raised.set()
        hook(*exc_info)

    def exit_now():
        if not succeeded.is_set():
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream: nothing left to lose
                pass
        try:  # and what C code (TensorFlow, TFLite) printed through C's own buffers
            import ctypes

            ctypes.CDLL(None).fflush(None)
        except Exception:
            pass
        os._exit(1 if raised.is_set() else 0)

    sys.excepthook = record
    atexit.register(exit_now)
    return succeeded


def read_statuses(run_dir: str | os.PathLike) -> list[StepStatus]:
    """Every step status kfp.local left in a run's folder, oldest first.

    A task keeps its outputs in ``<run>/<task>/<output>``, a loop iteration in
    ``<run>/<loop>-iteration-<i>/<task>/<output>``.
    """
    found = []
    for path in Path(run_dir).rglob(STATUS_OUTPUT):
        if not path.is_file():
            continue
        try:
            found.append((path.stat().st_mtime, StepStatus.load(path)))
        except (KfoptError, ValueError):  # not a status file (a model's own file of that name)
            continue
    return [status for _, status in sorted(found, key=lambda pair: pair[0])]


# -- progress lines -----------------------------------------------------------------
def candidate_line(candidate) -> str:
    """What a step prints when a candidate is done: ``[label] ok`` / ``[label] failed: reason``."""
    return f"[{candidate.recipe}] {candidate.status}" + (f": {candidate.reason}" if candidate.reason else "")


CANDIDATE_LINE = re.compile(r"^\s*\[(?P<label>.+)\] (?P<status>ok|skipped|failed)(?:: (?P<reason>.*))?$")


def proposal_line(number: int, recipe: str, why: str) -> str:
    """What a propose step prints for each recipe it proposes: ``round 2: proposing RECIPE: why``."""
    return f"round {number}: proposing {recipe}: {why}"


def stopped_line(number: int, reason: str) -> str:
    """What a propose step prints when the search stops: ``round 2: search stopped: why``."""
    return f"round {number}: search stopped: {reason}"


ROUND_LINE = re.compile(r"^\s*(?P<line>round \d+: (?:proposing |search stopped: ).*)$")
