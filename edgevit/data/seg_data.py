"""The recipe's ``data: {source: segmentation}``: paired image/mask folders as a TaskData.

Items are (image (3, H, W) at the model's input size, normalised with its mean/std, mask).
Training masks are cropped with their image to the input size; validation and test masks
keep their own resolution, where the metric scores them (``seg/metrics.py``). Every pair the
run uses is checked before any stage runs (``seg/data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from edgevit.data.config import SegmentationData
from edgevit.data.task_data import TaskData
from edgevit.errors import EdgeVitError
from edgevit.graph.spec import GraphSpec
from edgevit.seg.data import (
    PRESETS,
    JointTransform,
    SegmentationFolder,
    check_pair,
    collate_segmentation,
    read_image,
    read_mask,
)

DEFAULT_IGNORE = 255


@dataclass
class SegTaskData(TaskData):
    """TaskData for segmentation: the same loaders and sampling, masks as labels."""

    train_plain: Dataset | None = None  # train images unaugmented, masks at the input size (calibration)
    val_plain: Dataset | None = None  # val images, masks at the input size (batches stack)
    test: Dataset | None = None  # optional test split, masks at their own resolution

    def train_loader(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Crops and flips are drawn from (seed, epoch, index): a resumed epoch repeats them."""
        self.train.set_epoch(epoch)  # type: ignore[attr-defined]
        return super().train_loader(seed, epoch, rank, world)

    def test_loader(self, batch_size: int | None = None) -> DataLoader:
        if self.test is None:
            raise EdgeVitError("data.test: the recipe names no test split")
        return DataLoader(self.test, batch_size=batch_size or self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self.collate_fn)

    def sample_indices(self, n: int, seed: int, split: str = "val") -> list[int]:
        """``n`` indices of ``split``, a random subset fixed by seed (no per-image class to stratify by)."""
        size = len(self.val if split == "val" else self.train)
        return np.random.default_rng(seed).permutation(size)[:n].tolist()

    def sample(self, n: int, seed: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images and their masks, both at the input size, prepared like validation images."""
        ds = self.val_plain if split == "val" else self.train_plain
        assert ds is not None
        xs, ys = zip(*(ds[i] for i in self.sample_indices(n, seed, split)), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def raw(self, split: str, i: int) -> tuple[str, str]:  # type: ignore[override]
        """Pair ``i`` of ``split`` as files: (image path, mask path)."""
        img, mask = (self.val if split == "val" else self.train).pairs[i]  # type: ignore[attr-defined]
        return str(img), str(mask)

    def class_pixels(self) -> torch.Tensor:
        """Pixels per class over the training masks at their own resolution, ignore label excluded
        (class weights: ``training/task.py``)."""
        counts = torch.zeros(self.num_classes, dtype=torch.float64)
        for _, mask in self.train.pairs:  # type: ignore[attr-defined]
            m = torch.from_numpy(read_mask(mask, "data.train")).flatten()
            m = m[(m >= 0) & (m < self.num_classes)]
            counts += torch.bincount(m, minlength=self.num_classes).double()
        return counts


def _classes(cfg: SegmentationData) -> tuple[list[str], int]:
    if cfg.preset is not None:
        p = PRESETS[cfg.preset]
        return list(p.classes), p.ignore_index
    assert cfg.classes is not None
    ignore = DEFAULT_IGNORE if cfg.ignore_index is None else cfg.ignore_index
    if ignore < len(cfg.classes):
        raise EdgeVitError(f"data.ignore_index: {ignore} is one of the {len(cfg.classes)} classes "
                           f"({cfg.classes[ignore]!r}); the ignore label must be >= the class count")
    return list(cfg.classes), ignore


def _split_dir(cfg: SegmentationData, split: str) -> Path | None:
    """The split's folder: as given, else for a preset its folder in the shared cache."""
    given = getattr(cfg, split)
    if given is not None or cfg.preset is None:
        return given
    from edgevit.data.shared import dataset_dir

    path = dataset_dir(cfg.preset) / split
    if split != "test" and not path.is_dir():
        raise EdgeVitError(f"data.{split}: {path} not found; run `edgevit data unpack {cfg.preset}` or give "
                           f"data.{split}")
    return path if path.is_dir() else None


def _folder(root: Path, where: str, tf: JointTransform, classes: int, ignore: int, limit: int | None, seed: int,
            skip: bool) -> tuple[SegmentationFolder, list[tuple[str, str]]]:
    """One split, limited to a seeded subset, every pair it keeps checked (or left out with ``skip``)."""
    ds = SegmentationFolder(root, where, tf, classes, ignore, seed=seed, check=False)
    if limit is not None and limit < len(ds.pairs):
        keep = np.sort(np.random.default_rng(seed).permutation(len(ds.pairs))[:limit])
        ds.pairs = [ds.pairs[i] for i in keep]
    good, bad = [], []
    for img, mask in ds.pairs:
        try:
            check_pair(img, mask, classes, ignore, where)
            read_image(img, where)  # decoded once: a truncated file fails now, not mid-training
        except EdgeVitError as e:
            if not skip:
                raise
            bad.append((str(img), str(e).removeprefix(f"{where}: ")))
            continue
        good.append((img, mask))
    if not good:
        raise EdgeVitError(f"{where}: no usable image/mask pairs in {root}")
    ds.pairs = good
    return ds, bad


def _view(ds: SegmentationFolder, tf: JointTransform) -> SegmentationFolder:
    """The same (checked) pairs under another transform."""
    out = SegmentationFolder.__new__(SegmentationFolder)
    out.__dict__.update(ds.__dict__, transform=tf)
    return out


def build_segmentation_data(cfg: SegmentationData, spec: GraphSpec, seed: int,
                            check_classes: bool = True) -> SegTaskData:
    """Check the model fits the data (a segmenter, of as many classes unless ``check_classes`` is
    off because an adapt pass resets the head), then load and check every pair."""
    names, ignore = _classes(cfg)
    if spec.task != "segmentation":
        raise EdgeVitError(f"data.source: segmentation needs a segmentation model (per-pixel logits); the model "
                           f"is a {spec.task} model")
    if check_classes and spec.num_classes != len(names):
        what = f"preset {cfg.preset}" if cfg.preset else "data.classes"
        raise EdgeVitError(f"data: {what} has {len(names)} classes but the model outputs {spec.num_classes}; "
                           "give a model with as many classes or fix the class list")
    size, mean, std = tuple(spec.img_size), tuple(spec.mean), tuple(spec.std)
    train_tf = JointTransform(size, mean, std, train=True, scale=cfg.augment.scale, flip=cfg.augment.flip)
    eval_tf = JointTransform(size, mean, std, train=False)
    plain_tf = JointTransform(size, mean, std, train=False, mask_at_size=True)
    skip = cfg.bad_images == "skip"
    n = len(names)
    roots = {s: _split_dir(cfg, s) for s in ("train", "val", "test")}
    train, bad_train = _folder(roots["train"], "data.train", train_tf, n, ignore, cfg.limit_train, seed, skip)  # type: ignore[arg-type]
    val, bad_val = _folder(roots["val"], "data.val", eval_tf, n, ignore, cfg.limit_val, seed + 1, skip)  # type: ignore[arg-type]
    test, bad_test = (_folder(roots["test"], "data.test", eval_tf, n, ignore, None, seed + 2, skip)
                      if roots["test"] is not None else (None, []))
    return SegTaskData(train, val, n, names, cfg.batch_size, cfg.eval_batch_size, cfg.num_workers,
                       train_plain=_view(train, plain_tf), prep={"img_size": size, "mean": mean, "std": std},
                       skipped=bad_train + bad_val + bad_test, task="segmentation", ignore_index=ignore,
                       collate_fn=collate_segmentation, val_plain=_view(val, plain_tf), test=test)
