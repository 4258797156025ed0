"""``edgevit profiles``: the device profiles edgevit knows (profiles/*.yaml)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def profiles() -> None:
    """List the device profiles with their runtime and supported precisions."""
    from edgevit.profiles import PROFILES_DIR, available, load_profile

    console = Console()
    names = available()
    if not names:
        console.print(f"no device profiles (looked in {PROFILES_DIR})")
        return
    table = Table()
    for col in ("profile", "runtime", "precisions", "max opset", "memory MB", "description"):
        table.add_column(col)
    for name in names:
        p = load_profile(name)
        runtime = f"{p.runtime} {p.tensorrt}" if p.tensorrt else p.runtime
        table.add_row(p.name, runtime, ", ".join(p.precisions), str(p.max_opset), str(p.memory_mb or "—"),
                      p.description)
    console.print(table)
