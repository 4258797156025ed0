"""The student: a shrunken copy of the teacher (fewer blocks, heads, MLP units), initialised
from the teacher's weights through the graph's structural edits, or any model source."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.graph.spec import BlockSpec, GraphSpec


class ShrinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int | None = Field(None, ge=1, description="blocks to keep, evenly spaced (default: all)")
    blocks: list[int] | None = Field(None, description="exactly which teacher blocks to keep (instead of depth)")
    num_heads: int | None = Field(None, ge=1, description="attention heads per block (default: the teacher's)")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden size / embed_dim (default: the teacher's)")
    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: keep the chosen blocks/heads/units' weights; random: fresh init"
    )

    @model_validator(mode="after")
    def _depth_or_blocks(self) -> ShrinkConfig:
        if self.depth is not None and self.blocks is not None:
            raise ValueError("give `depth` or `blocks`, not both")
        return self


def _evenly_spaced(n: int, depth: int) -> list[int]:
    """``n`` of ``depth`` blocks including the first and the last."""
    return sorted({int(i) for i in np.round(np.linspace(0, depth - 1, n))}) if n > 1 else [depth - 1]


def _within_stages(spec: GraphSpec, n: int) -> list[int]:
    """``n`` blocks for a model of stages (Swin, MobileViT): each stage keeps its share of ``n``
    (at least one block), evenly spaced inside it, since the stages' widths are fixed."""
    stages: dict[int, list[int]] = {}
    for b in spec.blocks:
        stages.setdefault(b.stage, []).append(b.index)
    if n < len(stages):
        raise EdgeVitError(f"student.shrink.depth: {n} blocks for a model of {len(stages)} stages; keep at least "
                           "one block per stage")
    share = [max(1, round(n * len(ix) / spec.depth)) for ix in stages.values()]
    return sorted(ix[j] for ix, k in zip(stages.values(), share, strict=True)
                  for j in _evenly_spaced(min(k, len(ix)), len(ix)))


def _head_scores(graph: ModelGraph, blk: BlockSpec) -> torch.Tensor:
    """Per head: norm of the value rows that read it times norm of the proj columns it writes."""
    a = blk.attn
    proj = graph.module.get_submodule(a.proj).weight.detach()
    if a.fused:
        qkv = graph.module.get_submodule(a.qkv).weight.detach()
        v = qkv[2 * a.attn_dim: 3 * a.attn_dim]
    else:
        v = graph.module.get_submodule(a.v).weight.detach()
    v_norm = v.reshape(a.num_heads, -1).norm(dim=1)
    p_norm = proj.reshape(proj.shape[0], a.num_heads, a.head_dim).permute(1, 0, 2).reshape(a.num_heads, -1).norm(dim=1)
    return v_norm * p_norm


def _unit_scores(graph: ModelGraph, blk: BlockSpec) -> torch.Tensor:
    """Per unit: norm of the rows that write it (SwiGLU: value and gate) times its fc2 column's."""
    m = blk.mlp
    rows = [graph.module.get_submodule(p).weight.detach() for p in m.unit_rows()]
    if m.fused_gate:
        rows = [rows[0][: m.hidden], rows[0][m.hidden:]]
    fc2 = graph.module.get_submodule(m.fc2).weight.detach()
    return torch.stack([r.norm(dim=1) for r in rows]).prod(dim=0) * fc2.norm(dim=0)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def shrink(teacher: ModelGraph, cfg: ShrinkConfig) -> tuple[ModelGraph, str]:
    """A smaller graph derived from ``teacher`` (left untouched) and a sentence saying how."""
    g = teacher.clone()
    g.detach_side()  # a teacher's side module (LoSA, ...) stays with the teacher; the student is a plain ViT
    depth = g.spec.depth
    if cfg.blocks is not None:
        bad = [b for b in cfg.blocks if not 0 <= b < depth]
        if bad or len(set(cfg.blocks)) != len(cfg.blocks) or not cfg.blocks:
            raise EdgeVitError(f"student.shrink.blocks: give distinct block indices in [0, {depth}), got {cfg.blocks}")
        blocks = sorted(cfg.blocks)
    else:
        n = cfg.depth or depth
        if n > depth:
            raise EdgeVitError(f"student.shrink.depth: {n} is more than the teacher's {depth} blocks")
        staged = len({b.stage for b in g.spec.blocks}) > 1
        blocks = _within_stages(g.spec, n) if staged else _evenly_spaced(n, depth)
    if blocks != list(range(depth)):
        g.keep_blocks(blocks)
    heads_kept, units_kept = [], []
    for blk in list(g.spec.blocks):
        h = cfg.num_heads or blk.attn.num_heads
        if h > blk.attn.num_heads:
            raise EdgeVitError(f"student.shrink.num_heads: {h} is more than the teacher's {blk.attn.num_heads}")
        if h < blk.attn.num_heads:
            g.keep_heads(blk.index, _top(_head_scores(g, blk), h))
        u = round(cfg.mlp_ratio * blk.dim) if cfg.mlp_ratio else blk.mlp.hidden
        if not 1 <= u <= blk.mlp.hidden:
            raise EdgeVitError(
                f"student.shrink.mlp_ratio: {cfg.mlp_ratio} gives {u} hidden units; the teacher has {blk.mlp.hidden}"
            )
        if u < blk.mlp.hidden:
            g.keep_mlp_units(blk.index, _top(_unit_scores(g, blk), u))
        heads_kept.append(g.spec.block(blk.index).attn.num_heads)
        units_kept.append(g.spec.block(blk.index).mlp.hidden)
    if cfg.init == "random":
        g = _fresh(g)
    how = (
        f"shrunk from the teacher: blocks {blocks} of {depth}, {heads_kept[0]} heads and {units_kept[0]} MLP units "
        f"per block; " + ("weights of the kept blocks, heads (value·proj norm) and units (fc1·fc2 norm)"
                          if cfg.init == "teacher" else "random init")
    )
    return g, how


def _fresh(g: ModelGraph) -> ModelGraph:
    """The same architecture with the family's own fresh initialisation."""
    fresh = ModelGraph.rebuild(g.adapter, g.build or {}, g.edits, mean=g.spec.mean, std=g.spec.std,
                               registry=g.registry)
    fresh.spec = g.spec.model_copy(deep=True)
    fresh.history = list(g.history)
    return fresh


def build_student(incoming: ModelGraph, model_graph: ModelGraph, num_classes: int) -> tuple[ModelGraph, str]:
    """A student loaded from a model source: it must read the same images as the data."""
    s, t = model_graph.spec, incoming.spec
    if tuple(s.img_size) != tuple(t.img_size) or s.in_chans != t.in_chans:
        raise EdgeVitError(
            f"student.model: takes {s.in_chans}x{s.img_size[0]}x{s.img_size[1]} images but the data is prepared "
            f"at {t.in_chans}x{t.img_size[0]}x{t.img_size[1]} for the input model; set the student's img_size to match"
        )
    g = model_graph
    g.spec = g.spec.model_copy(update={"mean": t.mean, "std": t.std})
    how = f"built from the model source {g.describe_build()}"
    if s.num_classes != num_classes:
        g.reset_classifier(num_classes)
        how += f", new {num_classes}-class head"
    g.history = list(incoming.history)
    return g, how
