"""torch.distributed, when a launcher (torchrun) started us: which rank this is, and the few
collective steps the loop and the pipeline need. A single process is world size 1 and every
helper is a no-op, so the same code runs everywhere."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (counts for a sharded evaluation)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def launched() -> bool:
    """True when a launcher set the torch.distributed environment for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv()


def init(device_name: str) -> DistEnv:
    """Join the process group torchrun described (NCCL on CUDA, gloo on CPU); world 1 otherwise."""
    if not launched():
        return DistEnv()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def params_in_sync(module: torch.nn.Module, env: DistEnv) -> bool:
    """Whether every rank holds bit-identical parameters (DDP keeps them so; this checks it)."""
    if not env.enabled:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        probe = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device,
                                                               dtype=flat.dtype).remainder(97)).sum()])
        gathered = [torch.zeros_like(probe) for _ in range(env.world)]
        dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)
