"""User-facing errors.

An :class:`EdgeVitError` is a mistake in the user's input (recipe, model, data): the CLI
prints its one-line message and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgeVitError(Exception):
    """A bad input: the message says what is wrong and what to do about it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class SignalStop(BaseException):
    """SIGINT or SIGTERM, raised by the CLI's signal handler. Not a KeyboardInterrupt, which
    typer turns into a silent exit 130 before edgevit could say where the run stopped; a
    BaseException, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class RunInterrupted(Exception):
    """A run stopped by a signal; the message says where, ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
