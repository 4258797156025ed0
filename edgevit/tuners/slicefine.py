"""slicefine (Kowsher et al., arXiv 2510.08513): train one slice of existing weight matrices.

Each tuned matrix has one active slice at a time, a contiguous block of ``rank`` columns (or
rows) whose entries are the trainable parameter; everything else is frozen. Every
``switch_every`` optimizer steps the slice moves on (a sweep across the matrix, or a seeded
random order); the slice just trained keeps its values and freezes, and the optimizer state
starts afresh for the new one. No parameter is added to the model: at the end the slices are
written back and the module has exactly its original state_dict keys and shapes.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.tuners.base import Tuner, TunerConfigBase, count, freeze_all, unfreeze_all

LAYERS = ("qkv", "proj", "fc1", "fc2")


class SliceFineConfig(TunerConfigBase):
    name: Literal["slicefine"]
    layers: list[Literal["qkv", "proj", "fc1", "fc2"]] = Field(
        default_factory=lambda: list(LAYERS), description="which linears of each block have a slice "
        "(qkv = the q/k/v projections)")
    blocks: list[int] | None = Field(None, description="blocks with slices (default: all)")
    rank: int = Field(1, ge=1, description="slice width: rows or columns trained at a time")
    axis: Literal["columns", "rows", "alternate"] = Field(
        "columns", description="the slice is a block of columns, of rows, or alternates between them")
    switch_every: int = Field(50, ge=1, description="optimizer steps before the slice moves on")
    order: Literal["sweep", "random"] = Field("sweep", description="sweep: next block across the matrix; "
                                              "random: a seeded random block each time")
    seed: int = 0
    train_head: bool = Field(True, description="the classifier head trains in full (it is task-specific)")


class _Slice(nn.Module):
    """Parametrization: the weight with one slice replaced by trainable values."""

    def __init__(self, weight: torch.Tensor, rank: int, axes: list[int]) -> None:
        super().__init__()
        self.rank = rank
        self.axis = axes[0]
        self.start = 0
        # one value tensor per axis used; only the active one is read in forward
        self.cols = nn.Parameter(weight.detach()[:, :rank].clone()) if 1 in axes else None
        self.rows = nn.Parameter(weight.detach()[:rank, :].clone()) if 0 in axes else None

    @property
    def values(self) -> nn.Parameter:
        v = self.cols if self.axis == 1 else self.rows
        assert v is not None
        return v

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s, r = self.start, self.rank
        n = weight.shape[self.axis]
        return torch.cat([weight.narrow(self.axis, 0, s), self.values, weight.narrow(self.axis, s + r, n - s - r)],
                         dim=self.axis)

    @torch.no_grad()
    def store(self, original: torch.Tensor) -> None:
        original.narrow(self.axis, self.start, self.rank).copy_(self.values)

    @torch.no_grad()
    def load(self, original: torch.Tensor, axis: int, start: int) -> None:
        self.axis, self.start = axis, start
        self.values.copy_(original.narrow(axis, start, self.rank))


def _starts(n: int, rank: int) -> list[int]:
    starts = list(range(0, n - rank + 1, rank))
    if starts[-1] + rank < n:
        starts.append(n - rank)
    return starts


class SliceFineTuner(Tuner):
    name = "slicefine"
    Config = SliceFineConfig

    def __init__(self, cfg: SliceFineConfig) -> None:
        self.cfg = cfg
        self.slices: list[tuple[str, nn.Linear, _Slice]] = []
        self.trainable = 0
        self.sliced = 0
        self.slice_names: frozenset[str] = frozenset()
        self.switches = 0

    @property
    def unused_parameters(self) -> bool:
        """With alternating axes the inactive slice's values get no gradient (DDP must know)."""
        return self.cfg.axis == "alternate"

    def _axes(self) -> list[int]:
        return {"columns": [1], "rows": [0], "alternate": [1, 0]}[self.cfg.axis]

    def setup(self, graph: ModelGraph) -> list[tuple[str, nn.Parameter]]:
        cfg = self.cfg
        if graph.side is not None:
            raise EdgeVitError(f"tuner slicefine: this model runs a frozen backbone under its {graph.side.kind} "
                               f"side module; train it with tuner {graph.side.kind}")
        blocks = cfg.blocks if cfg.blocks is not None else [b.index for b in graph.spec.blocks]
        bad = [b for b in blocks if not 0 <= b < graph.spec.depth]
        if bad:
            raise EdgeVitError(f"tuner.blocks: block {bad[0]} does not exist; the model has 0..{graph.spec.depth - 1}")
        freeze_all(graph.module)
        params: list[tuple[str, nn.Parameter]] = []
        for b in blocks:
            blk = graph.spec.block(b)
            paths = {"qkv": blk.attn.input_projections(), "proj": [blk.attn.proj], "fc1": [blk.mlp.fc1],
                     "fc2": [blk.mlp.fc2]}
            for layer in cfg.layers:
                for path in paths[layer]:
                    lin = graph.module.get_submodule(path)
                    if min(lin.weight.shape) < cfg.rank:
                        raise EdgeVitError(f"tuner.rank: {cfg.rank} is wider than {path} ({tuple(lin.weight.shape)})")
                    sl = _Slice(lin.weight, cfg.rank, self._axes())
                    parametrize.register_parametrization(lin, "weight", sl, unsafe=True)
                    lin.parametrizations.weight.original.requires_grad_(False)
                    self.slices.append((path, lin, sl))
                    params += [(f"{path}.slice.{n}", p) for n, p in sl.named_parameters()]
        n_slice = len(params)
        self.slice_names = frozenset(n for n, _ in params)
        # at any step one axis is active in every matrix (alternate: the same one in all)
        self.sliced = max(sum(sl.rank * lin.parametrizations.weight.original.shape[1 - axis]
                              for _, lin, sl in self.slices) for axis in self._axes())
        if cfg.train_head:
            for path in graph.spec.classifiers:
                head = graph.module.get_submodule(path)
                for n, p in head.named_parameters():
                    p.requires_grad_(True)
                    params.append((f"{path}.{n}", p))
        self.trainable = self.sliced + count(params[n_slice:])
        return params

    @property
    def no_weight_decay(self) -> frozenset[str]:
        """The slices are entries of pretrained weights: decay would pull them toward zero."""
        return self.slice_names

    def _position(self, i: int, lin: nn.Linear, k: int) -> tuple[int, int]:
        """(axis, start) of matrix ``i``'s slice during switch period ``k``."""
        axes = self._axes()
        axis = axes[k % len(axes)]
        starts = _starts(lin.parametrizations.weight.original.shape[axis], self.cfg.rank)
        if self.cfg.order == "sweep":
            return axis, starts[(k // len(axes)) % len(starts)]
        return axis, random.Random(f"{self.cfg.seed}:{i}:{k}").choice(starts)

    def start(self, step: int) -> None:
        """Position every slice for ``step`` (a resumed run's checkpoint already holds the values)."""
        k = step // self.cfg.switch_every
        self.switches = k  # a resumed run has already moved its slices k times
        for i, (_, lin, sl) in enumerate(self.slices):
            sl.axis, sl.start = self._position(i, lin, k)
            if step == 0:
                sl.load(lin.parametrizations.weight.original, sl.axis, sl.start)

    def after_step(self, step: int, optimizer: Any) -> None:
        if (step + 1) % self.cfg.switch_every:
            return
        k = (step + 1) // self.cfg.switch_every
        for i, (_, lin, sl) in enumerate(self.slices):
            original = lin.parametrizations.weight.original
            sl.store(original)  # the trained slice keeps its values and freezes
            axis, start = self._position(i, lin, k)
            sl.load(original, axis, start)
            optimizer.state.pop(sl.values, None)  # a fresh AdamW state for the new slice
        self.switches += 1

    def finish(self, graph: ModelGraph) -> None:
        for _, lin, sl in self.slices:
            sl.store(lin.parametrizations.weight.original)
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        self.slices = []
        unfreeze_all(graph.module)

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {"name": self.name, "trainable_params": self.trainable, "added_params": 0,
                "sliced_params": self.sliced, "rank": c.rank, "axis": c.axis, "switch_every": c.switch_every,
                "order": c.order, "layers": list(c.layers), "switches": self.switches}
