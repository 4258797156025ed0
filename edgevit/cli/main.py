"""Entry point: assembles the commands and turns user errors into one line + exit code 2."""

from __future__ import annotations

import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from edgevit import __version__

# Every command module imports only typer/rich at the top: torch and onnxruntime load inside the
# command that needs them, so --help, passes, profiles and argument errors answer at once.
from edgevit.cli import calib, compress, data, inspect, passes, predict, profiles, report
from edgevit.errors import EdgeVitError, RunInterrupted, SignalStop

app = typer.Typer(
    name="edgevit",
    help="Compress Vision Transformers for edge devices: adapt, distill, prune, quantize, export, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
app.command("compress")(compress.compress)
app.command("inspect")(inspect.inspect)
app.command("passes")(passes.passes)
app.command("report")(report.report)
app.command("predict")(predict.predict)
app.add_typer(profiles.app, name="profiles")
app.add_typer(calib.app, name="calib")
app.add_typer(data.app, name="data")


def _version(value: bool) -> None:
    if value:
        print(f"edgevit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    pass


def _stop(signum: int, frame: object) -> None:
    raise SignalStop(signum)


def main() -> None:
    """Run the CLI: a user error is one ``error:`` line and exit 2; Ctrl-C or SIGTERM one line
    saying where the run stopped, and exit 128 + the signal."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        app()
    except EdgeVitError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", markup=True)
        sys.exit(2)
    except RunInterrupted as e:
        err.print(escape(str(e)), markup=False)
        sys.exit(e.exit_code)
    except SignalStop as e:  # outside a run (loading, reporting): nothing of a run was under way
        name = "Ctrl-C" if e.signum == signal.SIGINT else signal.Signals(e.signum).name
        err.print(f"interrupted ({name}); nothing was left half-written", markup=False)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
