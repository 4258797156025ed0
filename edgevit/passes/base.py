"""The Pass contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from edgevit.context import RunContext
    from edgevit.graph import ModelGraph


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Pass(ABC):
    """A pipeline stage.

    ``run`` receives a graph it may change (the pipeline hands it a copy), writes any files
    only under ``ctx.stage_dir``, records what it measured in ``self.metrics`` and returns
    the resulting graph.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    summary: ClassVar[str] = ""
    modifies_weights: ClassVar[bool] = True  # False: the stage reuses the previous weights file
    distributed: ClassVar[bool] = False  # True: every torch.distributed rank runs it (training passes)

    def __init__(self, config: PassConfig) -> None:
        self.config = config
        self.metrics: dict[str, Any] = {}

    @classmethod
    def preflight(cls, config: PassConfig, ctx: RunContext, where: str) -> None:
        """Raise an EdgeVitError now if ``config`` cannot run in ``ctx`` (e.g. a precision the
        device profile lacks). Called for every pass before any stage runs or any file of the
        run dir changes, so a bad request never costs finished work. ``where`` names the step
        (``passes[3].quantize``) for the message."""
        return None  # most passes can only fail on what they find when they run

    @abstractmethod
    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph: ...
