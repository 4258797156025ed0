"""Datasets ready for a ViT: resized to the model's input, normalised with its mean/std."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

if TYPE_CHECKING:
    from PIL import Image

from edgevit.data.config import DigitsData, ImageFolderData, NpzData, SegmentationData
from edgevit.errors import EdgeVitError
from edgevit.graph.spec import GraphSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _transform(spec: GraphSpec, augment: str, train: bool):  # noqa: ANN202 - torchvision type
    from torchvision.transforms import v2

    size = list(spec.img_size)
    steps: list = [v2.ToImage(), v2.Resize(size, antialias=True)]
    if train and augment in ("crop", "crop_flip"):
        steps.append(v2.RandomCrop(size, padding=max(1, size[0] // 8)))
    if train and augment == "crop_flip":
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(steps)


class ArrayDataset(Dataset):
    """uint8 NHWC images in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:  # noqa: ANN001
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


@dataclass
class TaskData:
    """A task's training and validation images, prepared for the model (not the deploy bundle,
    ``edgevit/deploy/bundle.py``)."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    batch_size: int
    eval_batch_size: int
    num_workers: int = 0
    train_plain: Dataset | None = None  # the training images without augmentation (calibration)
    prep: dict | None = None  # img_size, mean, std the images are prepared with
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): bad images left out
    task: str = "classification"  # or "segmentation" (data/seg_data.py): picks the loss and the metric
    ignore_index: int | None = None  # segmentation: the label losses and metrics skip
    collate_fn: Callable | None = None  # how a batch is stacked (None: torch's default)

    def train_loader(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Shuffled deterministically by (seed, epoch), so a resumed run sees the same order.
        With ``world`` > 1 each rank reads its own shard (``batch_size`` images per rank)."""
        drop_last = len(self.train) > self.batch_size * world
        if world > 1:
            sampler = DistributedSampler(self.train, num_replicas=world, rank=rank, shuffle=True,
                                         seed=seed * 100_003, drop_last=drop_last)
            sampler.set_epoch(epoch)
            return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler,
                              num_workers=self.num_workers, drop_last=drop_last, collate_fn=self.collate_fn)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=g,
                          num_workers=self.num_workers, drop_last=drop_last, collate_fn=self.collate_fn)

    def val_loader(self, batch_size: int | None = None, rank: int = 0, world: int = 1) -> DataLoader:
        """In order; with ``world`` > 1 rank r reads images r, r+world, ... (no padding, so
        summed counts are exact)."""
        ds = self.val if world == 1 else Subset(self.val, list(range(rank, len(self.val), world)))
        return DataLoader(ds, batch_size=batch_size or self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self.collate_fn)

    def sample_indices(self, n: int, seed: int, split: str = "val") -> list[int]:
        """``n`` indices of ``split``, class-stratified (round-robin over classes) and fixed by seed."""
        ds = self.val if split == "val" else self.train
        labels = np.array([_label(ds, i) for i in range(len(ds))])
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
        order: list[int] = []
        while len(order) < min(n, len(labels)):
            for idx in per_class:
                if idx and len(order) < n:
                    order.append(idx.pop())
        return order

    def sample(self, n: int, seed: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images, class-stratified and deterministic by seed (calibration, parity checks),
        prepared like validation images (no augmentation)."""
        ds = self.val if split == "val" else (self.train_plain or self.train)
        xs, ys = zip(*(ds[i] for i in self.sample_indices(n, seed, split)), strict=True)
        return torch.stack(xs), torch.tensor(ys)

    def raw(self, split: str, i: int) -> tuple[str | np.ndarray, int]:
        """Image ``i`` of ``split`` as its source has it: a file path, or a uint8 HWC array."""
        return _raw(self.val if split == "val" else self.train, i)


def _raw(ds: Dataset, i: int) -> tuple[str | np.ndarray, int]:
    if isinstance(ds, Subset):
        return _raw(ds.dataset, ds.indices[i])
    if isinstance(ds, ArrayDataset):
        return ds.images[i].permute(1, 2, 0).numpy(), int(ds.labels[i])
    path, label = ds.samples[i]  # torchvision ImageFolder
    return path, int(label)


def _label(ds: Dataset, i: int) -> int:
    if isinstance(ds, Subset):
        return _label(ds.dataset, ds.indices[i])
    if isinstance(ds, ArrayDataset):
        return int(ds.labels[i])
    return int(ds.targets[i])  # torchvision ImageFolder


def _with_transform(ds: Dataset, transform) -> Dataset:  # noqa: ANN001
    """The same images under another transform (a shallow copy; the file list is shared)."""
    if isinstance(ds, Subset):
        return Subset(_with_transform(ds.dataset, transform), ds.indices)
    out = copy.copy(ds)
    out.transform = transform  # type: ignore[attr-defined]
    return out


def _limit(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A random (seeded) subset: an ImageFolder lists images class by class, so "the first N"
    would drop whole classes."""
    if n is None or n >= len(ds):
        return ds
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return Subset(ds, keep.tolist())


def _check_channels(mode: str, where: str, path: object, to_rgb: bool) -> None:
    if mode != "RGB" and not to_rgb:
        raise EdgeVitError(
            f"{where}: {path} is a {mode} image, not 3-channel RGB; convert the images to RGB "
            f"or set {where.split('.')[0]}.to_rgb: true"
        )


def _classes(root: Path, where: str) -> list[str]:
    """Class folder names; a class folder that is a broken symlink is an error, not a class dropped."""
    if not root.is_dir():
        raise EdgeVitError(f"{where}: directory not found: {root}")
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise EdgeVitError(f"{where}: cannot read directory {root}: {e.strerror or e}") from e
    for d in entries:
        if d.is_symlink() and not d.exists():
            raise EdgeVitError(f"{where}: class folder {d} is a broken symlink (to {os.readlink(d)}); "
                               "fix or remove it")
    classes = [d.name for d in entries if d.is_dir()]
    if not classes:
        raise EdgeVitError(f"{where}: no class folders in {root}; expected ImageFolder layout root/<class>/<image>")
    return classes


def open_image(path: str, where: str, to_rgb: bool) -> Image.Image:
    """One image as RGB, or an EdgeVitError naming it (see :func:`decode_image`)."""
    return decode_image(path, where, to_rgb).convert("RGB")


def decode_image(path: str, where: str, to_rgb: bool) -> Image.Image:
    """Open and decode one image, or raise an EdgeVitError naming it (corrupt, truncated, a
    decompression bomb, or not RGB without ``to_rgb``)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise EdgeVitError(f"{where}: {path} is too large to decode safely ({str(e).split(' pixels')[0]} pixels); "
                           "resize or remove it") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for damaged files
        raise EdgeVitError(f"{where}: cannot read image {path}: {e}") from e
    _check_channels(img.mode, where, path, to_rgb)
    return img


def _image_folder(root: Path, where: str, transform, to_rgb: bool):  # noqa: ANN001, ANN202
    from torchvision.datasets import ImageFolder

    _classes(root, where)
    try:
        ds = ImageFolder(str(root), transform=transform, loader=lambda p: open_image(p, where, to_rgb),
                         is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    except FileNotFoundError as e:
        raise EdgeVitError(f"{where}: no images found in {root} (extensions {', '.join(IMAGE_EXTENSIONS)})") from e
    except OSError as e:
        raise EdgeVitError(f"{where}: cannot read {root}: {e.strerror or e}") from e
    return ds


def _check_images(ds: Dataset, where: str, to_rgb: bool, skip: bool) -> tuple[Dataset, list[tuple[str, str]]]:
    """Open every image the run will use, before any stage runs: a bad one fails now (one line
    naming it), or with ``skip`` is left out and listed."""
    base, indices = (ds.dataset, list(ds.indices)) if isinstance(ds, Subset) else (ds, list(range(len(ds))))
    keep: list[int] = []
    bad: list[tuple[str, str]] = []
    for i in indices:
        path = base.samples[i][0]
        try:
            decode_image(path, where, to_rgb).close()
        except EdgeVitError as e:
            if not skip:
                raise
            bad.append((path, str(e).removeprefix(f"{where}: ")))
            continue
        keep.append(i)
    if not bad:
        return ds, []
    return Subset(base, keep), bad


def _check_array(x: np.ndarray, where: str, to_rgb: bool) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise EdgeVitError(f"{where}: expected uint8 images shaped N,H,W,C; got {x.dtype} {x.shape}")
    if x.shape[-1] != 3:
        if x.shape[-1] == 1 and to_rgb:
            return np.repeat(x, 3, axis=-1)
        _check_channels(f"{x.shape[-1]}-channel", where, "the array", to_rgb)
    return x


def build_data(cfg: ImageFolderData | DigitsData | NpzData | SegmentationData, spec: GraphSpec,
               seed: int, check_classes: bool = True) -> TaskData:
    """Load and check the data set before any stage runs; image size and normalisation come
    from the model so the data always fits it. ``check_classes=False``: a segmentation model
    may have another class count (an ``adapt`` pass first gives it a new head)."""
    if spec.in_chans != 3:
        raise EdgeVitError(f"model: expects {spec.in_chans} input channels; edgevit data sources give RGB")
    if isinstance(cfg, SegmentationData):
        from edgevit.data.seg_data import build_segmentation_data

        return build_segmentation_data(cfg, spec, seed, check_classes)
    if spec.task != "classification":
        raise EdgeVitError(f"data.source: {cfg.source} gives one label per image, but the model is a {spec.task} "
                           "model; use data.source: segmentation (image and mask folders)")
    train_tf, val_tf = _transform(spec, cfg.augment, True), _transform(spec, cfg.augment, False)
    if isinstance(cfg, ImageFolderData):
        train = _image_folder(cfg.train, "data.train", train_tf, cfg.to_rgb)
        val = _image_folder(cfg.val, "data.val", val_tf, cfg.to_rgb)
        if train.classes != val.classes:
            raise EdgeVitError(
                f"data: train classes {train.classes[:5]}... differ from val classes {val.classes[:5]}..."
            )
        names = list(train.classes)
        skip = cfg.bad_images == "skip"
        train, bad_train = _check_images(_limit(train, cfg.limit_train, seed), "data.train", cfg.to_rgb, skip)
        val, bad_val = _check_images(_limit(val, cfg.limit_val, seed + 1), "data.val", cfg.to_rgb, skip)
        skipped = bad_train + bad_val
    elif isinstance(cfg, DigitsData):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = np.repeat((d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
        xt, xv, yt, yv = train_test_split(x, d.target, test_size=cfg.val_fraction, random_state=seed, stratify=d.target)
        train, val = ArrayDataset(xt, yt, train_tf), ArrayDataset(xv, yv, val_tf)
        names = [str(i) for i in range(10)]
    else:
        if not cfg.path.is_file():
            raise EdgeVitError(f"data.path: file not found: {cfg.path}")
        try:
            arrays = np.load(cfg.path, allow_pickle=False)
            xt, yt, xv, yv = (arrays[k] for k in ("x_train", "y_train", "x_val", "y_val"))
        except KeyError as e:
            raise EdgeVitError(f"data.path: {cfg.path} lacks array {e}; expected x_train, y_train, x_val, y_val") from e
        except (OSError, ValueError) as e:
            raise EdgeVitError(f"data.path: cannot read {cfg.path}: {e}") from e
        xt, xv = _check_array(xt, "data.path", cfg.to_rgb), _check_array(xv, "data.path", cfg.to_rgb)
        train, val = ArrayDataset(xt, yt, train_tf), ArrayDataset(xv, yv, val_tf)
        names = [str(i) for i in range(int(max(yt.max(), yv.max())) + 1)]
    if not isinstance(cfg, ImageFolderData):
        train, val, skipped = _limit(train, cfg.limit_train, seed), _limit(val, cfg.limit_val, seed + 1), []
    if len(train) == 0 or len(val) == 0:
        raise EdgeVitError("data: the training or validation set is empty")
    return TaskData(train, val, len(names), names, cfg.batch_size, cfg.eval_batch_size, cfg.num_workers,
                    train_plain=_with_transform(train, val_tf),
                    prep={"img_size": tuple(spec.img_size), "mean": spec.mean, "std": spec.std}, skipped=skipped)
