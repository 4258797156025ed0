"""prune: structured pruning of attention heads and MLP units, physically removed.

``method`` decides which groups go: ``magnitude`` (weight norm), ``taylor`` (first-order
weight × gradient on calibration images) or ``osscar`` (one-shot reconstruction with
least-squares re-fit, Meng et al. 2024). ``heads``/``mlp``/``blocks``/``target`` decide how
many. An optional ``recover`` fine-tunes afterwards, distilling from the unpruned model or
from a named ``teacher`` (a model source, e.g. an earlier run's stage directory)."""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgevit.context import RunContext
from edgevit.distill import DistillObjective, LossConfig
from edgevit.distill.objective import teacher_input
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.models.sources import LoadedTeacher, ModelSource, load_teacher
from edgevit.passes.base import Pass, PassConfig
from edgevit.passes.distill import check_teacher_classes
from edgevit.prune.importance import magnitude_scores, taylor_scores
from edgevit.prune.plan import PlanConfig, global_counts, plan
from edgevit.prune.reconstruct import HEAD_SIZES, UNIT_SIZES, SearchSizes, osscar_model
from edgevit.training.loop import TrainConfig
from edgevit.training.task import SegLossConfig, check_seg_loss, task_loss
from edgevit.training.tuned import train_tuned
from edgevit.tuners import FullConfig, TunerConfig, check_tuner_task


class RecoverConfig(TrainConfig, LossConfig, SegLossConfig):
    """Fine-tuning after pruning; by default CE + logit KD from the unpruned model (segmentation:
    per-pixel, with the ``class_weights``/``ohem`` options)."""

    feature: float = Field(0.0, ge=0)
    mgd: float = Field(0.0, ge=0)
    teacher: ModelSource | None = Field(
        None, description="whom recovery distils from; default: the unpruned model. A model source, e.g. "
        "{source: edgevit, path: runs/x/01-adapt} (a stage directory) or a timm checkpoint")
    tuner: TunerConfig = Field(
        default_factory=FullConfig, description="which parameters recover: a registered tuner (full | slicefine | "
        "losa | disentangled, or a plugin's)")


class SearchStep(BaseModel):
    """An OSSCAR step size, per kind of group."""

    model_config = ConfigDict(extra="forbid")
    heads: int = Field(ge=1)
    mlp: int = Field(ge=1)


class PruneConfig(PassConfig, PlanConfig):
    method: Literal["magnitude", "taylor", "osscar"] = "osscar"
    ridge: float = Field(1e-2, gt=0, description="osscar: λ in H = XᵀX + λ·diag(XᵀX) (per column: scale-free)")
    swap_budget: int = Field(30, ge=0, description="osscar: local-search iterations per layer")
    greedy_step: SearchStep = Field(
        SearchStep(heads=HEAD_SIZES.greedy_step, mlp=UNIT_SIZES.greedy_step),
        description="osscar: heads / MLP units removed per greedy step (the official code's 2 / 10)")
    swap_size: SearchStep = Field(
        SearchStep(heads=HEAD_SIZES.swap_size, mlp=UNIT_SIZES.swap_size),
        description="osscar: heads / MLP units swapped at first in local search, halved on a rejected swap "
        "(the official code's 5 / 10)")
    batch_size: int = Field(32, ge=1, description="calibration images per forward pass")
    recover: RecoverConfig | None = Field(None, description="fine-tune after pruning (omit for one-shot)")


class PrunePass(Pass):
    name = "prune"
    Config = PruneConfig
    summary = "remove attention heads and MLP units (magnitude / taylor / osscar re-fit); optional recovery"
    distributed = True  # recovery trains on every rank; the one-shot part is deterministic

    @classmethod
    def preflight(cls, config: PassConfig, ctx: RunContext, where: str) -> None:
        recover = config.recover  # type: ignore[attr-defined]
        if recover is not None:
            check_seg_loss(recover, ctx.data, f"{where}.recover")
            check_tuner_task(recover.tuner, ctx.data.task, f"{where}.recover", ctx.registry)

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: PruneConfig = self.config  # type: ignore[assignment]
        before = graph.cost()
        if graph.side is not None and cfg.method == "taylor":
            raise EdgeVitError(f"passes.prune.method: taylor needs gradients through the blocks, which this model's "
                               f"{graph.side.kind} side module keeps frozen; use method osscar or magnitude")
        if cfg.allocation == "global" and (cfg.method == "osscar" or cfg.target is not None or cfg.blocks):
            raise EdgeVitError(
                "passes.prune.allocation: global allocation ranks magnitude/taylor scores across blocks; use "
                "method magnitude or taylor with heads/mlp ratios (osscar and targets allocate uniformly)"
            )
        counts, aim = plan(graph, cfg, ctx.profile)
        unpruned = graph.clone() if cfg.recover is not None else None
        t0 = time.perf_counter()
        log: list[dict] = []
        images, labels = ctx.calibration()
        if cfg.method == "osscar":
            with ctx.progress() as progress:
                task = progress.add_task("osscar", total=graph.spec.depth, info="")
                log = osscar_model(graph, counts, images, ctx.device, cfg.ridge, cfg.swap_budget, cfg.batch_size,
                                   progress=lambda: progress.advance(task),
                                   head_sizes=SearchSizes(cfg.greedy_step.heads, cfg.swap_size.heads),
                                   unit_sizes=SearchSizes(cfg.greedy_step.mlp, cfg.swap_size.mlp))
        else:
            scores = (magnitude_scores(graph) if cfg.method == "magnitude"
                      else taylor_scores(graph, images, labels, None, ctx.device, cfg.batch_size,
                                         loss_fn=task_loss(ctx.data)))
            if cfg.allocation == "global":
                counts = global_counts(graph, cfg, scores, cfg.heads, cfg.mlp)
            for blk, (nh, nu), (hs, us) in zip(list(graph.spec.blocks), counts, scores, strict=True):
                if nh < blk.attn.num_heads:
                    graph.keep_heads(blk.index, sorted(torch.topk(hs, nh).indices.tolist()))
                if nu < blk.mlp.hidden:
                    graph.keep_mlp_units(blk.index, sorted(torch.topk(us, nu).indices.tolist()))
        seconds = time.perf_counter() - t0
        graph.module.cpu().eval()
        after = graph.cost()
        self.metrics = {
            "method": cfg.method,
            "aim": aim,
            "heads": [b.attn.num_heads for b in graph.spec.blocks],
            "mlp_units": [b.mlp.hidden for b in graph.spec.blocks],
            "flops_kept": round(after.flops / before.flops, 4),
            "params_kept": round(after.params / before.params, 4),
            "prune_seconds": round(seconds, 2),
            "blocks": log,
        }
        ctx.console.print(f"  {cfg.method}: {self.metrics['flops_kept']:.3f} of the FLOPs and "
                          f"{self.metrics['params_kept']:.3f} of the parameters kept ({seconds:.1f} s)")
        if aim.get("target_metric") == "latency":
            lo, hi = aim["predicted_interval_ms_after"]
            ctx.console.print(f"  aimed at {aim['predicted_ms_after']:.2f} ms predicted on {aim['profile']} (from "
                              f"{aim['predicted_ms_before']:.2f} ms); interval {lo:.2f}-{hi:.2f} ms")
        if cfg.recover is not None:
            assert unpruned is not None
            r = cfg.recover
            teacher = self._teacher(r, unpruned, ctx)
            t_spec = teacher.graph.spec if teacher.graph is not None else None
            size = t_spec.img_size if t_spec is not None else graph.spec.img_size
            self.metrics["recover_teacher"] = ("unpruned" if r.teacher is None
                                               else r.teacher.model_dump(mode="json", exclude_none=True))

            loss = task_loss(ctx.data, r.label_smoothing, r, "passes.prune.recover")

            def objective(g: ModelGraph) -> DistillObjective:
                return DistillObjective(r, g.module, g.spec, teacher.module, t_spec,
                                        teacher_input(g.spec, teacher.mean, teacher.std, size), r.label_smoothing,
                                        where="passes.prune.recover", student_adapter=g.adapter,
                                        teacher_adapter=teacher.graph.adapter if teacher.graph else None,
                                        task_loss=loss)

            self.metrics["recover"] = train_tuned(graph, objective, r, r.tuner, ctx, "recover")
            graph.module.cpu().eval()
        return graph

    @staticmethod
    def _teacher(r: RecoverConfig, unpruned: ModelGraph, ctx: RunContext) -> LoadedTeacher:
        if r.teacher is None:
            t = LoadedTeacher(unpruned.module, unpruned, unpruned.spec.mean, unpruned.spec.std)
        else:
            t = load_teacher(r.teacher, ctx.registry, where="passes.prune.recover.teacher")
            check_teacher_classes(t, ctx.data.num_classes, "passes.prune.recover.teacher")
        t.module.to(ctx.device)
        return t
