"""One training loop: AdamW, warm-up + cosine, clipping, AMP on CUDA, per-epoch checkpoints.

What is optimised comes from an :class:`Objective` (cross-entropy for adapt; KD and feature
losses for distill), which parameters train comes from the caller (the tuner). The loop
checkpoints after every epoch under ``work_dir`` and resumes from there, reseeding each
epoch from (seed, epoch) so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from edgevit.context import RunContext
from edgevit.fileio import atomic_path, read_json, write_json
from edgevit.training import distributed
from edgevit.training.evaluate import count_correct


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
    """Train in place; return metrics (per-epoch log, final val top-1, seconds).

    Under torchrun the step runs in DistributedDataParallel, each rank on its shard of the
    data; rank 0 alone writes checkpoints, and every rank ends with the same weights."""
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

    ckpt = work_dir / "checkpoint"
    log: list[dict[str, Any]] = []
    start_epoch, seconds = 0, 0.0
    if (ckpt / "trainer.json").is_file():
        state = read_json(ckpt / "trainer.json")
        weights = load_file(str(ckpt / "weights.safetensors"), device=str(device))
        model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
        extra.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("extra.")})
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, log, seconds = state["epoch"] + 1, state["log"], state["seconds"]
        ctx.console.print(f"  resuming {description} after epoch {start_epoch} of {cfg.epochs}")

    if hooks is not None:  # a tuner's per-step schedule (SliceFine moves its slices)
        hooks.start(start_epoch * steps_per_epoch)
    val_loader = ctx.data.val_loader(rank=env.rank, world=env.world)
    with ctx.progress() as progress:
        task = progress.add_task(description, total=cfg.epochs * steps_per_epoch,
                                 completed=start_epoch * steps_per_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(ctx.seed * 1_000_003 + epoch + 7_919 * env.rank)
            model.train()
            extra.train()
            sums: dict[str, float] = {}
            n = 0
            for images, labels in ctx.data.train_loader(ctx.seed, epoch, env.rank, env.world):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss, terms = step(images, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if hooks is not None:
                    hooks.after_step(epoch * steps_per_epoch + n, optimizer)
                n += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                info = " ".join(f"{k}={v / n:.3f}" for k, v in sums.items())
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} {info}")
            correct, total = env.sum(list(count_correct(model, val_loader, device)), device)
            top1 = 100.0 * correct / max(total, 1)
            seconds += time.perf_counter() - t0
            entry = {"epoch": epoch + 1, "val_top1": round(top1, 2), "seconds": round(time.perf_counter() - t0, 2)}
            entry.update({k: round(v / max(n, 1), 4) for k, v in sums.items()})
            log.append(entry)
            progress.update(task, info=f"epoch {epoch + 1}/{cfg.epochs} val_top1={top1:.2f}%")
            if not ctx.console.is_terminal:
                shown = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "epoch")
                ctx.console.print(f"  {description} epoch {epoch + 1}/{cfg.epochs}: {shown}")
            if env.is_main:
                _save_checkpoint(ckpt, model, extra, optimizer, scheduler, epoch, log, seconds)
            env.barrier()
    out = {"epochs": cfg.epochs, "val_top1": log[-1]["val_top1"], "train_seconds": round(seconds, 2), "log": log}
    if env.enabled:
        out.update(world_size=env.world, ranks_in_sync=distributed.params_in_sync(model, env))
    return out


def _save_checkpoint(ckpt: Path, model: nn.Module, extra: nn.Module, optimizer: Any, scheduler: Any,
                     epoch: int, log: list, seconds: float) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.state_dict().items()})
    with atomic_path(ckpt / "weights.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(ckpt / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    # trainer.json last: it is what marks the checkpoint complete
    state = {"epoch": epoch, "log": log, "seconds": seconds, "scheduler": scheduler.state_dict()}
    write_json(ckpt / "trainer.json", state)
