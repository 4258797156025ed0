"""timm MobileViT v1 (a ``ByobNet`` with ``MobileVitBlock`` stages): MobileNetV2 blocks, then per
stage a local conv, an unfold into patches, transformer blocks over the patch sequence (one
sequence per position inside a patch), a fold back and a fusion conv. Only the transformer
blocks' heads and MLP units are pruned; every conv is a fixed part and keeps its shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import build_timm, grid_of, is_identity, timm_mean_std
from edgevit.graph.adapters.timm_attention import TimmAdapter
from edgevit.graph.adapters.timm_vit import TimmViTAdapter
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete


def _mobilevit_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from timm.models.mobilevit import MobileVitBlock

    return [(n, m) for n, m in module.named_modules() if isinstance(m, MobileVitBlock)]


class TimmMobileViTAdapter(TimmAdapter):
    name = "timm_mobilevit"
    supports = "timm MobileViT v1"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.byobnet import ByobNet

        return isinstance(module, ByobNet) and bool(_mobilevit_blocks(module))

    def adopt(self, module: nn.Module, recipe: dict[str, Any] | None) -> None:
        size = ((recipe or {}).get("kwargs") or {}).get("img_size")
        if size is not None:  # resolution-agnostic: only the recipe says which input it is for
            hw = (size, size) if isinstance(size, int) else tuple(size)
            cfg = dict(getattr(module, "pretrained_cfg", None) or {})
            module.pretrained_cfg = {**cfg, "input_size": (module.in_chans, *hw)}

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        from timm.layers import Attention, Mlp

        what = type(module).__name__
        blocks = []
        for s, (mp, mvb) in enumerate(_mobilevit_blocks(module)):
            for j, blk in enumerate(mvb.transformer):
                p = f"{mp}.transformer.{j}"
                a, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
                if type(a) is not Attention or type(mlp) is not Mlp:
                    raise EdgeVitError(f"model: {what} {p} is {type(blk).__name__}; edgevit supports MobileViT v1 "
                                       "transformer blocks (Attention + Mlp)")
                blocks.append(BlockSpec(
                    index=len(blocks), path=p, stage=s, norm1=f"{p}.norm1", norm2=f"{p}.norm2",
                    layer_scale=not is_identity(blk.ls1),
                    attn=AttentionSpec(path=f"{p}.attn", qkv=f"{p}.attn.qkv", proj=f"{p}.attn.proj",
                                       num_heads=a.num_heads, head_dim=a.head_dim, qk_norm=not is_identity(a.q_norm)),
                    mlp=MlpSpec(path=f"{p}.mlp", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2", hidden=mlp.fc1.out_features),
                ))
        cfg = getattr(module, "pretrained_cfg", None) or {}
        c, h, w = cfg.get("input_size", (module.in_chans, 256, 256))
        m, sd = timm_mean_std(module, mean, std)
        stem = next(x for x in module.stem.modules() if isinstance(x, nn.Conv2d))
        spec = GraphSpec(
            family=self.name, embed_dim=blocks[0].attn.num_heads * blocks[0].attn.head_dim if blocks else 0,
            img_size=(h, w), patch_size=tuple(stem.stride), in_chans=c, mean=m, std=sd, num_classes=module.num_classes,
            num_prefix_tokens=0, pool="avg", patch_embed="stem", classifiers=["head.fc"], blocks=blocks,
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        if not recipe.get("name"):
            raise EdgeVitError("model: a MobileViT is built from its timm name (e.g. mobilevit_xs); give model.name")
        return build_timm(recipe, {})

    after_keep_heads = TimmViTAdapter.after_keep_heads
    after_keep_mlp_units = TimmViTAdapter.after_keep_mlp_units

    def feature_map(self, output: torch.Tensor, blk: BlockSpec, spec: GraphSpec, batch: int) -> torch.Tensor:
        """A transformer block's (B·P, N, C) output folded back to the (B, C, H, W) map, as
        MobileVitBlock folds it (P positions inside a square patch, N patches)."""
        area = output.shape[0] // batch
        ph = math.isqrt(area)
        if ph * ph != area:
            raise ValueError(f"{blk.path}: {area} positions per patch are not a square patch")
        n, c = output.shape[1], output.shape[2]
        nh, nw = grid_of(n, spec.img_size)
        x = output.reshape(batch, area, n, c).transpose(1, 3).reshape(batch * c * nh, nw, ph, ph)
        return x.transpose(1, 2).reshape(batch, c, nh * ph, nw * ph)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        keep, i = set(blocks), 0
        stages = [mvb for _, mvb in _mobilevit_blocks(module)]
        kept = []
        for mvb in stages:
            n = len(mvb.transformer)
            kept.append([mvb.transformer[j] for j in range(n) if i + j in keep])
            i += n
        if any(not k for k in kept):
            s = next(s for s, k in enumerate(kept) if not k)
            raise EdgeVitError(f"keep_blocks: MobileViT stage {s} would have no transformer block; keep one per stage")
        for mvb, k in zip(stages, kept, strict=True):
            mvb.transformer = nn.Sequential(*k)

