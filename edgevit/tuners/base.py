"""What a tuner is: it decides which parameters train and which extra modules exist; the
training loop stays one (``edgevit.training.loop.train``)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from edgevit.graph import ModelGraph


class TunerConfigBase(BaseModel):
    """Base of every tuner's ``Config``: unknown keys are errors, and ``name`` is the tuner's
    registry name (a recipe's ``tuner: {name: ..., <options>}``), which finds the tuner again
    when the training pass builds it."""

    model_config = ConfigDict(extra="forbid")
    name: str


class Tuner:
    """``setup`` prepares the graph and returns the parameters to train; ``start``/``after_step``
    run inside the loop (SliceFine moves its slices there); ``finish`` leaves the graph in its
    final, exportable form; ``summary`` is what the report says about the tuner.

    A tuner is found by ``name`` in the registry's ``tuners`` group (a plugin adds one through
    the ``edgevit.tuners`` entry points); ``Config`` validates its recipe options; ``side`` is
    the ``sides`` kind of the side module it attaches (``None``: it trains the model's own
    parameters), which tells the passes that the backbone stays frozen."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TunerConfigBase]]
    side: ClassVar[str | None] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def setup(self, graph: ModelGraph) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def start(self, step: int) -> None:
        """Called once before the first step the loop runs (``step`` > 0 after a resume)."""

    def after_step(self, step: int, optimizer: Any) -> None:
        """Called after optimizer step ``step`` (0-based, counted over the whole run)."""

    def finish(self, graph: ModelGraph) -> None:
        """Undo training-only state; the graph then saves and exports as the tuned model."""

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError


def count(params: list[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in params)


def train_side_only(graph: ModelGraph, kind: str) -> list[tuple[str, nn.Parameter]]:
    """Freeze the backbone, train every parameter of the attached ``kind`` side module."""
    from edgevit.errors import EdgeVitError

    side = graph.side
    if side is None or side.kind != kind:
        found = side.kind if side is not None else "no"
        raise EdgeVitError(f"tuner {kind}: this model carries {found} side module, not a {kind} one")
    freeze_all(graph.backbone)
    for p in side.parameters():
        p.requires_grad_(True)
    return [(f"side.{n}", p) for n, p in side.named_parameters()]


def freeze_all(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze_all(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)
