"""Importance scores of heads and MLP units for the criteria that rank (magnitude, Taylor);
OSSCAR chooses by reconstruction instead (osscar.py / reconstruct.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgevit.graph import ModelGraph
from edgevit.prune.groups import group_reduce, head_tensors, unit_tensors
from edgevit.seg.losses import pixel_kd_kl


def magnitude_scores(graph: ModelGraph) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: (head scores, unit scores) = L2 norm of all the weights each group owns."""
    out = []
    for blk in graph.spec.blocks:
        sq = lambda x: x.float().pow(2).sum(dim=(1, 2))  # noqa: E731
        out.append((group_reduce(head_tensors(graph, blk), sq).sqrt(),
                    group_reduce(unit_tensors(graph, blk), sq).sqrt()))
    return out


def taylor_scores(graph: ModelGraph, images: torch.Tensor, labels: torch.Tensor | None,
                  teacher_logits: torch.Tensor | None, device: torch.device,
                  batch_size: int = 32,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """First-order Taylor (Molchanov et al. 2019): the loss change from removing a group is
    ≈ Σ w·∂L/∂w over its weights; squared and summed over calibration batches. The loss is
    ``loss_fn`` (the task's: per-pixel for segmentation; default cross-entropy) on the labels,
    or KL to ``teacher_logits`` when there are no labels (per pixel for dense logits)."""
    model = graph.module.to(device).eval()
    blocks = graph.spec.blocks
    acc = [(torch.zeros(b.attn.num_heads), torch.zeros(b.mlp.hidden)) for b in blocks]
    params = {id(p): p for p in model.parameters()}
    for p in params.values():
        p.requires_grad_(True)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        if labels is not None:
            loss = (loss_fn or F.cross_entropy)(logits, labels[start:start + batch_size].to(device))
        else:
            t = teacher_logits[start:start + batch_size].to(device)  # type: ignore[index]
            loss = (pixel_kd_kl(logits, t) if logits.ndim == 4 else
                    F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True))
        loss.backward()
        for i, blk in enumerate(blocks):
            for k, tensors in enumerate((head_tensors(graph, blk), unit_tensors(graph, blk))):
                wg = [(p.detach() * p.grad, dim, idx) for p, dim, idx in tensors if p.grad is not None]
                contrib = group_reduce(wg, lambda x: x.double().sum(dim=(1, 2))).pow(2)
                acc[i][k].add_(contrib.float().cpu())
    model.zero_grad(set_to_none=True)
    return acc
