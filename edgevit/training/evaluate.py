"""Top-1 accuracy of a torch model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def count_correct(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[int, int]:
    """(correct, total) top-1 counts; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct, total


def evaluate_top1(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 in percent."""
    correct, total = count_correct(model, loader, device)
    return 100.0 * correct / max(total, 1)
