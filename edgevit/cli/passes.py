"""``edgevit passes``: the registered passes and their options.

A pass's options live on its ``Config``, and the pass modules import torch, so listing them
live costs seconds. The built-ins' listing is therefore cached under the edgevit cache,
keyed by a hash of edgevit's own source files: any change to the code makes a new key, so
the cache can never show options the installed code does not have. Plugins are always
listed live (their code is not in the hash)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from enum import Enum
from pathlib import Path
from typing import Any

from rich.table import Table

from edgevit.cli.console import name_column, stdout_console
from edgevit.registry import Registry

PACKAGE = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEVIT_CACHE", Path.home() / ".cache" / "edgevit"))


def source_key() -> str:
    """Hash of every edgevit source file plus the pydantic and Python versions."""
    import pydantic

    h = hashlib.sha256(f"{pydantic.VERSION} {platform.python_version()}".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(path.relative_to(PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def shown_default(value: Any) -> str:
    """A default as a user would write it in a recipe (not a Python repr)."""
    if hasattr(value, "model_dump"):  # a nested config, e.g. the tuner
        value = value.model_dump(mode="json", exclude_defaults=True) or value.model_dump(mode="json")
        if isinstance(value, dict) and set(value) == {"name"}:
            return str(value["name"])
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        return str(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def live_rows(reg: Registry, origins: set[str] | None = None) -> list[list[str]]:
    """[name, origin, summary, options] of every pass, by importing each pass class."""
    rows = []
    for entry in reg.entries("passes"):
        if origins is not None and (entry.origin == "edgevit") != ("edgevit" in origins):
            continue
        cls = reg.get("passes", entry.name)
        opts = ", ".join(
            f"{k} ({shown_default(f.get_default(call_default_factory=True))})" if not f.is_required()
            else f"{k} (required)" for k, f in cls.Config.model_fields.items())
        rows.append([entry.name, entry.origin, cls.summary, opts])
    return rows


def builtin_rows(reg: Registry) -> list[list[str]]:
    """The built-ins' rows, from the cache when edgevit's sources are unchanged."""
    from edgevit.fileio import read_json, write_json

    path = cache_dir() / "passes" / f"{source_key()}.json"
    if path.is_file():
        try:
            return read_json(path)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    rows = live_rows(reg, {"edgevit"})
    with contextlib.suppress(OSError):  # a read-only home only costs the speed-up
        write_json(path, rows)
    return rows


def passes() -> None:
    """List every pass (built-in and plugins) with its options and defaults."""
    reg = Registry()
    rows = builtin_rows(reg) + live_rows(reg, set()) if any(
        e.origin != "edgevit" for e in reg.entries("passes")) else builtin_rows(reg)
    table = Table(show_lines=True)
    name_column(table, "pass")
    name_column(table, "from")
    table.add_column("what it does")
    table.add_column("options (default)")
    for row in sorted(rows, key=lambda r: r[0]):
        table.add_row(*row)
    stdout_console().print(table)
