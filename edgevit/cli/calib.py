"""``edgevit calib``: build and check calibration manifests."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Calibration sets as manifests (paths + sha256), shared by host and Jetson.",
                  no_args_is_help=True)


@app.command("build")
def build(
    recipe: Path | None = typer.Argument(None, help="recipe whose data: section to draw from (default: the demo)"),
    out: Path = typer.Option(..., "--out", help="manifest to write, e.g. calibration/cifar10-512.json"),
    num: int | None = typer.Option(None, "--num", help="images (default: the recipe's calibration.num_samples)"),
    split: str | None = typer.Option(None, "--split", help="train or val (default: the recipe's)"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key"),
) -> None:
    """Choose class-stratified images by the recipe's seed and write their manifest."""
    from edgevit.calib import build_manifest
    from edgevit.data import build_data
    from edgevit.errors import EdgeVitError
    from edgevit.models.sources import load_model
    from edgevit.recipe import load_recipe
    from edgevit.registry import Registry

    registry = Registry()
    rec, _ = load_recipe(recipe, overrides, registry)
    split = split or rec.calibration.split
    if split not in ("train", "val"):
        raise EdgeVitError(f"--split: expected train or val, got {split!r}")
    data = build_data(rec.data, load_model(rec.model, registry).spec, rec.seed)
    m = build_manifest(data, num or rec.calibration.num_samples, rec.seed, split, out)
    Console().print(f"wrote {out}: {len(m.images)} images of the {split} split, "
                    f"{len(set(i.label for i in m.images))} classes, seed {rec.seed}")


@app.command("check")
def check(manifest: Path = typer.Argument(..., help="a manifest written by `edgevit calib build`")) -> None:
    """Verify that every image a manifest lists is present and unchanged."""
    from edgevit.calib.manifest import verify

    m = verify(manifest, where=str(manifest))
    Console().print(f"{manifest}: {len(m.images)} images, all present and unchanged")
