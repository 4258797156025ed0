"""One training loop: AdamW, warm-up + cosine, clipping, AMP on CUDA, per-epoch checkpoints.

What is optimised comes from an :class:`Objective` (the task loss for adapt, ``training/task.py``;
KD and feature losses for distill), what validation reports from the task (top-1 or mIoU),
which parameters train from the caller (the tuner). The loop checkpoints after every epoch
under ``work_dir`` (as one unit: ``training/checkpoint.py``) and resumes from there,
reseeding each epoch from (seed, epoch) so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgevit.context import RunContext
from edgevit.training import distributed
from edgevit.training.checkpoint import load_checkpoint, save_checkpoint
from edgevit.training.task import metric_name, task_counts, task_scores


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")


class Objective(Protocol):
    """Computes the training loss. ``modules()`` are extra trainable modules (projectors,
    generators) that train with the model and are dropped afterwards."""

    def modules(self) -> list[nn.Module]: ...

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


class CrossEntropyObjective:
    """Classification cross-entropy (``training/task.py`` has the task-aware objective)."""

    def __init__(self, label_smoothing: float) -> None:
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def modules(self) -> list[nn.Module]:
        return []

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss(model(images), labels)
        return loss, {"ce": float(loss.detach())}


class _Step(nn.Module):
    """Student + training-only modules as one module, so DistributedDataParallel averages the
    gradients of both; its forward is one objective evaluation."""

    def __init__(self, model: nn.Module, extra: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.extra = model, extra
        self.objective = objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, images, labels)


def _param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float,
                  exempt: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """No decay on biases, norms, tokens and position embeddings (1-D or token tensors), nor on
    the ``exempt`` names (a tuner's entries of pretrained weights, e.g. SliceFine's slices)."""
    decay, no_decay = [], []
    for name, p in params:
        skip = p.ndim <= 1 or name in exempt or name.endswith(("cls_token", "dist_token", "pos_embed", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


@dataclass
class _Trainer:
    """Everything one training run updates: the step module, what trains and how."""

    model: nn.Module
    extra: nn.Module
    step: nn.Module
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    use_amp: bool
    amp_dtype: torch.dtype
    steps_per_epoch: int


def train(
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    ctx: RunContext,
    work_dir: Path,
    trainable: list[tuple[str, nn.Parameter]] | None = None,
    description: str = "train",
    hooks: Any = None,
) -> dict[str, Any]:
    """Train in place; return metrics (per-epoch log, the final validation metric, seconds): top-1,
    or for segmentation mIoU with pixel accuracy and per-class IoU (``training/task.py``).

    Under torchrun the step runs in DistributedDataParallel, each rank on its shard of the
    data; rank 0 alone writes checkpoints, and every rank ends with the same weights."""
    env = distributed.current()
    t = _build_trainer(model, objective, cfg, ctx, trainable, hooks)
    ckpt = work_dir / "checkpoint"
    start_epoch, log, seconds = _resume(t, ckpt, ctx, cfg, description)
    if hooks is not None:  # a tuner's per-step schedule (SliceFine moves its slices)
        hooks.start(start_epoch * t.steps_per_epoch)
    val_loader = ctx.data.val_loader(rank=env.rank, world=env.world)
    metric = metric_name(ctx.data.task)
    key = f"val_{metric}"  # val_top1, or val_miou for segmentation
    scores: dict[str, Any] = {}
    with ctx.progress() as progress:
        task = progress.add_task(description, total=cfg.epochs * t.steps_per_epoch,
                                 completed=start_epoch * t.steps_per_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            sums, n = _train_epoch(t, cfg, ctx, epoch, hooks,
                                   lambda info: progress.update(task, advance=1, info=info))
            scores = _validate(model, val_loader, ctx, env)
            seconds += time.perf_counter() - t0
            entry = {"epoch": epoch + 1, key: round(scores[metric], 2), "seconds": round(time.perf_counter() - t0, 2)}
            if "pixel_accuracy" in scores:
                entry["val_pixel_accuracy"] = round(scores["pixel_accuracy"], 2)
            entry.update({k: round(v / max(n, 1), 4) for k, v in sums.items()})
            log.append(entry)
            progress.update(task, info=f"epoch {epoch + 1}/{cfg.epochs} {key}={scores[metric]:.2f}%")
            if not ctx.console.is_terminal:
                shown = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "epoch")
                ctx.console.print(f"  {description} epoch {epoch + 1}/{cfg.epochs}: {shown}")
            if env.is_main:
                _save_checkpoint(ckpt, model, t.extra, t.optimizer, t.scheduler, epoch, log, seconds)
            env.barrier()
    out = {"epochs": cfg.epochs, key: log[-1][key], "train_seconds": round(seconds, 2), "log": log}
    if "iou" in scores:  # segmentation: per-class IoU of the last epoch (None: class absent from val)
        out["val_pixel_accuracy"] = log[-1]["val_pixel_accuracy"]
        out["val_iou"] = {c: None if v is None else round(v, 2) for c, v in scores["iou"].items()}
    if env.enabled:
        out.update(world_size=env.world, ranks_in_sync=distributed.params_in_sync(model, env))
    return out


def _validate(model: nn.Module, loader: Any, ctx: RunContext, env: distributed.DistEnv) -> dict[str, Any]:
    """The task's validation metrics, summed over ranks before they are computed."""
    d = ctx.data
    counts = env.sum(task_counts(model, loader, d.task, d.num_classes, d.ignore_index, ctx.device), ctx.device)
    return task_scores(counts, d.task, d.class_names)


def _build_trainer(model: nn.Module, objective: Objective, cfg: TrainConfig, ctx: RunContext,
                   trainable: list[tuple[str, nn.Parameter]] | None, hooks: Any) -> _Trainer:
    """Move to the device, wrap in DDP under torchrun, and set up AdamW + schedule + AMP."""
    env = distributed.current()
    device = ctx.device
    model.to(device)
    extra = nn.ModuleList(objective.modules()).to(device)
    step: nn.Module = _Step(model, extra, objective)
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=getattr(hooks, "unused_parameters", False))
    params = trainable if trainable is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = params + [(f"objective.{n}", p) for n, p in extra.named_parameters()]
    exempt = frozenset(getattr(hooks, "no_weight_decay", ()))
    optimizer = torch.optim.AdamW(_param_groups(params, cfg.weight_decay, exempt), lr=cfg.lr)
    steps_per_epoch = len(ctx.data.train_loader(ctx.seed, 0, env.rank, env.world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return _Trainer(model, extra, step, params, optimizer, scheduler, scaler, use_amp, amp_dtype, steps_per_epoch)


def _resume(t: _Trainer, ckpt: Path, ctx: RunContext, cfg: TrainConfig,
            description: str) -> tuple[int, list[dict[str, Any]], float]:
    """(first epoch to run, log so far, seconds so far) from a verified checkpoint, else a fresh start."""
    found, problem = load_checkpoint(ckpt, ctx.device)
    if problem:
        ctx.console.print(f"[yellow]warning:[/yellow] {description}: ignoring the checkpoint ({problem}); "
                          "training this stage from the start")
    if found is None:
        return 0, [], 0.0
    t.model.load_state_dict({k[6:]: v for k, v in found.weights.items() if k.startswith("model.")})
    t.extra.load_state_dict({k[6:]: v for k, v in found.weights.items() if k.startswith("extra.")})
    t.optimizer.load_state_dict(found.optimizer)
    t.scheduler.load_state_dict(found.trainer["scheduler"])
    state = found.trainer
    ctx.console.print(f"  resuming {description} after epoch {state['epoch'] + 1} of {cfg.epochs}")
    return state["epoch"] + 1, state["log"], state["seconds"]


def _train_epoch(t: _Trainer, cfg: TrainConfig, ctx: RunContext, epoch: int, hooks: Any,
                 report: Any) -> tuple[dict[str, float], int]:
    """One pass over the training data, reseeded from (seed, epoch) so a resume repeats it exactly;
    returns the summed loss terms and the number of steps."""
    env = distributed.current()
    device = ctx.device
    torch.manual_seed(ctx.seed * 1_000_003 + epoch + 7_919 * env.rank)
    t.model.train()
    t.extra.train()
    sums: dict[str, float] = {}
    n = 0
    for images, labels in ctx.data.train_loader(ctx.seed, epoch, env.rank, env.world):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=t.amp_dtype, enabled=t.use_amp):
            loss, terms = t.step(images, labels)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        if cfg.grad_clip:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in t.params], cfg.grad_clip)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        if hooks is not None:
            hooks.after_step(epoch * t.steps_per_epoch + n, t.optimizer)
        n += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        report(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={v / n:.3f}" for k, v in sums.items()))
    return sums, n


def _save_checkpoint(ckpt: Path, model: nn.Module, extra: nn.Module, optimizer: Any, scheduler: Any,
                     epoch: int, log: list, seconds: float) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.state_dict().items()})
    trainer = {"epoch": epoch, "log": log, "seconds": seconds, "scheduler": scheduler.state_dict()}
    save_checkpoint(ckpt, tensors, optimizer.state_dict(), trainer)
