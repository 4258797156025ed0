"""losa (Mercea et al., CVPR 2024, arXiv 2402.02887): low-rank side adaptation.

The backbone is frozen and never back-propagated through: its block outputs are read as
constants (:class:`edgevit.graph.extension.TunedModel` runs it under ``no_grad``). A parallel
side network refines a side state block by block from those features with low-rank mixers
that alternate a channel MLP (D → rank → D) and a token MLP (N → token_rank → N); a new
norm and head read the refined features. Only the side network and its head train.

What the paper fixes (abstract, Fig. 3): frozen backbone without backpropagation, a parallel
network that iteratively refines the backbone's features, low-rank mixers alternating
channel and token dimensions. What it does not say in any text we could read, and is our
choice here: the side state starts at zero and is updated as
``a_i = a_{i-1} + C_i(u) + T_i(u + C_i(u))`` with ``u = z_i + a_{i-1}`` (z_i: block i's
output); each mixer is LayerNorm → Linear → GELU → Linear with the up-projection zero-
initialised (so training starts as a linear probe of the last block); the head reads
``LayerNorm(pool(z_L + a_L))`` with the backbone's pooling (class token or mean).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from edgevit.graph import ModelGraph
from edgevit.graph.extension import BlockFeatures, SideModule
from edgevit.graph.spec import GraphSpec
from edgevit.tuners.base import Tuner, TunerConfigBase, count, train_side_only


class LoSAConfig(TunerConfigBase):
    name: Literal["losa"]
    rank: int = Field(16, ge=1, description="channel bottleneck of each mixer (D → rank → D)")
    token_rank: int = Field(8, ge=1, description="token bottleneck of each mixer (N → token_rank → N)")
    every: int = Field(1, ge=1, description="read every k-th block's output (the last block always)")


class _LowRank(nn.Module):
    """LayerNorm → Linear(n → rank) → GELU → Linear(rank → n), up-projection zero-initialised."""

    def __init__(self, norm_dim: int, n: int, rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(norm_dim)
        self.down = nn.Linear(n, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, n)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


class _Mixer(nn.Module):
    def __init__(self, dim: int, tokens: int, rank: int, token_rank: int) -> None:
        super().__init__()
        self.channel = _LowRank(dim, dim, rank)
        self.token = _LowRank(dim, tokens, token_rank)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The update to the side state: channel mixing, then token mixing of its result."""
        c = self.channel
        dc = c.up(c.act(c.down(c.norm(u))))
        h = u + dc
        t = self.token
        dt = t.up(t.act(t.down(t.norm(h).transpose(1, 2)))).transpose(1, 2)
        return dc + dt


class SideNetwork(SideModule):
    kind = "losa"

    def __init__(self, spec: GraphSpec, num_classes: int, rank: int, token_rank: int, every: int) -> None:
        super().__init__()
        d, n = spec.embed_dim, spec.num_tokens
        self.config = {"num_classes": num_classes, "rank": rank, "token_rank": token_rank, "every": every}
        self.reads_ = [i for i in range(spec.depth) if (i + 1) % every == 0 or i == spec.depth - 1]
        self.mixers = nn.ModuleList(_Mixer(d, n, rank, token_rank) for _ in self.reads_)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        self.pool = spec.pool
        self.prefix = spec.num_prefix_tokens

    @classmethod
    def from_config(cls, config: dict[str, Any], spec: GraphSpec) -> SideNetwork:
        return cls(spec, **config)

    def refine(self, feats: list[BlockFeatures]) -> torch.Tensor:
        """The refined side features z_L + a_L, (B, N, D): every read block's output refines
        the side state in turn."""
        a = None
        z = None
        for i, mixer in zip(self.reads_, self.mixers, strict=True):
            z = feats[i].output
            assert z is not None
            u = z if a is None else z + a
            delta = mixer(u)
            a = delta if a is None else a + delta
        assert z is not None and a is not None
        return z + a

    def forward(self, feats: list[BlockFeatures], spec: GraphSpec, backbone: nn.Module) -> torch.Tensor:
        x = self.refine(feats)
        pooled = x[:, 0] if self.pool == "token" else x[:, self.prefix:].mean(dim=1)
        return self.head(self.norm(pooled))

    def reads(self, spec: GraphSpec) -> list[int]:
        return list(self.reads_)

    def macs(self, spec: GraphSpec) -> int:
        d, n = spec.embed_dim, spec.num_tokens
        per = sum(2 * n * d * m.channel.down.out_features + 2 * d * n * m.token.down.out_features
                  for m in self.mixers)
        return per + d * self.head.out_features


class LoSATuner(Tuner):
    name = "losa"
    Config = LoSAConfig
    side = SideNetwork.kind

    def __init__(self, cfg: LoSAConfig) -> None:
        self.cfg = cfg
        self.trainable = self.added = 0

    def setup(self, graph: ModelGraph) -> list[tuple[str, nn.Parameter]]:
        if graph.side is None:
            c = self.cfg
            side = SideNetwork(graph.spec, graph.spec.num_classes, c.rank, c.token_rank, c.every)
            graph.attach_side(side, side.config)
        params = train_side_only(graph, self.name)
        self.trainable = self.added = count(params)
        return params

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {"name": self.name, "trainable_params": self.trainable, "added_params": self.added,
                "rank": c.rank, "token_rank": c.token_rank, "every": c.every}
