"""The prunable groups of a block, read from the graph spec: a head is its q/k/v rows plus
its head_dim columns of the output projection; an MLP unit is an fc1 row (+ bias) plus an
fc2 column."""

from __future__ import annotations

import torch
from torch import nn

from edgevit.graph import ModelGraph
from edgevit.graph.spec import BlockSpec


def head_columns(blk: BlockSpec) -> torch.Tensor:
    """(num_heads, head_dim) indices of the output projection's input columns."""
    a = blk.attn
    return torch.arange(a.attn_dim).reshape(a.num_heads, a.head_dim)


def unit_columns(blk: BlockSpec) -> torch.Tensor:
    return torch.arange(blk.mlp.hidden).reshape(-1, 1)


def head_tensors(graph: ModelGraph, blk: BlockSpec) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """(parameter, dim, index per head (num_heads, k)) for every weight a head owns."""
    a = blk.attn
    cols = head_columns(blk)
    out = []
    producers = ([(a.qkv, s) for s in range(3)] if a.fused else [(p, 0) for p in (a.q, a.k, a.v)])
    for path, part in producers:
        lin = graph.module.get_submodule(path)
        rows = cols + part * a.attn_dim
        out.append((lin.weight, 0, rows))
        if lin.bias is not None:
            out.append((lin.bias, 0, rows))
    out.append((graph.module.get_submodule(a.proj).weight, 1, cols))
    attn = graph.module.get_submodule(a.path)
    for name in ("q_bias", "v_bias"):  # BEiT / EVA / Swin v2 keep q and v biases beside a bias-free qkv
        bias = getattr(attn, name, None)
        if isinstance(bias, nn.Parameter):
            out.append((bias, 0, cols))
    return out


def unit_tensors(graph: ModelGraph, blk: BlockSpec) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """A unit: its fc1 row (SwiGLU: its value and gate rows) and its fc2 column."""
    m = blk.mlp
    cols = unit_columns(blk)
    rows = torch.cat([cols, cols + m.hidden], dim=1) if m.fused_gate else cols
    out = [(graph.module.get_submodule(m.fc2).weight, 1, cols)]
    for path in m.unit_rows():
        lin = graph.module.get_submodule(path)
        out.append((lin.weight, 0, rows if path == m.fc1 else cols))
        if lin.bias is not None:
            out.append((lin.bias, 0, rows if path == m.fc1 else cols))
    return out


def group_reduce(tensors: list[tuple[torch.Tensor, int, torch.Tensor]], fn) -> torch.Tensor:  # noqa: ANN001
    """Sum ``fn(slice)`` over every tensor a group owns; one value per group."""
    total = None
    for t, dim, idx in tensors:
        picked = t.detach().index_select(dim, idx.reshape(-1))
        picked = picked.movedim(dim, 0).reshape(idx.shape[0], idx.shape[1], -1) if picked.ndim > 1 else \
            picked.reshape(idx.shape[0], idx.shape[1], 1)
        v = fn(picked)
        total = v if total is None else total + v
    assert total is not None
    return total
