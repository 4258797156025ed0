"""A segmenter's exported models judged per pixel: logit parity and mIoU of ONNX files.

Export, quantize and bundle all compare a segmenter's ONNX files the same way, so it lives in
one place: parity is the fraction of pixels whose argmax class agrees (a top-1 over images
means nothing for (B, C, H, W) logits) plus the max and mean |logit difference|; accuracy is
mIoU from :mod:`edgevit.seg.metrics` on validation frames at their masks' own resolution, the
number the training stages report, so a quantization drop is in the same mIoU points.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgevit.onnx_io import run_batches, session
from edgevit.seg.metrics import SegMeter

if TYPE_CHECKING:
    from edgevit.data import TaskData

BATCH = 8  # frames per ONNX Runtime call: full-resolution logits of many frames do not fit at once


def seg_parity(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """How far ``got`` (N, C, H, W) logits are from ``ref`` on the same images."""
    diff = np.abs(ref.astype(np.float32) - got.astype(np.float32))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "pixel_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "samples": len(ref)}


def val_frames(data: TaskData, n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` seeded validation frames: images (N, C, H, W) at the input size, prepared like every
    validation image, and their masks at their own resolution (where mIoU is scored)."""
    items = [data.val[i] for i in data.sample_indices(n, seed, "val")]
    images = np.stack([x.numpy() for x, _ in items]).astype(np.float32)
    return images, [np.asarray(m.numpy() if hasattr(m, "numpy") else m) for _, m in items]


def _logit_batches(paths: list[Path], images: np.ndarray) -> Any:
    sessions = [session(p) for p in paths]
    for i in range(0, len(images), BATCH):
        x = images[i:i + BATCH]
        yield i, [run_batches(s, x) for s in sessions]


def onnx_miou(path: Path, images: np.ndarray, masks: list[np.ndarray], num_classes: int,
              ignore_index: int | None) -> float:
    """mIoU (0-100) of the ONNX model at ``path`` on the frames, each mask at its own size."""
    meter = SegMeter(num_classes, ignore_index)
    for i, (out,) in _logit_batches([path], images):
        meter.update(torch.from_numpy(out), [torch.from_numpy(m) for m in masks[i:i + len(out)]])
    return meter.scores().miou


def compare_onnx(ref_path: Path, got_path: Path, images: np.ndarray, masks: list[np.ndarray], num_classes: int,
                 ignore_index: int | None) -> dict[str, Any]:
    """mIoU of both models, the drop, and the parity of ``got`` against ``ref`` (one pass over the frames)."""
    ref_m, got_m = SegMeter(num_classes, ignore_index), SegMeter(num_classes, ignore_index)
    agree = pixels = cells = 0
    max_diff = sum_diff = 0.0
    for i, (ref, got) in _logit_batches([ref_path, got_path], images):
        ms = [torch.from_numpy(m) for m in masks[i:i + len(ref)]]
        ref_m.update(torch.from_numpy(ref), ms)
        got_m.update(torch.from_numpy(got), ms)
        diff = np.abs(ref.astype(np.float32) - got.astype(np.float32))
        max_diff, sum_diff = max(max_diff, float(diff.max())), sum_diff + float(diff.sum())
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        pixels += ref.shape[0] * ref.shape[2] * ref.shape[3]
        cells += ref.size
    float_miou, miou = ref_m.scores().miou, got_m.scores().miou
    return {"float_miou": round(float_miou, 2), "miou": round(miou, 2), "miou_drop": round(float_miou - miou, 2),
            "pixel_agreement": agree / max(pixels, 1),
            "parity": {"max_abs_diff": max_diff, "mean_abs_diff": sum_diff / max(cells, 1),
                       "pixel_agreement": agree / max(pixels, 1), "samples": len(images)}}


def pack_masks(masks: list[np.ndarray], ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of any sizes as one array the board's numpy reads without pickle: (N, Hmax, Wmax),
    padded with the ignore label, plus each mask's (h, w). uint8 when every label fits."""
    hw = np.array([m.shape[-2:] for m in masks], dtype=np.int64).reshape(-1, 2)
    top = max([ignore_index] + [int(m.max()) for m in masks if m.size])
    dtype = np.uint8 if 0 <= top < 256 and all(int(m.min()) >= 0 for m in masks if m.size) else np.int32
    out = np.full((len(masks), int(hw[:, 0].max()), int(hw[:, 1].max())), ignore_index, dtype=dtype)
    for k, m in enumerate(masks):
        out[k, :m.shape[-2], :m.shape[-1]] = m
    return out, hw
