"""The one training loop, shared by adapt, distill and pruning recovery."""

from edgevit.training.evaluate import evaluate_top1
from edgevit.training.loop import Objective, TrainConfig, train

__all__ = ["Objective", "TrainConfig", "evaluate_top1", "train"]
