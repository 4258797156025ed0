"""The benchmark pass's segmentation side: each stage's mIoU, and the frames for the overlays.

A torch stage is scored through its module (``training/task.py``'s ``task_metric``), an ONNX
stage through ONNX Runtime (``seg/deploy.py``'s ``score_onnx``, as quantize scores its files);
both feed the same ``SegMeter`` at each mask's own resolution, so a stage's mIoU in the report
is the number validation, pruning and quantize report for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgevit.seg import overlay
from edgevit.seg.data import read_image
from edgevit.seg.deploy import onnx_logits, score_onnx
from edgevit.seg.metrics import labels_at
from edgevit.training.task import task_metric

Predict = Callable[[torch.Tensor], torch.Tensor]  # normalised images (B, 3, H, W) -> logits (B, C, h, w)


def torch_predict(module: nn.Module, device: torch.device) -> Predict:
    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        was = module.training
        module.eval()
        try:
            return module(images.to(device)).float().cpu()
        finally:
            module.train(was)

    return run


def onnx_predict(sess: Any) -> Predict:
    return lambda images: torch.from_numpy(onnx_logits(sess, images))


def rounded(scores: dict[str, Any]) -> dict[str, Any]:
    """The report's precision: two decimals, as top-1 (None stays None: a class never seen)."""
    return {"miou": round(scores["miou"], 2), "pixel_accuracy": round(scores["pixel_accuracy"], 2),
            "iou": {k: (None if v is None else round(v, 2)) for k, v in scores["iou"].items()}}


def torch_scores(module: nn.Module, loader: Any, data: Any, device: torch.device) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU of a torch stage, through its module."""
    return task_metric(module, loader, "segmentation", data.num_classes, data.ignore_index, device,
                       data.class_names)


def onnx_scores(sess: Any, loader: Any, data: Any) -> dict[str, Any]:
    """The same scores for an ONNX stage, through the one ONNX scorer (quantize's too)."""
    return score_onnx(sess, loader, data.num_classes, data.ignore_index).as_dict(data.class_names)


def frame_labels(predict: Predict, data: Any, indices: list[int]) -> list[np.ndarray]:
    """Predicted labels of validation frames ``indices``, each at its mask's resolution (the
    labels the metric scores)."""
    out = []
    for i in indices:
        image, mask = data.val[i]
        out.append(labels_at(predict(image[None])[0], tuple(mask.shape[-2:])).numpy())
    return out


def write_overlays(data: Any, indices: list[int], stages: list[tuple[str, list[np.ndarray]]],
                   out_dir: Path) -> dict[str, Any]:
    """One PNG per frame (ground truth, then each stage's prediction, side by side, at the
    mask's resolution) and a legend PNG into ``out_dir``; returns what the report needs, the
    files by name within ``out_dir`` (the benchmark stage's directory is renamed when it
    finishes, so no path is recorded)."""
    colours = overlay.palette(data.class_names)
    frames = []
    for k, i in enumerate(indices):
        image_path, _ = data.raw("val", i)
        image = read_image(Path(image_path), "data.val")
        truth = data.val[i][1].numpy()
        name = f"overlay_{k}.png"
        overlay.save_png(overlay.strip(image, [truth, *(labels[k] for _, labels in stages)], colours),
                         out_dir / name)
        frames.append({"file": name, "frame": Path(image_path).name, "size": [int(truth.shape[1]),
                                                                             int(truth.shape[0])]})
    overlay.legend(data.class_names, colours, out_dir / "overlay_legend.png")
    return {"panels": ["ground truth", *(s for s, _ in stages)], "frames": frames, "legend": "overlay_legend.png",
            "palette": [list(c) for c in colours], "alpha": overlay.ALPHA}
