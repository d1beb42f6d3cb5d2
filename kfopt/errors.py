"""Errors a user can fix. The CLI prints them on one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KfoptError(Exception):
    """A problem with the user's input: names the value, the valid choices and the fix."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} Fix: {self.fix}" if self.fix else self.message


class TechniqueSkipped(Exception):
    """Raised by a technique that cannot run on this host (no GPU, no TensorRT).

    The candidate is reported as ``skipped`` with this reason; it is never
    replaced by the unchanged input model.
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the nearest choice, or ""."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
