"""What the benchmarks share: the real data (through edgevit.data.shared's one layout) and the
reference teacher."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's edgevit, also when run as `python bench/x.py`

from edgevit.data.shared import cache_root, dataset_dir, shared_root, teacher_path  # noqa: E402
from edgevit.data.shared import unpack as unpack_shared  # noqa: E402

SHARED = shared_root() or REPO.parent / "shared" / "data"
CACHE = cache_root()  # ~/.cache/edgevit (or $EDGEVIT_CACHE): teachers a bench trains are kept here
SKIP = (f"{SHARED} has no cifar10-jpg-all.tar.gz / vit_cifar10_teacher.json "
        "(set EDGEVIT_SHARED_DATA to the folder that has them)")


def cifar_dirs() -> tuple[Path, Path] | None:
    """CIFAR-10 train/test ImageFolder dirs, unpacked once into the cache (never the repo)."""
    if not (SHARED / "cifar10-jpg-all.tar.gz").is_file():
        return None
    root = unpack_shared("cifar10-jpg", SHARED, log=lambda m: print(m, file=sys.stderr))
    return root / "train", root / "test"


def cifar_teacher() -> dict | None:
    """The reference teacher as a recipe model source, or None when the data is absent."""
    if cifar_dirs() is None or not teacher_path("cifar10-jpg", ".json").is_file():
        return None
    c = json.loads(teacher_path("cifar10-jpg", ".json").read_text())
    return {"source": "timm", "architecture": "VisionTransformer", "kwargs": c["kwargs"],
            "checkpoint": str(teacher_path("cifar10-jpg")), "mean": c["mean"], "std": c["std"]}


def cifar_data(dirs: tuple[Path, Path], **kw) -> dict:
    return {"source": "imagefolder", "train": str(dirs[0]), "val": str(dirs[1]), "batch_size": 128,
            "eval_batch_size": 500, **kw}


def quiet_console():  # noqa: ANN201
    from rich.console import Console

    return Console(stderr=True) if sys.stderr.isatty() else Console(file=io.StringIO())


__all__ = ["REPO", "SHARED", "SKIP", "cifar_data", "cifar_dirs", "cifar_teacher", "dataset_dir", "quiet_console"]
