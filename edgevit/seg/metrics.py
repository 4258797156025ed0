"""mIoU, pixel accuracy and per-class IoU from one confusion matrix.

mIoU is the mean over classes of intersection / union, the ignore label excluded; a class
that appears neither in the truth nor in the prediction of the whole evaluated set has no
IoU and is left out of the mean (mmsegmentation's convention). On a benchmark split where
every class occurs (CamVid's test split) this equals the plain mean over all classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class; ignored pixels dropped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and mask {tuple(target.shape)} differ in shape")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    t, p = t[keep], p[keep].clamp(0, num_classes - 1)
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegScores:
    """Scores of a confusion matrix; percentages in 0-100."""

    miou: float
    pixel_accuracy: float
    iou: list[float | None]  # per class; None where the class never occurs (truth or prediction)

    @classmethod
    def from_confusion(cls, cm: torch.Tensor) -> SegScores:
        cm = cm.double()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        present = union > 0
        iou = torch.where(present, inter / union.clamp(min=1), torch.zeros_like(inter))
        total = cm.sum()
        return cls(
            miou=float(iou[present].mean() * 100) if present.any() else 0.0,
            pixel_accuracy=float(inter.sum() / total * 100) if total > 0 else 0.0,
            iou=[float(v * 100) if ok else None for v, ok in zip(iou, present, strict=True)],
        )

    def as_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.iou))]
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
                "iou": dict(zip(names, self.iou, strict=True))}


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at a mask's resolution (bilinear, align_corners=False, as the decoders upsample)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def labels_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) predicted classes of one frame's (C, h, w) logits at a mask's resolution: what the
    metric scores, and what an overlay draws."""
    return upsample_logits(logits[None].float(), size)[0].argmax(0)


class SegMeter:
    """Accumulates a confusion matrix over batches; each mask may have its own size."""

    def __init__(self, num_classes: int, ignore_index: int | None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits: torch.Tensor, masks: torch.Tensor | list[torch.Tensor]) -> None:
        """``logits`` (B, C, h, w) at any resolution; ``masks`` (B, H, W) or a list of (H_i, W_i)."""
        for lg, m in zip(logits, masks, strict=True):
            pred = labels_at(lg, tuple(m.shape[-2:]))
            self.cm += confusion_matrix(pred.cpu(), m.cpu(), self.num_classes, self.ignore_index)

    def scores(self) -> SegScores:
        return SegScores.from_confusion(self.cm)


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, loader, num_classes: int,  # noqa: ANN001
                          ignore_index: int | None, device: str | torch.device = "cpu") -> SegScores:
    """Scores a model returning (B, C, h, w) logits, at each mask's own resolution."""
    was = model.training
    model.eval()
    meter = SegMeter(num_classes, ignore_index)
    try:
        for images, masks in loader:
            meter.update(model(images.to(device)), masks)
    finally:
        model.train(was)
    return meter.scores()
