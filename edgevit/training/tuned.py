"""Train a graph with the tuner its pass config names (found in the run's registry): the tuner
prepares the graph and picks the parameters, the one training loop trains them, the tuner
leaves the graph exportable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgevit.context import RunContext
from edgevit.graph import ModelGraph
from edgevit.training.loop import Objective, TrainConfig, train
from edgevit.tuners import make_tuner


def train_tuned(graph: ModelGraph, make_objective: Callable[[ModelGraph], Objective], cfg: TrainConfig,
                tuner_cfg: Any, ctx: RunContext, description: str) -> dict[str, Any]:
    """``make_objective`` is called after the tuner set the graph up (a side module may wrap it)."""
    tuner = make_tuner(tuner_cfg, ctx.registry)
    params = tuner.setup(graph)
    objective = make_objective(graph)
    try:
        metrics = train(graph.module, objective, cfg, ctx, ctx.stage_dir, trainable=params,
                        description=description, hooks=tuner)
    finally:
        tuner.finish(graph)
        close = getattr(objective, "close", None)
        if close is not None:
            close()
    metrics["tuner"] = tuner.summary()
    s = metrics["tuner"]
    ctx.console.print(f"  tuner {s['name']}: {s['trainable_params']:,} trainable parameters, "
                      f"{s['added_params']:,} added")
    return metrics
