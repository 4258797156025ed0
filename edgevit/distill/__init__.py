"""Distillation: how the student is built, which features are read, and the losses."""

from edgevit.distill.objective import DistillObjective, LossConfig
from edgevit.distill.student import ShrinkConfig, build_student, shrink

__all__ = ["DistillObjective", "LossConfig", "ShrinkConfig", "build_student", "shrink"]
