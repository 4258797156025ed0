"""A calibration manifest names images (paths relative to a root, each with its sha256 and
label), chosen class-stratified and deterministic by seed. Host quantization and the
Jetson-side calibrator read the same file, so both calibrate on the same images; a changed
image is detected by its hash instead of silently shifting the scales.

Images that exist only in memory (digits, npz) are written as PNGs beside the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from edgevit.errors import EdgeVitError
from edgevit.fileio import read_json, sha256_file, write_json

FORMAT = "edgevit.calibration/1"


class ManifestImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    label: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    root: str = Field(description="image paths are relative to this (itself relative to the manifest)")
    seed: int
    split: str
    classes: list[str]
    images: list[ManifestImage]


def build_manifest(data: Any, n: int, seed: int, split: str, out: Path) -> Manifest:
    """Choose ``n`` images of ``split`` from a :class:`TaskData` and write ``out``."""
    from PIL import Image

    out = Path(out)
    picks = [data.raw(split, i) for i in data.sample_indices(n, seed, split)]
    if all(isinstance(src, str) for src, _ in picks):
        paths = [Path(src).resolve() for src, _ in picks]
        root = Path(_common_root(paths))
        rel = [p.relative_to(root).as_posix() for p in paths]
    else:  # in-memory images: store them as PNGs next to the manifest
        root = out.with_name(out.stem + "-images")
        rel = []
        for k, (src, label) in enumerate(picks):
            name = f"{label}/{k:05d}.png"
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            if isinstance(src, str):
                Image.open(src).convert("RGB").save(root / name)
            else:
                Image.fromarray(np.asarray(src, dtype=np.uint8)).save(root / name)
            rel.append(name)
    images = [ManifestImage(path=r, label=lab, sha256=sha256_file(root / r)) for r, (_, lab) in zip(rel, picks,
                                                                                                     strict=True)]
    rel_root = Path(_relpath(root, out.parent))
    m = Manifest(root=rel_root.as_posix(), seed=seed, split=split, classes=list(data.class_names), images=images)
    write_json(out, m.model_dump(mode="json"))
    return m


def _common_root(paths: list[Path]) -> str:
    import os

    return os.path.commonpath([str(p.parent) for p in paths])


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def read_manifest(path: Path, where: str = "calibration.manifest") -> tuple[Manifest, Path]:
    """The manifest and its absolute image root; one-line errors for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise EdgeVitError(f"{where}: file not found: {path}; build one with `edgevit calib build`")
    try:
        m = Manifest.model_validate(read_json(path))
    except ValueError as e:
        raise EdgeVitError(f"{where}: {path} is not a calibration manifest: {str(e).splitlines()[0]}") from e
    if m.format != FORMAT:
        raise EdgeVitError(f"{where}: {path} has format {m.format!r}, expected {FORMAT}")
    return m, (path.parent / m.root).resolve()


def verify(path: Path, where: str = "calibration.manifest") -> Manifest:
    """Every image present and unchanged (sha256), else one line naming the first bad one."""
    m, root = read_manifest(path, where)
    for img in m.images:
        p = root / img.path
        if not p.is_file():
            raise EdgeVitError(f"{where}: image {p} listed in {path} is missing")
        if sha256_file(p) != img.sha256:
            raise EdgeVitError(
                f"{where}: image {p} changed since {path} was built (sha256 differs); "
                "rebuild the manifest with `edgevit calib build` so both sides calibrate on the same images"
            )
    return m


def load_manifest_images(path: Path, img_size: tuple[int, int], mean: Any, std: Any,
                         where: str = "calibration.manifest") -> tuple[torch.Tensor, torch.Tensor]:
    """The manifest's images, verified, prepared like validation images for a model."""
    from PIL import Image
    from torchvision.transforms import v2

    m = verify(path, where)
    _, root = read_manifest(path, where)
    tf = v2.Compose([v2.ToImage(), v2.Resize(list(img_size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(list(mean), list(std))])
    xs = [tf(Image.open(root / img.path).convert("RGB")) for img in m.images]
    return torch.stack(xs), torch.tensor([img.label for img in m.images])
