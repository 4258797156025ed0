"""full: every parameter trains (the baseline the memory-efficient tuners are measured against)."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.tuners.base import Tuner, TunerConfigBase, count, unfreeze_all


class FullConfig(TunerConfigBase):
    name: Literal["full"] = "full"


class FullTuner(Tuner):
    name = "full"
    Config = FullConfig

    def __init__(self, cfg: FullConfig) -> None:
        self.cfg = cfg
        self.trainable = 0

    def setup(self, graph: ModelGraph) -> list[tuple[str, nn.Parameter]]:
        if graph.side is not None:
            raise EdgeVitError(f"tuner full: this model runs a frozen backbone under its {graph.side.kind} side "
                               f"module; train it with tuner {graph.side.kind}")
        unfreeze_all(graph.module)
        params = list(graph.module.named_parameters())
        self.trainable = count(params)
        return params

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "trainable_params": self.trainable, "added_params": 0}
