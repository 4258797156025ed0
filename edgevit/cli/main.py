"""Entry point: assembles the commands and turns user errors into one line + exit code 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from edgevit import __version__
from edgevit.cli import calib, compress, inspect, passes, predict, profiles, report
from edgevit.errors import EdgeVitError

app = typer.Typer(
    name="edgevit",
    help="Compress Vision Transformers for edge devices: adapt, distill, prune, quantize, export, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("compress")(compress.compress)
app.command("inspect")(inspect.inspect)
app.command("passes")(passes.passes)
app.command("report")(report.report)
app.command("predict")(predict.predict)
app.add_typer(profiles.app, name="profiles")
app.add_typer(calib.app, name="calib")


def _version(value: bool) -> None:
    if value:
        print(f"edgevit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    pass


def main() -> None:
    try:
        app()
    except EdgeVitError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {e}", markup=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
