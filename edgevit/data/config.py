"""Validated data-source configs (the recipe's ``data:`` section)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Augment = Literal["none", "crop", "crop_flip"]


class _DataBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    limit_train: int | None = Field(None, ge=1, description="use N training images, a random subset fixed by the seed")
    limit_val: int | None = Field(None, ge=1, description="use N validation images, a random subset fixed by the seed")
    num_workers: int = Field(0, ge=0)


class ImageFolderData(_DataBase):
    source: Literal["imagefolder"]
    train: Path
    val: Path
    to_rgb: bool = Field(False, description="convert grayscale/RGBA images to RGB instead of failing")
    augment: Augment = "crop_flip"
    bad_images: Literal["error", "skip"] = Field(
        "error", description="every image is opened before any stage runs; a corrupt, oversized or (without "
        "to_rgb) non-RGB image is an error, or with skip left out and listed")


class DigitsData(_DataBase):
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the library: offline),
    replicated to RGB and resized to the model's input size."""

    source: Literal["digits"]
    val_fraction: float = Field(0.2, gt=0, lt=1)
    augment: Augment = "crop"  # digits are not mirror-symmetric


class NpzData(_DataBase):
    """A .npz with uint8 NHWC images: ``x_train, y_train, x_val, y_val``."""

    source: Literal["npz"]
    path: Path
    to_rgb: bool = False
    augment: Augment = "crop_flip"


class SegAugment(BaseModel):
    """Training geometry applied to image and mask together (``seg/data.py`` JointTransform)."""

    model_config = ConfigDict(extra="forbid")
    scale: tuple[float, float] = Field((1.0, 1.5), description="random zoom-in range before the crop back to size")
    flip: bool = True

    @model_validator(mode="after")
    def _range(self) -> SegAugment:
        lo, hi = self.scale
        if not 1.0 <= lo <= hi:
            raise ValueError(f"scale {list(self.scale)}: need 1 <= low <= high (a zoom-in, then a crop to size)")
        return self


class SegmentationData(_DataBase):
    """Paired ``images/`` + ``masks/`` folders per split, matched by file name.

    ``preset: camvid`` gives the 11 CamVid classes with void (11) ignored and, when the split
    folders are not given, reads ``~/.cache/edgevit/camvid/{train,val,test}`` (``edgevit data
    unpack camvid``); otherwise give ``classes`` (and ``ignore_index``)."""

    source: Literal["segmentation"]
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None
    preset: Literal["camvid"] | None = None
    classes: list[str] | None = Field(None, min_length=1, description="class names, label i = classes[i]")
    ignore_index: int | None = Field(None, ge=0, description="label ignored in losses and metrics (default 255)")
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    augment: SegAugment = Field(default_factory=SegAugment)
    bad_images: Literal["error", "skip"] = Field(
        "error", description="every pair is checked before any stage runs; an unreadable image or mask, a mask "
        "of another size or with a label outside the classes is an error, or with skip left out and listed")

    @model_validator(mode="after")
    def _classes(self) -> SegmentationData:
        if (self.preset is None) == (self.classes is None):
            raise ValueError("give exactly one of `preset` (camvid) or `classes` (a list of class names)")
        if self.preset is not None and self.ignore_index is not None:
            raise ValueError(f"preset {self.preset} sets the ignore label; drop `ignore_index` or give `classes`")
        if self.preset is None and (self.train is None or self.val is None):
            raise ValueError("give the `train` and `val` folders (each with images/ and masks/)")
        return self


DataConfig = Annotated[ImageFolderData | DigitsData | NpzData | SegmentationData, Field(discriminator="source")]
