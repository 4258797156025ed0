"""Validated data-source configs (the recipe's ``data:`` section)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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


DataConfig = Annotated[ImageFolderData | DigitsData | NpzData, Field(discriminator="source")]
