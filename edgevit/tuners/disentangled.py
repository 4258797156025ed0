"""disentangled (Zhang et al., ECCV 2024, arXiv 2407.06964; official code taolinzhang/SynQT):
query synthesis + knowledge extraction.

Per block i, a Query Synthesis Module turns learnable query tokens (plus the previous
layer's extracted query) into task queries: an adapter, then self-attention among the
queries only (q/k/v/out as identity + low-rank adapters), then an adapter FFN, each branch
scaled by a learnable scalar. A Knowledge Extraction Module then runs the queries through
block i's own frozen modules: norm1, the query rows of the q/k/v projection, attention to
the image tokens' frozen keys and values (read from the backbone's pass, never recomputed),
the output projection, norm2 and the block's own MLP module (its activation, whatever it
is), with the family's layer scale and query/key norms where it has them (the family
adapter's ``block_branches`` names those modules). Image tokens never see the queries, so the
backbone computes exactly what the pretrained model computes, under ``no_grad``. The head
combines every layer's extracted query, attention and MLP outputs with instance-conditioned
weights, then a LayerNorm and a linear classifier. Only the query modules and the head train.

Sizes and defaults follow the official code (adapter width 48, rank 8 in the query
self-attention, 4 queries, branch scales 0.1, dropout 0.1, drop-path 0.3 in the head); the
official head norm is copied from the backbone's final norm, here it starts as a fresh
LayerNorm because the spec does not name the final norm.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.graph.adapters.base import BlockBranches
from edgevit.graph.extension import BlockFeatures, SideModule
from edgevit.graph.spec import BlockSpec, GraphSpec
from edgevit.tuners.base import Tuner, TunerConfigBase, count, train_side_only


class DisentangledConfig(TunerConfigBase):
    name: Literal["disentangled"]
    num_queries: int = Field(4, ge=1, description="learnable query tokens per layer")
    adapter_dim: int = Field(48, ge=1, description="bottleneck of the query adapters and the head adapter")
    attn_rank: int = Field(8, ge=1, description="bottleneck of the q/k/v/out adapters in query self-attention")
    attn_scale: float = 0.1
    ffn_scale: float = 0.1
    feat_scale: float = 0.1
    dropout: float = Field(0.1, ge=0, lt=1)
    head_drop_path: float = Field(0.3, ge=0, lt=1)


class _Adapter(nn.Module):
    """x + fc2(dropout(GELU(fc1(x)))), the official code's residual bottleneck."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class _QuerySynthesis(nn.Module):
    """Self-attention among the queries only (single head), then an adapter FFN."""

    def __init__(self, dim: int, cfg: DisentangledConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_norm, self.kv_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (_Adapter(dim, cfg.attn_rank) for _ in range(4))
        self.ffn = _Adapter(dim, cfg.adapter_dim, cfg.dropout)
        self.attn_scale = nn.Parameter(torch.tensor(cfg.attn_scale))
        self.ffn_scale = nn.Parameter(torch.tensor(cfg.ffn_scale))
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = dim ** -0.5

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        u = self.norm1(p)
        q, kv = self.q_norm(u), self.kv_norm(u)
        q, k, v = self.q(q), self.k(kv), self.v(kv)
        a = self.drop((q @ k.transpose(1, 2) * self.scale).softmax(dim=-1))
        p = p + self.attn_scale * self.drop(self.out(a @ v))
        return p + self.ffn_scale * self.ffn(self.norm2(p))


def _extract(p: torch.Tensor, blk: BlockSpec, f: BlockFeatures, parts: BlockBranches,
             backbone: nn.Module) -> tuple[torch.Tensor, ...]:
    """Knowledge extraction through block ``blk``'s own frozen modules: (queries out, attention
    out, MLP out). The queries attend to the image tokens' keys and values only."""
    a = blk.attn
    sub = backbone.get_submodule
    n1 = sub(blk.norm1)(p)  # type: ignore[arg-type]
    if a.fused:  # the query rows of the block's own q/k/v projection
        qkv = sub(a.qkv)  # type: ignore[arg-type]
        q = F.linear(n1, qkv.weight[: a.attn_dim], None if qkv.bias is None else qkv.bias[: a.attn_dim])
        img = f.projections[a.qkv]  # type: ignore[index]
        k, v = img[..., a.attn_dim: 2 * a.attn_dim], img[..., 2 * a.attn_dim:]
    else:
        q = sub(a.q)(n1)  # type: ignore[arg-type]
        k, v = f.projections[a.k], f.projections[a.v]  # type: ignore[index]
    b, t, n = p.shape[0], p.shape[1], k.shape[1]
    q = parts.q_norm(q.reshape(b, t, a.num_heads, a.head_dim).transpose(1, 2))
    k = parts.k_norm(k.reshape(b, n, a.num_heads, a.head_dim).transpose(1, 2))
    v = v.reshape(b, n, a.num_heads, a.head_dim).transpose(1, 2)
    attn = (q @ k.transpose(-2, -1) * a.head_dim ** -0.5).softmax(dim=-1)
    heads = (attn @ v).transpose(1, 2).reshape(b, t, a.attn_dim)
    h = parts.attn_scale(sub(a.proj)(parts.attn_norm(heads)))
    p = p + h
    hh = parts.mlp_scale(parts.mlp(sub(blk.norm2)(p)))  # type: ignore[arg-type]
    return p + hh, h, hh


class QueryExtraction(SideModule):
    kind = "disentangled"
    needs_projections = True  # the image tokens' keys and values, per block

    def __init__(self, spec: GraphSpec, num_classes: int, cfg: DisentangledConfig) -> None:
        super().__init__()
        d, depth = spec.embed_dim, spec.depth
        self.config = {"num_classes": num_classes, **cfg.model_dump(exclude={"name"})}
        self.cfg = cfg
        self.queries = nn.Parameter(torch.empty(depth, cfg.num_queries, d).uniform_(-1, 1))
        self.query_ffn = nn.ModuleList(_Adapter(d, cfg.adapter_dim, cfg.dropout) for _ in range(depth))
        self.synthesis = nn.ModuleList(_QuerySynthesis(d, cfg) for _ in range(depth))
        self.feat_scale = nn.Parameter(torch.tensor(cfg.feat_scale))
        self.drop = nn.Dropout(cfg.dropout)
        n_feats = 3 * depth + 1
        self.out_norm = nn.LayerNorm(d)
        self.out_adapter = _Adapter(d, cfg.adapter_dim, cfg.dropout)
        self.combine = nn.Linear(d, n_feats - 1)
        self.head_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        self._adapter: Any = None  # the backbone's family adapter, found on the first forward

    @classmethod
    def from_config(cls, config: dict[str, Any], spec: GraphSpec) -> QueryExtraction:
        config = dict(config)
        num_classes = config.pop("num_classes")
        return cls(spec, num_classes, DisentangledConfig(name="disentangled", **config))

    def _branches(self, spec: GraphSpec, backbone: nn.Module) -> list[BlockBranches]:
        """Each block's own modules, as the backbone's family adapter names them (looked up
        once; the modules themselves are read afresh, as pruning may replace them)."""
        if self._adapter is None:
            from edgevit.registry import Registry

            self._adapter = Registry().adapter_for(backbone)
        return [self._adapter.block_branches(backbone, blk) for blk in spec.blocks]

    def forward(self, feats: list[BlockFeatures], spec: GraphSpec, backbone: nn.Module) -> torch.Tensor:
        b = feats[0].output.shape[0]  # type: ignore[union-attr]
        extracted, attn_out, mlp_out = [], [], []
        prev = None
        branches = self._branches(spec, backbone)
        for i, (blk, f) in enumerate(zip(spec.blocks, feats, strict=True)):
            p = self.queries[i].unsqueeze(0).expand(b, -1, -1)
            p = self.query_ffn[i](p if prev is None else p + self.feat_scale * prev)
            p = self.drop(self.synthesis[i](p))
            p, h, hh = _extract(p, blk, f, branches[i], backbone)
            prev = p.mean(dim=1, keepdim=True)
            extracted.append(prev)
            attn_out.append(h.mean(dim=1, keepdim=True))
            mlp_out.append(hh.mean(dim=1, keepdim=True))
        x = torch.cat([extracted[-1], *extracted, *attn_out, *mlp_out], dim=1)  # (B, 3L + 1, D)
        x = x + self.out_adapter(self.out_norm(x))
        if self.training and self.cfg.head_drop_path > 0:  # whole-feature drop-path, all but the first
            keep = 1 - self.cfg.head_drop_path
            mask = torch.rand(b, x.shape[1], 1, device=x.device) < keep
            mask[:, 0] = True
            scale = torch.ones_like(mask, dtype=x.dtype)
            scale[:, 1:] = 1 / keep
            x = x * mask * scale
        w = torch.tanh(self.drop(F.gelu(self.combine(x[:, 0]))))  # instance-conditioned weights
        w = torch.cat([torch.ones_like(w[:, :1]), w], dim=1).unsqueeze(-1)
        return self.head(self.head_norm((w * x).mean(dim=1)))

    def macs(self, spec: GraphSpec) -> int:
        d, t, n, c = spec.embed_dim, self.cfg.num_queries, spec.num_tokens, self.cfg
        total = 0
        for blk in spec.blocks:
            a = blk.attn
            total += 2 * t * d * c.adapter_dim  # query adapter
            total += 4 * 2 * t * d * c.attn_rank + 2 * t * t * d + 2 * t * d * c.adapter_dim  # synthesis
            total += t * d * a.attn_dim + 2 * t * n * a.attn_dim + t * a.attn_dim * d  # extraction: q, attention, proj
            total += 2 * t * d * blk.mlp.hidden  # extraction: the block's MLP
        feats = 3 * spec.depth + 1
        return total + feats * 2 * d * c.adapter_dim + d * (feats - 1) + d * self.head.out_features


class DisentangledTuner(Tuner):
    name = "disentangled"
    Config = DisentangledConfig
    side = QueryExtraction.kind

    def __init__(self, cfg: DisentangledConfig) -> None:
        self.cfg = cfg
        self.trainable = self.added = 0

    def setup(self, graph: ModelGraph) -> list[tuple[str, nn.Parameter]]:
        if graph.side is None:
            missing = [b.index for b in graph.spec.blocks if b.norm1 is None or b.norm2 is None]
            if missing:
                raise EdgeVitError("tuner disentangled: the model's spec names no LayerNorms for block "
                                   f"{missing[0]} (saved by an older edgevit?); rebuild it from its source")
            for b in graph.spec.blocks:  # the family can run queries through each block (or says why not)
                try:
                    graph.adapter.block_branches(graph.backbone, b)
                except EdgeVitError as e:
                    raise EdgeVitError(f"tuner disentangled: {e}") from e
            side = QueryExtraction(graph.spec, graph.spec.num_classes, self.cfg)
            side._adapter = graph.adapter
            graph.attach_side(side, side.config)
        params = train_side_only(graph, self.name)
        self.trainable = self.added = count(params)
        return params

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {"name": self.name, "trainable_params": self.trainable, "added_params": self.added,
                "num_queries": c.num_queries, "adapter_dim": c.adapter_dim}
