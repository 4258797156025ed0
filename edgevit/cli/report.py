"""``edgevit report RUN [--measured result.json]``: rebuild a run's report, optionally with
what the Jetson-side script measured on the board set beside the prediction."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgevit.cli.console import stderr_console, stdout_console
from edgevit.errors import EdgeVitError


def report(
    run: Path = typer.Argument(..., help="a run directory (runs/<recipe name>)"),
    measured: list[Path] = typer.Option([], "--measured", help="JSON written by edgevit_jetson_bench.py on the "
                                        "device; copied into RUN/measured/ and kept for later rebuilds"),
) -> None:
    """Rebuild RUN/report.md and report.json; print host figures and predicted vs measured on the device."""
    from edgevit.fileio import write_json
    from edgevit.report import read_measured
    from edgevit.rundir import RunLock

    if not (run / "manifest.json").is_file():
        raise EdgeVitError(f"report: {run} is not a run directory (no manifest.json); pass runs/<recipe name>")
    with RunLock(run):  # not while a compress is writing the run
        for path in changed_stage_files(run):
            stderr_console().print(
                f"[yellow]warning:[/yellow] {path} changed since its stage finished (sha256 mismatch): the report "
                "shows what was measured then; re-run edgevit compress with the same recipe and --out to redo it")
        for path in measured:
            if not path.is_file():
                raise EdgeVitError(f"report: measured file not found: {path}")
            data = read_measured(path)
            device = (data.get("device") or {}).get("model") or "device"
            stem = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower() or "device"
            stages = "-".join(str(s["stage"]) for s in data["stages"]) or "stages"
            write_json(run / "measured" / f"{stem}-{stages}-{path.stem}.json", data)
        rep = _build(run)
    print_report(rep, run)


def changed_stage_files(run: Path) -> list[str]:
    """Each stage file (by path) whose sha256 differs from the one recorded when its stage
    finished; a damaged manifest is an error. The report is still built (a stage missing a
    figure shows "—"), but it says which files no longer match what was measured."""
    from edgevit.rundir import changed_file, read_manifest

    changed = []
    for st in read_manifest(run / "manifest.json")["stages"]:
        if st.get("files"):  # a run from before stages recorded their sha256s has none
            rel = changed_file(run / st["dir"], st["files"])
            if rel is not None:
                changed.append(str(run / st["dir"] / rel))
    return changed


def _build(run: Path) -> dict:
    from edgevit.report import build_report

    try:
        return build_report(run)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a stage file the manifest lists is unreadable
        raise EdgeVitError(f"report: cannot rebuild the report of {run}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}; re-run edgevit compress on it") from e


def print_report(rep: dict, run: Path) -> None:
    """The host table, the device table (when a profile was set), and one line per stage note."""
    from edgevit.report import prediction_rows, stage_notes, table_rows

    console = stdout_console()  # piped or logged: no terminal to fit, so never squeeze numbers
    profile = next((s["predicted"]["profile"] for s in rep["stages"] if s.get("predicted")), "device")
    for title, rows in ((f"{rep['run']}: one row per stage (host)", table_rows(rep)),
                        (f"predicted on {profile}", prediction_rows(rep))):
        if rows is None:
            continue
        table = Table(title=title, title_justify="left")
        for h in rows[0]:
            table.add_column(h, justify="left" if h in ("stage", "verdict", "precision") else "right",
                             no_wrap=h == "stage")
        for r in rows[1]:
            table.add_row(*r)
        console.print(table)
    for s in rep["stages"]:
        for reason in (s.get("predicted") or {}).get("reasons", []):
            console.print(f"{s['stage']}: {reason}")
    for stage, note in stage_notes(rep):
        console.print(f"{stage}: {note}")
    console.print(f"report: {run / 'report.html'} (also report.md, report.json)")
