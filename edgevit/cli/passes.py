"""``edgevit passes``: the registered passes and their options."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from edgevit.registry import Registry


def passes() -> None:
    """List every pass (built-in and plugins) with its options and defaults."""
    reg = Registry()
    table = Table(show_lines=True)
    for col in ("pass", "from", "what it does", "options (default)"):
        table.add_column(col)
    for entry in reg.entries("passes"):
        cls = reg.get("passes", entry.name)
        opts = ", ".join(
            f"{k} ({f.get_default(call_default_factory=True)!r})" if not f.is_required() else f"{k} (required)"
            for k, f in cls.Config.model_fields.items()
        )
        table.add_row(entry.name, entry.origin, cls.summary, opts)
    Console().print(table)
