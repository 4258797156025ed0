"""``edgevit data``: put the shared real data sets where recipes expect them."""

from __future__ import annotations

from pathlib import Path

import typer

from edgevit.cli.console import stdout_console

app = typer.Typer(help="The shared data sets (CIFAR-10, CamVid) and reference teachers, unpacked into "
                  "~/.cache/edgevit/<name>/.", no_args_is_help=True)


@app.command("unpack")
def unpack(
    names: list[str] = typer.Argument(None, metavar="[NAME]...", help="cifar10-jpg, camvid (default: all)"),
    shared: Path | None = typer.Option(None, "--from", metavar="DIR",
                                       help="the shared data folder (default: $EDGEVIT_SHARED_DATA, else "
                                       "../shared/data)"),
) -> None:
    """Check each archive's sha256, unpack it into the cache and copy its reference teacher beside it."""
    from edgevit.data.shared import DATASETS, teacher_path
    from edgevit.data.shared import unpack as unpack_one

    console = stdout_console()
    for name in names or list(DATASETS):
        out = unpack_one(name, shared, log=console.print)
        console.print(f"{name}: {out} (teacher: {teacher_path(name)})")
