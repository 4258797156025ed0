"""The one layout of the shared real data sets: ``~/.cache/edgevit/<name>/``.

The shared folder (``$EDGEVIT_SHARED_DATA``, else ``../shared/data`` beside the working
directory or the repository) holds archives and reference teachers, read-only. ``unpack``
turns them into the layout every recipe, test and benchmark reads::

    ~/.cache/edgevit/cifar10-jpg/{train,test}/<class>/*.jpg
    ~/.cache/edgevit/camvid/{train,val,test}/{images,masks}/
    ~/.cache/edgevit/teachers/vit_cifar10_teacher.{safetensors,json}   (and vit_camvid_teacher)

``$EDGEVIT_CACHE`` moves the cache root. Archives are checked against their published sha256
and unpacked into a temporary sibling that is renamed into place, so an interrupted unpack
never leaves a half-filled folder that looks finished."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevit.errors import EdgeVitError
from edgevit.fileio import sha256_file

REPO = Path(__file__).resolve().parents[2]
MARKER = ".unpacked"


@dataclass(frozen=True)
class SharedDataset:
    name: str        # the folder under the cache, and what `edgevit data unpack NAME` takes
    archive: str     # file name in the shared folder
    sha256: str      # as published in the shared folder's README
    top: str         # the archive's own top-level folder ("" when it holds train/test directly)
    teacher: str     # the reference teacher's stem in the shared folder


DATASETS = {d.name: d for d in (
    SharedDataset("cifar10-jpg", "cifar10-jpg-all.tar.gz",
                  "8c5dc6b1c372e874d06d806d804031bdaf931a1e9bb0d876b049258cc8f2088e", "", "vit_cifar10_teacher"),
    SharedDataset("camvid", "camvid-jpg.tar.gz",
                  "991cc6d4e66fb63622ff1a7627b29dea0f0e1e425ad248fb8cc57e0ef87418ac", "camvid", "vit_camvid_teacher"),
)}


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVIT_CACHE") or Path.home() / ".cache" / "edgevit").expanduser()


def shared_root() -> Path | None:
    """The shared data folder, or None when this machine has none."""
    env = os.environ.get("EDGEVIT_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    for cand in (Path.cwd().parent / "shared" / "data", REPO.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def dataset_dir(name: str) -> Path:
    """Where a data set lives once unpacked (whether or not it is there yet)."""
    return cache_root() / _dataset(name).name


def teacher_path(name: str, suffix: str = ".safetensors") -> Path:
    """The reference teacher of a data set, in the cache (``unpack`` puts it there)."""
    return cache_root() / "teachers" / f"{_dataset(name).teacher}{suffix}"


def is_unpacked(name: str) -> bool:
    return (dataset_dir(name) / MARKER).is_file() and teacher_path(name).is_file()


def _dataset(name: str) -> SharedDataset:
    if name not in DATASETS:
        raise EdgeVitError(f"data: unknown shared data set {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def unpack(name: str, shared: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Unpack one shared data set (and copy its teacher) into the cache; a no-op once done."""
    ds = _dataset(name)
    shared = shared or shared_root()
    if shared is None:
        raise EdgeVitError("data: no shared data folder found (looked for ../shared/data); set "
                           "EDGEVIT_SHARED_DATA to the folder that holds " + ds.archive)
    archive = shared / ds.archive
    if not archive.is_file():
        raise EdgeVitError(f"data: {archive} not found; set EDGEVIT_SHARED_DATA to the folder that holds "
                           f"{ds.archive}")
    out = dataset_dir(name)
    if not (out / MARKER).is_file():
        got = sha256_file(archive)
        if got != ds.sha256:
            raise EdgeVitError(f"data: {archive} has sha256 {got[:12]}…, expected {ds.sha256[:12]}…; the "
                               "archive is damaged or a different version: copy it again")
        log(f"unpacking {archive} → {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
            src = tmp / ds.top if ds.top else tmp
            (src / MARKER).write_text("ok\n")
            if out.exists():  # an older, unmarked (interrupted) copy
                shutil.rmtree(out)
            os.replace(src, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    for suffix in (".safetensors", ".json"):
        src, dst = shared / f"{ds.teacher}{suffix}", teacher_path(name, suffix)
        if src.is_file() and not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp_file = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp_file)
            os.replace(tmp_file, dst)
    return out
