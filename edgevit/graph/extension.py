"""A frozen backbone with a trainable side module (LoSA's side network, disentangled query
synthesis + knowledge extraction), as one ``nn.Module`` whose forward gives logits.

The backbone runs under ``torch.no_grad()``: its per-block inputs, outputs and attention
projections are read with forward hooks and handed to the side module as constants, so no
backward graph is ever built through it. Dotted paths of the backbone resolve on the wrapper
unchanged (``blocks.0.attn.qkv``), so the spec and every structural edit keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgevit.graph.spec import GraphSpec


@dataclass
class BlockFeatures:
    """What one frozen block saw and produced, for the side module."""

    input: torch.Tensor | None = None  # (B, N, D), the block's input tokens
    output: torch.Tensor | None = None  # (B, N, D)
    projections: dict[str, torch.Tensor] = field(default_factory=dict)  # spec path → qkv / q / k / v output


class SideModule(nn.Module):
    """Base of side modules: built from (config, spec), reads BlockFeatures, returns logits."""

    kind: str = ""
    needs_projections = False  # True: the block's q/k/v projection outputs are read (kept alive)

    def reads(self, spec: GraphSpec) -> list[int]:
        """The blocks whose features this module reads (the others are not kept)."""
        return [b.index for b in spec.blocks]

    def forward(self, feats: list[BlockFeatures], spec: GraphSpec, backbone: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def macs(self, spec: GraphSpec) -> int:
        """Multiply-accumulates at batch 1 (for the cost model)."""
        raise NotImplementedError


class TunedModel(nn.Module):
    def __init__(self, backbone: nn.Module, side: SideModule, spec: GraphSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.side = side
        self.spec = spec  # the backbone's spec (paths, heads); refreshed by ModelGraph after edits

    def get_submodule(self, target: str) -> nn.Module:
        """Backbone paths resolve as they would on the backbone itself."""
        if target == "" or target.split(".", 1)[0] in ("backbone", "side"):
            return super().get_submodule(target)
        return self.backbone.get_submodule(target)

    def train(self, mode: bool = True) -> TunedModel:
        """The frozen backbone always computes in eval mode (no dropout or drop-path on features)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = [BlockFeatures() for _ in self.spec.blocks]
        handles = []
        wanted = set(self.side.reads(self.spec))
        for f, blk in zip(feats, self.spec.blocks, strict=True):
            if blk.index not in wanted:
                continue
            mod = self.backbone.get_submodule(blk.path)
            handles.append(mod.register_forward_pre_hook(_pre(f)))
            handles.append(mod.register_forward_hook(_post(f)))
            if self.side.needs_projections:
                for path in blk.attn.input_projections():
                    lin = self.backbone.get_submodule(path)
                    handles.append(lin.register_forward_hook(_proj(f, path)))
        try:
            with torch.no_grad():
                self.backbone(images)
        finally:
            for h in handles:
                h.remove()
        return self.side(feats, self.spec, self.backbone)


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _pre(f: BlockFeatures) -> Any:
    def hook(_m: nn.Module, args: tuple) -> None:
        f.input = _first(args)
    return hook


def _post(f: BlockFeatures) -> Any:
    def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
        f.output = _first(out)
    return hook


def _proj(f: BlockFeatures, name: str) -> Any:
    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        f.projections[name] = out
    return hook
