"""Accuracy-aware INT8: which quantized layers hurt most, and how many to keep in float.

Each candidate node is quantized alone and scored by the relative error it causes in the
logits on the calibration images; then the worst nodes are kept in float, one more at a
time, until top-1 on held-out images is within the budget of the float model's."""

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


def keep_in_float(pre: Path, dst: Path, eval_images: np.ndarray, eval_labels: np.ndarray, fp32: float,
                  ranked: list[str], budget: float, qargs: dict, exclude: list[str]) -> tuple[list[str], float]:
    """Quantize into ``dst`` keeping the fewest of ``ranked`` (worst first) in float so that
    top-1 stays within ``budget`` points of the float model's ``fp32``; returns (kept, int8 top-1)."""
    top1 = fp32
    for k in range(len(ranked) + 1):
        kept = ranked[:k]
        quantize_int8(pre, dst, nodes_to_exclude=exclude + kept, **qargs)
        top1 = 100.0 * float((logits(dst, eval_images).argmax(1) == eval_labels).mean())
        if fp32 - top1 <= budget:
            return kept, top1
    return ranked, top1
