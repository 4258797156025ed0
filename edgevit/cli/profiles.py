"""``edgevit profiles``: the device profiles edgevit knows (profiles/*.yaml)."""

from __future__ import annotations

import typer
from rich.table import Table

from edgevit.cli.console import name_column, stdout_console

app = typer.Typer(help="Device profiles: list them, or show one with the source of every fact.",
                  invoke_without_command=True)


@app.callback()
def _default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        profiles()


@app.command("show")
def show(name: str = typer.Argument(..., help="a profile name (edgevit profiles) or a YAML path")) -> None:
    """Every fact of one profile with its source."""
    from edgevit.profiles import load_profile

    p = load_profile(name)
    table = Table(title=f"{p.name}: {p.description}", title_justify="left")
    name_column(table, "fact")
    table.add_column("value")
    table.add_column("source", overflow="fold")
    for key, value in p.model_dump().items():
        if key in ("name", "description", "sources", "caveats") or value in (None, {}, []):
            continue
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else (
            ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        table.add_row(key, shown, p.sources.get(key, "—"))
    console = stdout_console()
    console.print(table)
    for c in p.caveats:
        console.print(f"- {c}")


def profiles() -> None:
    """List the device profiles with their runtime and supported precisions."""
    from edgevit.profiles import PROFILES_DIR, available, load_profile

    console = stdout_console()
    names = available()
    if not names:
        console.print(f"no device profiles (looked in {PROFILES_DIR})")
        return
    table = Table()
    name_column(table, "profile")
    for col in ("runtime", "precisions", "max opset", "memory MB", "description"):
        table.add_column(col)
    for name in names:
        p = load_profile(name)
        runtime = f"{p.runtime} {p.tensorrt}" if p.tensorrt else p.runtime
        table.add_row(p.name, runtime, ", ".join(p.precisions), str(p.max_opset), str(p.memory_mb or "—"),
                      p.description)
    console.print(table)
