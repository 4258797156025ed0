"""The task's training loss and validation metric, one place each.

Classification: cross-entropy with label smoothing, scored by top-1. Segmentation: per-pixel
cross-entropy with the ignore label, optional class weights and OHEM, scored by mIoU (plus
pixel accuracy and per-class IoU) at each mask's own resolution (``seg/metrics.py``). The
training loop, adapt, distill and Taylor pruning all take their loss and metric from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.seg.losses import ohem_cross_entropy
from edgevit.seg.metrics import SegMeter, SegScores, upsample_logits

if TYPE_CHECKING:
    from edgevit.data import TaskData

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class OhemConfig(BaseModel):
    """Online hard example mining (Youn et al.'s seed code): only pixels whose true-class
    probability is below ``thresh`` count, at least the ``min_kept`` hardest."""

    model_config = ConfigDict(extra="forbid")
    thresh: float = Field(0.7, gt=0, le=1)
    min_kept: int = Field(100_000, ge=1, description="pixels kept per batch at least")


class SegLossConfig(BaseModel):
    """Segmentation loss options (ignored by classification; an error if set there)."""

    model_config = ConfigDict(extra="forbid")
    class_weights: list[float] | Literal["median_frequency"] | None = Field(
        None, description="per-class cross-entropy weights: a list (one per class), or median_frequency: "
        "sqrt(median(freq) / freq) from the training masks (softened SegNet balancing)")
    ohem: OhemConfig | None = Field(None, description="keep only hard pixels: {thresh, min_kept}")


def median_frequency_weights(pixels: torch.Tensor) -> torch.Tensor:
    """sqrt(median(freq) / freq), as the shared CamVid teacher was trained; a class absent from the
    training masks gets weight 0 (nothing to learn from, no division by zero)."""
    freq = pixels.double()
    present = freq > 0
    med = freq[present].median() if present.any() else torch.tensor(1.0, dtype=torch.float64)
    w = torch.where(present, (med / freq.clamp(min=1)).sqrt(), torch.zeros_like(freq))
    return w.float()


def check_seg_loss(cfg: SegLossConfig, data: TaskData, where: str) -> None:
    """Options that cannot fit this data: an error before any stage runs."""
    if data.task != "segmentation":
        if cfg.class_weights is not None or cfg.ohem is not None:
            raise EdgeVitError(f"{where}: class_weights and ohem are segmentation loss options; the data is "
                               f"{data.task}")
        return
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != data.num_classes:
            raise EdgeVitError(f"{where}.class_weights: {len(cfg.class_weights)} weights for {data.num_classes} "
                               "classes; give one per class")
        if any(w < 0 for w in cfg.class_weights):
            raise EdgeVitError(f"{where}.class_weights: weights must be >= 0")


def task_loss(data: TaskData, label_smoothing: float = 0.0, seg: SegLossConfig | None = None,
              where: str = "loss") -> LossFn:
    """``loss(logits, target)`` for the data's task. Segmentation logits at any resolution are
    upsampled to the target's (training masks are at the input size)."""
    if data.task != "segmentation":
        if seg is not None:
            check_seg_loss(seg, data, where)
        ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        return lambda logits, target: ce(logits, target)
    seg = seg or SegLossConfig()
    check_seg_loss(seg, data, where)
    ignore = data.ignore_index if data.ignore_index is not None else -100
    weight = None
    if seg.class_weights == "median_frequency":
        weight = median_frequency_weights(data.class_pixels())  # type: ignore[attr-defined]
    elif isinstance(seg.class_weights, list):
        weight = torch.tensor(seg.class_weights, dtype=torch.float32)
    return PixelLoss(ignore, weight, seg.ohem)


class PixelLoss:
    """Per-pixel cross-entropy: the ignore label skipped, optional class weights and OHEM."""

    def __init__(self, ignore_index: int, weight: torch.Tensor | None, ohem: OhemConfig | None) -> None:
        self.ignore_index, self.weight, self.ohem = ignore_index, weight, ohem

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(logits.float(), tuple(target.shape[-2:]))
        w = None if self.weight is None else self.weight.to(logits.device)
        if self.ohem is not None:
            return ohem_cross_entropy(logits, target, self.ignore_index, self.ohem.thresh, self.ohem.min_kept, w)
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=w, ignore_index=self.ignore_index)


class TaskObjective:
    """The training loop's Objective for plain task training (adapt): the task loss alone."""

    def __init__(self, loss: LossFn) -> None:
        self.loss = loss

    def modules(self) -> list[nn.Module]:
        return []

    def __call__(self, model: nn.Module, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss(model(images), labels)
        return loss, {"ce": float(loss.detach())}


def metric_name(task: str) -> str:
    """The headline validation metric's key: ``top1`` or ``miou`` (stage metrics say ``val_<name>``)."""
    return "miou" if task == "segmentation" else "top1"


@torch.no_grad()
def task_counts(model: nn.Module, loader, task: str, num_classes: int,  # noqa: ANN001
                ignore_index: int | None, device: torch.device) -> list[float]:
    """What the metric is computed from, as numbers that add up over shards (distributed
    evaluation sums them): [correct, total] for top-1, the flattened confusion matrix for mIoU."""
    was = model.training
    model.eval()
    try:
        if task == "segmentation":
            meter = SegMeter(num_classes, ignore_index)
            for images, masks in loader:
                meter.update(model(images.to(device)), masks)
            return meter.cm.flatten().double().tolist()
        correct = total = 0
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(-1).cpu() == labels).sum())
            total += len(labels)
        return [float(correct), float(total)]
    finally:
        model.train(was)


def task_scores(counts: list[float], task: str, class_names: list[str] | None = None) -> dict:
    """The metrics dict from :func:`task_counts`: ``{"top1"}`` or ``{"miou", "pixel_accuracy", "iou"}``."""
    if task == "segmentation":
        n = round(len(counts) ** 0.5)
        cm = torch.tensor(counts, dtype=torch.float64).reshape(n, n)
        return SegScores.from_confusion(cm).as_dict(class_names)
    correct, total = counts
    return {"top1": 100.0 * correct / max(total, 1)}


def task_metric(model: nn.Module, loader, task: str, num_classes: int = 0,  # noqa: ANN001
                ignore_index: int | None = None, device: torch.device | str = "cpu",
                class_names: list[str] | None = None) -> dict:
    """The task's validation metrics of ``model`` on ``loader`` (one process)."""
    dev = torch.device(device)
    return task_scores(task_counts(model, loader, task, num_classes, ignore_index, dev), task, class_names)
