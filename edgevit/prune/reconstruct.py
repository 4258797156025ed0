"""OSSCAR over a whole model: block by block, each on the tokens the already-pruned blocks
produce. Within a block the heads are chosen on the output projection's inputs first, then
the MLP units on fc2's inputs as the pruned attention leaves them.

A block's cached input is its call's positional and keyword arguments (EVA's rotary embedding,
BEiT's shared bias travel with the tokens). Within a stage the next block reads the previous
block's output; where a stage changes (Swin patch merging, MobileViT's fold, convs and
MobileNetV2 blocks) the next block's inputs are captured afresh through the pruned model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from edgevit.graph import ModelGraph
from edgevit.prune.groups import head_columns, unit_columns
from edgevit.prune.osscar import GramAccumulator, OsscarResult, osscar_prune

BlockInput = tuple[tuple, dict]  # (args, kwargs) of one call of a block


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once a block's input is captured."""


def _detached(v: object) -> object:
    return v.detach() if isinstance(v, torch.Tensor) else v


def block0_inputs(graph: ModelGraph, images: torch.Tensor, device: torch.device, batch: int) -> list[BlockInput]:
    """The inputs entering the first block, per chunk of ``images``."""
    return block_inputs(graph, images, device, batch, 0)


def block_inputs(graph: ModelGraph, images: torch.Tensor, device: torch.device, batch: int,
                 index: int) -> list[BlockInput]:
    """The inputs entering block ``index``, per chunk of ``images`` (the forward stops there)."""
    block = graph.module.get_submodule(graph.spec.block(index).path)
    out: list[BlockInput] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        out.append((tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}))
        raise _Reached

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                with suppress(_Reached):
                    graph.module(images[start:start + batch].to(device))
    finally:
        handle.remove()
    return out


def run_block(block: nn.Module, xs: list[BlockInput]) -> list[BlockInput]:
    """Run ``block`` on its cached inputs; the outputs as the next block's inputs (same extras)."""
    with torch.no_grad():
        outs = [block(*args, **kwargs) for args, kwargs in xs]
    return [((o[0] if isinstance(o, (tuple, list)) else o, *args[1:]), kwargs)
            for o, (args, kwargs) in zip(outs, xs, strict=True)]


@contextmanager
def _gram_of(linear: nn.Module) -> Iterator[GramAccumulator]:
    acc = GramAccumulator(linear.in_features, linear.weight.device)  # where the run's model is
    handle = linear.register_forward_pre_hook(lambda _m, args: acc.add(args[0]))
    try:
        yield acc
    finally:
        handle.remove()


@dataclass(frozen=True)
class SearchSizes:
    """OSSCAR's step sizes for one kind of group: dropped per greedy step, swapped at first."""

    greedy_step: int
    swap_size: int


HEAD_SIZES = SearchSizes(greedy_step=2, swap_size=5)  # the official code's, per attention head
UNIT_SIZES = SearchSizes(greedy_step=10, swap_size=10)  # and per MLP unit


def refit_layer(graph: ModelGraph, path: str, block: nn.Module, xs: list[BlockInput], groups: torch.Tensor,
                keep: int, ridge: float, swap_budget: int,
                sizes: SearchSizes = UNIT_SIZES) -> tuple[OsscarResult, torch.Tensor]:
    """Choose ``keep`` groups of ``path``'s input columns and write the re-fitted weights (and
    bias) into the full-width layer; returns the result and the layer's Gram matrix (both on
    the layer's device, float64)."""
    linear = graph.module.get_submodule(path)
    with _gram_of(linear) as acc:
        run_block(block, xs)
    d = linear.in_features
    has_bias = linear.bias is not None
    h = acc.gram(ridge, bias=has_bias)
    w_hat = linear.weight.detach().T.double()
    if has_bias:
        w_hat = torch.cat([w_hat, linear.bias.detach().double()[None]], dim=0)
    res = osscar_prune(h, w_hat, groups, keep, fixed=torch.tensor([d]) if has_bias else None,
                       swap_budget=swap_budget, greedy_step=sizes.greedy_step, swap_size=sizes.swap_size)
    cols = groups[res.keep].reshape(-1)
    weight = torch.zeros_like(linear.weight, dtype=torch.float64)
    weight[:, cols] = res.weight[: len(cols)].T.to(weight.device)
    graph.assign_linear(path, weight, res.weight[len(cols)] if has_bias else None)
    return res, h


def osscar_model(graph: ModelGraph, counts: list[tuple[int, int]], images: torch.Tensor, device: torch.device,
                 ridge: float = 1e-2, swap_budget: int = 30, batch: int = 32,
                 progress=None, head_sizes: SearchSizes = HEAD_SIZES,  # noqa: ANN001
                 unit_sizes: SearchSizes = UNIT_SIZES) -> list[dict]:
    """Prune every block to ``counts`` (heads, units) in order; per-block log. Gram matrices
    and solves run on ``device`` in float64."""
    graph.module.to(device).eval()
    xs = block0_inputs(graph, images, device, batch)
    log = []
    stage = graph.spec.block(0).stage
    for blk_spec, (n_heads, n_units) in zip(list(graph.spec.blocks), counts, strict=True):
        t0 = time.perf_counter()
        b = blk_spec.index
        if blk_spec.stage != stage:  # fixed parts in between: capture through the model pruned so far
            xs, stage = block_inputs(graph, images, device, batch, b), blk_spec.stage
        block = graph.module.get_submodule(blk_spec.path)
        entry: dict = {"block": b}
        if n_heads < blk_spec.attn.num_heads:
            res, _ = refit_layer(graph, blk_spec.attn.proj, block, xs, head_columns(blk_spec), n_heads, ridge,
                                 swap_budget, head_sizes)
            graph.keep_heads(b, res.keep)
            entry.update(heads_kept=res.keep, heads_objective=res.objective, heads_swaps=res.swaps)
        spec = graph.spec.block(b)
        if n_units < spec.mlp.hidden:
            res, _ = refit_layer(graph, spec.mlp.fc2, block, xs, unit_columns(spec), n_units, ridge, swap_budget,
                                 unit_sizes)
            graph.keep_mlp_units(b, res.keep)
            entry.update(units_kept=len(res.keep), units_objective=res.objective, units_swaps=res.swaps,
                         units_greedy_objective=res.greedy_objective)
        xs = run_block(block, xs)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        log.append(entry)
        if progress is not None:
            progress()
    return log
