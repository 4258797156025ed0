"""timm ``SwinTransformer`` (v1) and ``SwinTransformerV2``: stages of windowed blocks.

Each block attends inside non-overlapping windows (shifted every other block); patch merging
between stages is a fixed part. v1 keeps a relative position bias table with one column per
head. v2 differs only in its attention: a small MLP whose last layer has one output per head
computes the bias, cosine attention is scaled by one learned logit scale per head (both sliced
with the head), and q/v biases sit beside a bias-free qkv; its adapter overrides just that.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import build_timm, timm_mean_std
from edgevit.graph.adapters.timm_attention import TimmAdapter, keep_heads
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete


def _windows(blk_module: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(B, H, W, C) input: windows of window_size, the map padded up to whole windows."""
    _, h, w, _ = shape
    wh, ww = blk_module.window_size
    return math.ceil(h / wh) * math.ceil(w / ww), wh * ww


class TimmSwinAdapter(TimmAdapter):
    name = "timm_swin"
    supports = "timm SwinTransformer"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(module, SwinTransformer)

    def timm_classes(self) -> dict[str, type[nn.Module]]:
        from timm.models.swin_transformer import SwinTransformer

        return {"SwinTransformer": SwinTransformer}

    def position_bias(self, p: str, attn: nn.Module) -> dict[str, Any]:
        """The AttentionSpec fields of the window attention's position bias: v1's table."""
        return {"kind": "window", "bias_table": f"{p}.attn.relative_position_bias_table",
                "bias_rows": attn.relative_position_bias_table.shape[0]}

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        from timm.layers import Mlp

        what = type(module).__name__
        blocks, where = [], {}
        for s, stage in enumerate(module.layers):
            for j, blk in enumerate(stage.blocks):
                p = f"layers.{s}.blocks.{j}"
                a, mlp = blk.attn, blk.mlp
                if type(mlp) is not Mlp:
                    raise EdgeVitError(f"model: {what} block {p} has a {type(mlp).__name__} MLP; edgevit "
                                       "supports timm's Mlp in Swin blocks")
                attn = AttentionSpec(path=f"{p}.attn", qkv=f"{p}.attn.qkv", proj=f"{p}.attn.proj",
                                     num_heads=a.num_heads, head_dim=a.qkv.out_features // 3 // a.num_heads,
                                     **self.position_bias(p, a))
                blocks.append(BlockSpec(
                    index=len(blocks), path=p, attn=attn, stage=s, norm1=f"{p}.norm1", norm2=f"{p}.norm2",
                    mlp=MlpSpec(path=f"{p}.mlp", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2", hidden=mlp.fc1.out_features),
                ))
                where[p] = blk
        pe = module.patch_embed
        m, sd = timm_mean_std(module, mean, std)
        spec = GraphSpec(
            family=self.name, embed_dim=pe.proj.out_channels, img_size=tuple(pe.img_size),
            patch_size=tuple(pe.patch_size), in_chans=pe.proj.in_channels, mean=m, std=sd,
            num_classes=module.num_classes, num_prefix_tokens=0, pool="avg", patch_embed="patch_embed",
            classifiers=["head.fc"], blocks=blocks,
        )
        return complete(spec, module, lambda b, shape: _windows(where[b.path], shape))

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        return build_timm(recipe, self.timm_classes())

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        attn.num_heads = int(channels.numel()) // spec.head_dim  # v1's forward reshapes to what qkv gives

    def feature_map(self, output: torch.Tensor, blk: BlockSpec, spec: GraphSpec, batch: int) -> torch.Tensor:
        """Swin blocks read and write (B, H, W, C) maps."""
        return output.permute(0, 3, 1, 2)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        keep, i = set(blocks), 0
        kept_per_stage = []
        for stage in module.layers:
            n = len(stage.blocks)
            kept_per_stage.append([stage.blocks[j] for j in range(n) if i + j in keep])
            i += n
        if any(not k for k in kept_per_stage):
            s = next(s for s, k in enumerate(kept_per_stage) if not k)
            raise EdgeVitError(f"keep_blocks: stage {s} would have no block left; keep at least one per stage")
        for stage, kept in zip(module.layers, kept_per_stage, strict=True):
            stage.blocks = nn.Sequential(*kept) if isinstance(stage.blocks, nn.Sequential) else nn.ModuleList(kept)
            stage.depth = len(kept)



class TimmSwinV2Adapter(TimmSwinAdapter):
    name = "timm_swinv2"
    supports = "timm SwinTransformerV2"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(module, SwinTransformerV2)

    def timm_classes(self) -> dict[str, type[nn.Module]]:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return {"SwinTransformerV2": SwinTransformerV2}

    def position_bias(self, p: str, attn: nn.Module) -> dict[str, Any]:
        """v2: the continuous position bias MLP over the window's relative coordinate table."""
        return {"kind": "window_cpb", "cpb": f"{p}.attn.cpb_mlp",
                "bias_rows": math.prod(attn.relative_coords_table.shape[1:3])}

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        keep_heads(attn, spec, channels, per_head=("logit_scale",))
