"""Progress bars for long work (training epochs, latency runs), on stderr."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Shows a bar per task on an interactive terminal; stays silent otherwise."""

    def __init__(self, enabled: bool | None = None, quiet: bool = False):
        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        #: No status lines either (the Python API's ``progress=False``); bars follow ``enabled``.
        self.quiet = quiet

    @contextmanager
    def task(self, description: str, total: int):
        """Context manager yielding ``advance(n=1, **fields)``."""
        if not self.enabled:
            yield lambda n=1, **fields: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as bar:
            task_id = bar.add_task(description, total=total, status="")

            def advance(n: int = 1, **fields):
                status = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                bar.update(task_id, advance=n, status=status)

            yield advance

    def say(self, message: str) -> None:
        """A line of status for the user (stderr, so --json output stays clean)."""
        if not self.quiet:
            print(message, file=sys.stderr)


def keras_callback(reporter: Reporter | None, description: str, epochs: int):
    """A tf_keras callback that advances a progress bar once per epoch."""
    from . import _tf

    keras = _tf.keras()
    reporter = reporter or Reporter(enabled=False)

    class _EpochBar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self._cm = reporter.task(description, epochs)
            self._advance = self._cm.__enter__()

        def on_epoch_end(self, epoch, logs=None):
            shown = {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "accuracy", "val_accuracy")}
            self._advance(1, **shown)

        def on_train_end(self, logs=None):
            self._cm.__exit__(None, None, None)

    return _EpochBar()
