"""``edgevit compress [RECIPE]``: run a recipe's passes and print the report."""

from __future__ import annotations

from pathlib import Path

import typer

from edgevit.cli.console import stderr_console
from edgevit.cli.report import print_report
from edgevit.registry import Registry


def compress(
    recipe: Path | None = typer.Argument(None, help="recipe YAML; omitted: the embedded demo (digits)"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>)"),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help="override a recipe key, e.g. passes.adapt.epochs=3"),
    no_resume: bool = typer.Option(False, "--no-resume", help="re-run every stage even if unchanged"),
    threads: int | None = typer.Option(None, "--threads", min=1, metavar="N",
                                       help="CPU threads for torch and ONNX Runtime (default: the recipe's "
                                       "threads, else one per idle core)"),
    no_rerun: bool = typer.Option(False, "--no-rerun", help="stop with an error, instead of re-running from it, "
                                  "when a finished stage's files no longer match their recorded sha256"),
) -> None:
    """Run RECIPE's passes on its model; writes runs/<name>/ and prints a table per stage.

    Started under torchrun, training passes run data-parallel on every process; rank 0 alone
    writes the run directory (which must be on a file system every node sees)."""
    from edgevit.pipeline import Pipeline
    from edgevit.recipe import load_recipe  # imports torch: only once a recipe is run
    from edgevit.threads import apply_threads, choose_threads
    from edgevit.training import distributed

    registry = Registry()
    rec, steps = load_recipe(recipe, overrides, registry)
    env = distributed.init(rec.device)
    console = stderr_console(quiet=not env.is_main)  # a logged line stays one line
    apply_threads(choose_threads(threads or rec.threads))  # the pipeline's first line says how many
    run_dir = out or Path("runs") / rec.name
    try:
        report = Pipeline(rec, steps, run_dir, registry, console, resume=not no_resume, rerun_changed=not no_rerun,
                          recipe_path=recipe).run()
    finally:
        distributed.shutdown()
    if not env.is_main:
        return
    print_report(report, run_dir)
