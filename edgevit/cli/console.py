"""Consoles for the CLI's tables: whole when piped, fitted to the terminal (or ``COLUMNS``) when not.

Rich sizes a console that is not a terminal to 80 columns and cuts cells to fit (``jetson-nan…``).
A pipe or a log has no width to fit, so there every table keeps its natural width; a set
``COLUMNS`` still wins, and name columns never wrap or shorten (see ``name_column``)."""

from __future__ import annotations

import os
import sys

from rich.console import Console

WIDE = 100_000  # "no limit": rich tables only take the width their cells need


def _width(stream: object) -> int | None:
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    isatty = getattr(stream, "isatty", None)
    return None if isatty is not None and isatty() else WIDE


def stdout_console() -> Console:
    """For tables and results on stdout."""
    return Console(width=_width(sys.stdout), soft_wrap=False, highlight=False)


def stderr_console(quiet: bool = False) -> Console:
    """For progress and log lines on stderr: long lines stay one line when logged."""
    width = _width(sys.stderr)
    return Console(stderr=True, width=width, soft_wrap=width == WIDE, quiet=quiet)


def name_column(table: object, header: str, **kw: object) -> None:
    """A column whose cells the user must read or type whole (names, paths): never cut."""
    table.add_column(header, no_wrap=True, overflow="fold", min_width=len(header), **kw)  # type: ignore[attr-defined]
