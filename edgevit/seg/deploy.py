"""A segmenter's exported models judged per pixel: logit parity and mIoU of ONNX files.

Export, quantize, bundle and benchmark all judge a segmenter's ONNX files the same way, so it
lives in one place: parity is the fraction of pixels whose argmax class agrees (a top-1 over
images means nothing for (B, C, H, W) logits) plus the max and mean |logit difference|;
accuracy is mIoU from :mod:`edgevit.seg.metrics` at each mask's own resolution, every batch
through :func:`score_batch`, the number the training stages report, so a quantization drop is
in the same mIoU points.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgevit.onnx_io import run_batches, session
from edgevit.seg.metrics import SegMeter, SegScores

if TYPE_CHECKING:
    from edgevit.data import TaskData

BATCH = 8  # frames per ONNX Runtime call: full-resolution logits of many frames do not fit at once
Masks = torch.Tensor | Sequence[torch.Tensor | np.ndarray]  # (B, H, W), or one (H_i, W_i) per frame


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


def frame_batches(images: np.ndarray, masks: list[np.ndarray]) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """:func:`val_frames`' frames in batches of ``BATCH``."""
    for i in range(0, len(images), BATCH):
        yield images[i:i + BATCH], masks[i:i + BATCH]


def onnx_logits(sess: Any, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B, C, h, w) logits of normalised ``images`` from ONNX Runtime (a fixed batch size honoured)."""
    x = images.numpy() if isinstance(images, torch.Tensor) else images
    return run_batches(sess, np.ascontiguousarray(x, dtype=np.float32))


def score_batch(meter: SegMeter, sess: Any, images: np.ndarray | torch.Tensor, masks: Masks) -> np.ndarray:
    """One batch of an ONNX model into ``meter``, each mask at its own size: the single step every
    ONNX mIoU is made of. Returns the logits, for a caller that also compares them."""
    logits = onnx_logits(sess, images)
    meter.update(torch.from_numpy(logits), masks if isinstance(masks, torch.Tensor) else
                 [torch.as_tensor(m) for m in masks])
    return logits


def score_onnx(sess: Any, batches: Iterable[tuple[np.ndarray | torch.Tensor, Masks]], num_classes: int,
               ignore_index: int | None) -> SegScores:
    """mIoU, pixel accuracy and per-class IoU of an ONNX model over (images, masks) batches: a
    validation loader (benchmark) or :func:`frame_batches` (quantize)."""
    meter = SegMeter(num_classes, ignore_index)
    for images, masks in batches:
        score_batch(meter, sess, images, masks)
    return meter.scores()


def onnx_miou(path: Path, images: np.ndarray, masks: list[np.ndarray], num_classes: int,
              ignore_index: int | None) -> float:
    """mIoU (0-100) of the ONNX model at ``path`` on the frames, each mask at its own size."""
    return score_onnx(session(path), frame_batches(images, masks), num_classes, ignore_index).miou


def compare_onnx(ref_path: Path, got_path: Path, images: np.ndarray, masks: list[np.ndarray], num_classes: int,
                 ignore_index: int | None) -> dict[str, Any]:
    """mIoU of both models, the drop, and the parity of ``got`` against ``ref`` (one pass over the frames)."""
    ref_s, got_s = session(ref_path), session(got_path)
    ref_m, got_m = SegMeter(num_classes, ignore_index), SegMeter(num_classes, ignore_index)
    agree = pixels = cells = 0
    max_diff = sum_diff = 0.0
    for x, ms in frame_batches(images, masks):
        ref, got = score_batch(ref_m, ref_s, x, ms), score_batch(got_m, got_s, x, ms)
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
