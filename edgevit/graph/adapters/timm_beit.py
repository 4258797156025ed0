"""timm ``Beit`` (BEiT v1/v2): a plain token sequence whose blocks each keep a relative
position bias table (one column per head, sliced with the head) and layer scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import (
    Adapter,
    build_timm,
    is_identity,
    slice_norm,
    slice_qkv_biases,
    timm_mean_std,
)
from edgevit.graph.adapters.timm_attention import allow_fewer_heads
from edgevit.graph.adapters.timm_swin import _SwinBase
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete


def mlp_spec(p: str, mlp: nn.Module, what: str) -> MlpSpec:
    """timm's Mlp (GELU), SwiGLU (separate gate linear) or GluMlp (value | gate halves of fc1)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp:
        return MlpSpec(path=p, fc1=f"{p}.fc1", fc2=f"{p}.fc2", hidden=mlp.fc1.out_features)
    if type(mlp) is SwiGLU:
        return MlpSpec(path=p, fc1=f"{p}.fc1_x", gate=f"{p}.fc1_g", fc2=f"{p}.fc2", hidden=mlp.fc2.in_features,
                       kind="swiglu")
    if type(mlp) is GluMlp and mlp.chunk_dim == -1:  # unit u: rows u and hidden + u, whichever half gates
        return MlpSpec(path=p, fc1=f"{p}.fc1", fc2=f"{p}.fc2", hidden=mlp.fc2.in_features, kind="swiglu",
                       fused_gate=True)
    raise EdgeVitError(f"model: {what} {p} is a {type(mlp).__name__}; edgevit supports timm's Mlp, SwiGLU and GluMlp")


def slice_mlp_norm(mlp: nn.Module, units: torch.Tensor) -> None:
    norm = getattr(mlp, "norm", None)
    if not is_identity(norm):
        slice_norm(norm, units)


class TimmBeitAdapter(Adapter):
    name = "timm_beit"
    supports = "timm Beit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(module, Beit)

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        what = type(module).__name__
        if module.rel_pos_bias is not None:
            raise EdgeVitError(f"model: {what} with a shared relative position bias (use_shared_rel_pos_bias) "
                               "ties every block to one head count; use a per-block bias (use_rel_pos_bias)")
        if module.global_pool not in ("token", "avg"):
            raise EdgeVitError(f"model: {what} with global_pool={module.global_pool!r} is not supported; "
                               "use 'token' or 'avg'")
        blocks = []
        for i, blk in enumerate(module.blocks):
            p, a = f"blocks.{i}", blk.attn
            table = a.relative_position_bias_table
            attn = AttentionSpec(
                path=f"{p}.attn", qkv=f"{p}.attn.qkv", proj=f"{p}.attn.proj", num_heads=a.num_heads,
                head_dim=a.qkv.out_features // 3 // a.num_heads, kind="rel_pos" if table is not None else "global",
                bias_table=f"{p}.attn.relative_position_bias_table" if table is not None else None,
                bias_rows=table.shape[0] if table is not None else 0,
            )
            blocks.append(BlockSpec(index=i, path=p, attn=attn, mlp=mlp_spec(f"{p}.mlp", blk.mlp, f"{what} block"),
                                    norm1=f"{p}.norm1", norm2=f"{p}.norm2", layer_scale=blk.gamma_1 is not None))
        pe = module.patch_embed
        m, sd = timm_mean_std(module, mean, std)
        spec = GraphSpec(
            family=self.name, embed_dim=module.embed_dim, img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size),
            in_chans=pe.proj.in_channels, mean=m, std=sd, num_classes=module.num_classes,
            num_prefix_tokens=module.num_prefix_tokens, pool=module.global_pool, patch_embed="patch_embed",
            classifiers=["head"], blocks=blocks,
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        from timm.models.beit import Beit

        return build_timm(recipe, {"Beit": Beit})

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        attn.num_heads = int(channels.numel()) // spec.head_dim
        slice_qkv_biases(attn, channels)
        allow_fewer_heads(attn)

    def after_keep_mlp_units(self, mlp: nn.Module, spec: MlpSpec, units: torch.Tensor) -> None:
        slice_mlp_norm(mlp, units)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        module.blocks = nn.ModuleList([module.blocks[i] for i in blocks])

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        module.reset_classifier(num_classes)

    export_mode = _SwinBase.export_mode
