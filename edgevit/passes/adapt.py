"""adapt: task-adapt a model (the teacher) on the recipe's data with the shared training loop."""

from __future__ import annotations

from pydantic import Field

from edgevit.context import RunContext
from edgevit.graph import ModelGraph
from edgevit.passes.base import Pass, PassConfig
from edgevit.training.loop import TrainConfig
from edgevit.training.task import SegLossConfig, TaskObjective, check_seg_loss, task_loss
from edgevit.training.tuned import train_tuned
from edgevit.tuners import FullConfig, TunerConfig, check_tuner_task


class AdaptConfig(PassConfig, TrainConfig, SegLossConfig):
    tuner: TunerConfig = Field(
        default_factory=FullConfig, description="which parameters train: a registered tuner (full | slicefine | "
        "losa | disentangled, or a plugin's), a name or a mapping with `name` and its options")
    reset_head: bool | None = Field(
        None, description="new classifier head; default: only when the data's class count differs"
    )


class AdaptPass(Pass):
    name = "adapt"
    Config = AdaptConfig
    summary = "fine-tune (or train) the model on the task data with a tuner (full, slicefine, losa, disentangled)"
    distributed = True

    @classmethod
    def preflight(cls, config: PassConfig, ctx: RunContext, where: str) -> None:
        check_seg_loss(config, ctx.data, where)  # type: ignore[arg-type]
        check_tuner_task(config.tuner, ctx.data.task, where, ctx.registry)  # type: ignore[attr-defined]

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: AdaptConfig = self.config  # type: ignore[assignment]
        classes = ctx.data.num_classes
        reset = cfg.reset_head if cfg.reset_head is not None else graph.spec.num_classes != classes
        if reset:
            ctx.console.print(f"  new classifier head: {graph.spec.num_classes} → {classes} classes")
            graph.reset_classifier(classes)
        loss = task_loss(ctx.data, cfg.label_smoothing, cfg, "passes.adapt")
        self.metrics = train_tuned(graph, lambda g: TaskObjective(loss), cfg, cfg.tuner, ctx, "adapt")
        self.metrics["reset_head"] = reset
        graph.module.cpu().eval()
        return graph
