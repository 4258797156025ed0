"""adapt: task-adapt a model (the teacher) on the recipe's data with the shared training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgevit.context import RunContext
from edgevit.graph import ModelGraph
from edgevit.passes.base import Pass, PassConfig
from edgevit.training.loop import CrossEntropyObjective, TrainConfig, train


class AdaptConfig(PassConfig, TrainConfig):
    tuner: Literal["full"] = Field("full", description="which parameters train (more tuners later)")
    reset_head: bool | None = Field(
        None, description="new classifier head; default: only when the data's class count differs"
    )


class AdaptPass(Pass):
    name = "adapt"
    Config = AdaptConfig
    summary = "fine-tune (or train) the model on the task data; cross-entropy, AdamW, cosine"
    distributed = True

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: AdaptConfig = self.config  # type: ignore[assignment]
        classes = ctx.data.num_classes
        reset = cfg.reset_head if cfg.reset_head is not None else graph.spec.num_classes != classes
        if reset:
            ctx.console.print(f"  new classifier head: {graph.spec.num_classes} → {classes} classes")
            graph.reset_classifier(classes)
        self.metrics = train(
            graph.module, CrossEntropyObjective(cfg.label_smoothing), cfg, ctx, ctx.stage_dir, description="adapt"
        )
        self.metrics["reset_head"] = reset
        graph.module.cpu().eval()
        return graph
