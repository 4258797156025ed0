"""Accuracy-aware INT8: which quantized layers hurt most, and how many to keep in float.

Each candidate node is quantized alone and scored by the relative error it causes in the
logits on the calibration images; then the worst nodes are kept in float, one more at a
time, until the task's score (top-1, or a segmenter's mIoU) on held-out images is within the
budget of the float model's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgevit.onnx_io import run_batches, session
from edgevit.quantize.int8 import quantize_int8


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    return run_batches(session(path), images.astype(np.float32))


def node_sensitivity(pre: Path, work: Path, nodes: list[str], calib: np.ndarray, qargs: dict,
                     on_node: Callable[[], None] | None = None) -> dict[str, float]:
    ref = logits(pre, calib)
    scale = float(np.mean(ref**2)) or 1.0
    out = {}
    for name in nodes:
        one = work / "one-node.onnx"
        quantize_int8(pre, one, nodes_to_quantize=[name], **qargs)
        out[name] = float(np.mean((logits(one, calib) - ref) ** 2)) / scale
        one.unlink()
        if on_node is not None:
            on_node()
    return out


def keep_in_float(pre: Path, dst: Path, score: Callable[[Path], float], fp32: float, ranked: list[str],
                  budget: float, qargs: dict, exclude: list[str]) -> tuple[list[str], float]:
    """Quantize into ``dst`` keeping the fewest of ``ranked`` (worst first) in float so that
    ``score(dst)`` (the task's metric: top-1, or mIoU for a segmenter) stays within ``budget``
    points of the float model's ``fp32``; returns (kept, the quantized score)."""
    got = fp32
    for k in range(len(ranked) + 1):
        kept = ranked[:k]
        quantize_int8(pre, dst, nodes_to_exclude=exclude + kept, **qargs)
        got = score(dst)
        if fp32 - got <= budget:
            return kept, got
    return ranked, got


def top1_score(images: np.ndarray, labels: np.ndarray) -> Callable[[Path], float]:
    """Top-1 (0-100) of an ONNX file on ``images``: the classification score for :func:`keep_in_float`."""
    return lambda path: 100.0 * float((logits(path, images).argmax(1) == labels).mean())
