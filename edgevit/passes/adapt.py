"""adapt: task-adapt a model (the teacher) on the recipe's data with the shared training loop."""

from __future__ import annotations

from pydantic import Field

from edgevit.context import RunContext
from edgevit.graph import ModelGraph
from edgevit.passes.base import Pass, PassConfig
from edgevit.training.loop import CrossEntropyObjective, TrainConfig
from edgevit.training.tuned import train_tuned
from edgevit.tuners import FullConfig, TunerConfig


class AdaptConfig(PassConfig, TrainConfig):
    tuner: TunerConfig = Field(
        default_factory=FullConfig, description="which parameters train: full | slicefine | losa | "
        "disentangled (a string, or a mapping with `name` and options)")
    reset_head: bool | None = Field(
        None, description="new classifier head; default: only when the data's class count differs"
    )


class AdaptPass(Pass):
    name = "adapt"
    Config = AdaptConfig
    summary = "fine-tune (or train) the model on the task data with a tuner (full, slicefine, losa, disentangled)"
    distributed = True

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: AdaptConfig = self.config  # type: ignore[assignment]
        classes = ctx.data.num_classes
        reset = cfg.reset_head if cfg.reset_head is not None else graph.spec.num_classes != classes
        if reset:
            ctx.console.print(f"  new classifier head: {graph.spec.num_classes} → {classes} classes")
            graph.reset_classifier(classes)
        self.metrics = train_tuned(graph, lambda g: CrossEntropyObjective(cfg.label_smoothing), cfg, cfg.tuner,
                                   ctx, "adapt")
        self.metrics["reset_head"] = reset
        graph.module.cpu().eval()
        return graph
