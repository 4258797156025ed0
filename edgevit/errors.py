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
