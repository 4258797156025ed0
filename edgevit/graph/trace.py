"""Shapes a spec cannot read from module attributes alone: the tokens each block sees and the
fixed parts between blocks, from one forward pass on zeros at batch 1.

The parts no edit changes are measured here once (their shapes and multiply-accumulates); the
blocks' own cost stays analytic in :mod:`edgevit.graph.cost`, so it follows every edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgevit.graph.spec import BlockSpec, FixedSpec, GraphSpec

# (block, its input shape at batch 1) -> (attention groups per image, tokens per group)
Groups = Callable[[BlockSpec, tuple[int, ...]], tuple[int, int]]


def token_groups(_blk: BlockSpec, shape: tuple[int, ...]) -> tuple[int, int]:
    """(B*groups, N, C) inputs: a plain ViT (one group) or MobileViT (one per patch position)."""
    return shape[0], math.prod(shape[1:-1])


def fixed_paths(module: nn.Module, taken: list[str]) -> list[str]:
    """The largest submodules holding parameters that contain no block and no classifier."""
    out: list[str] = []

    def walk(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            p = f"{prefix}.{name}" if prefix else name
            if p in taken:
                continue
            if any(t.startswith(p + ".") for t in taken):
                walk(p, child)
            elif next(child.parameters(), None) is not None:
                out.append(p)

    walk("", module)
    return out


def _leaf_macs(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return 0


def complete(spec: GraphSpec, module: nn.Module, groups: Groups = token_groups) -> GraphSpec:
    """``spec`` with each block's width, tokens and attention groups filled in and the fixed parts
    listed; one forward at batch 1 in eval mode (the module's train/eval state is restored)."""
    taken = [b.path for b in spec.blocks] + list(spec.classifiers)
    if spec.decoder is not None:  # a decode head is costed from its own spec (edgevit.graph.cost)
        taken.append(spec.decoder.path)
    parts = fixed_paths(module, taken)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    macs = dict.fromkeys(parts, 0)
    handles = []

    def record(path: str) -> Any:
        def hook(_m: nn.Module, args: tuple, out: Any) -> None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            shapes.setdefault(path, (tuple(args[0].shape), tuple(first.shape)))
        return hook

    def count(path: str) -> Any:
        def hook(m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            macs[path] += _leaf_macs(m, out)
        return hook

    for path in [b.path for b in spec.blocks] + parts:
        handles.append(module.get_submodule(path).register_forward_hook(record(path)))
    for path in parts:
        for leaf in module.get_submodule(path).modules():
            if isinstance(leaf, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                handles.append(leaf.register_forward_hook(count(path)))
    modes = {m: m.training for m in module.modules()}
    p = next(module.parameters())
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, spec.in_chans, *spec.img_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    blocks = []
    for b in spec.blocks:
        shape = shapes[b.path][0]
        windows, per = groups(b, shape)
        attn = b.attn.model_copy(update={"windows": windows, "window_tokens": per})
        blocks.append(b.model_copy(update={"dim": shape[-1], "tokens": shape[0] * math.prod(shape[1:-1]),
                                           "attn": attn}))
    fixed = [FixedSpec(path=q, module=type(module.get_submodule(q)).__name__, in_shape=list(shapes[q][0][1:]),
                       out_shape=list(shapes[q][1][1:]), macs=macs[q]) for q in parts if q in shapes]
    return spec.model_copy(update={"blocks": blocks, "fixed": fixed})
