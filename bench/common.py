"""What the benchmarks share: where the real data lives and the reference teacher."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEVIT_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("EDGEVIT_CACHE", Path.home() / ".cache" / "edgevit"))
SKIP = (f"{SHARED} has no cifar10-jpg-all.tar.gz / vit_cifar10_teacher.json "
        "(set EDGEVIT_SHARED_DATA to the folder that has them)")


def cifar_dirs() -> tuple[Path, Path] | None:
    """CIFAR-10 train/test ImageFolder dirs, unpacked once into the cache (never the repo)."""
    tar = SHARED / "cifar10-jpg-all.tar.gz"
    if not tar.is_file():
        return None
    root = CACHE / "cifar10-jpg"
    if not (root / ".unpacked").is_file():
        root.mkdir(parents=True, exist_ok=True)
        print(f"unpacking {tar} → {root}", file=sys.stderr)
        with tarfile.open(tar) as t:
            t.extractall(root, filter="data")
        (root / ".unpacked").write_text("ok")
    train = next(root.rglob("train"))
    return train, train.parent / "test"


def cifar_teacher() -> dict | None:
    """The reference teacher as a recipe model source, or None when the data is absent."""
    card = SHARED / "vit_cifar10_teacher.json"
    if not card.is_file():
        return None
    c = json.loads(card.read_text())
    return {"source": "timm", "architecture": "VisionTransformer", "kwargs": c["kwargs"],
            "checkpoint": str(SHARED / "vit_cifar10_teacher.safetensors"), "mean": c["mean"], "std": c["std"]}


def cifar_data(dirs: tuple[Path, Path], **kw) -> dict:
    return {"source": "imagefolder", "train": str(dirs[0]), "val": str(dirs[1]), "batch_size": 128,
            "eval_batch_size": 500, **kw}


def quiet_console():  # noqa: ANN201
    from rich.console import Console

    return Console(stderr=True) if sys.stderr.isatty() else Console(file=io.StringIO())
