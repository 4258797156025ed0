"""Dense losses: OHEM cross-entropy and per-pixel logit distillation (KL or MSE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgevit.seg.metrics import upsample_logits


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, thresh: float = 0.7,
                       min_kept: int = 100_000, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the hard pixels only (as in the seed code of Youn et al.).

    Pixels whose probability of the true class is below ``thresh`` are kept; when fewer than
    ``min_kept`` are, the ``min_kept`` hardest ones are kept instead. Ignored pixels never count.
    ``logits`` are upsampled to the target's resolution first.
    """
    logits = upsample_logits(logits, tuple(target.shape[-2:]))
    pixel_loss = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none").flatten()
    valid = (target != ignore_index).flatten()
    if not valid.any():
        return logits.sum() * 0.0
    with torch.no_grad():
        prob = F.softmax(logits.detach().float(), 1)
        true = target.clone()
        true[true == ignore_index] = 0
        p_true = prob.gather(1, true[:, None]).flatten()
        p_true[~valid] = float("inf")  # never selected
        n_valid = int(valid.sum())
        k = min(max(min_kept, 1), n_valid)
        keep = valid & (p_true <= max(thresh, float(p_true.kthvalue(k).values))) if k < n_valid else valid
    return pixel_loss[keep].mean()


def _same_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit maps at the larger of the two resolutions (the student is usually coarser)."""
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    size = (max(hs, ht), max(ws, wt))
    return upsample_logits(student, size), upsample_logits(teacher, size)


def pixel_kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Structured KD (Liu et al. 2019): KL(teacher ‖ student) of temperature-softened class
    distributions at every pixel, × T², averaged over pixels (``valid`` (B, H, W) masks some out)."""
    s, t = _same_size(student, teacher.detach())
    log_s = F.log_softmax(s / temperature, 1)
    log_t = F.log_softmax(t / temperature, 1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1) * temperature**2  # (B, H, W)
    return _masked_mean(kl, valid)


def pixel_kd_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the upsampled student and teacher logits (Youn et al. 2023), averaged over
    pixels and classes (``valid`` (B, H, W) masks pixels out)."""
    s, t = _same_size(student, teacher.detach())
    return _masked_mean(((s - t) ** 2).mean(1), valid)


def _masked_mean(per_pixel: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return per_pixel.mean()
    if tuple(valid.shape[-2:]) != tuple(per_pixel.shape[-2:]):
        valid = F.interpolate(valid[:, None].float(), size=per_pixel.shape[-2:], mode="nearest-exact")[:, 0] > 0.5
    n = valid.sum()
    return (per_pixel * valid).sum() / n.clamp(min=1)
