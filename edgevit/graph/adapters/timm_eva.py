"""timm ``Eva`` (EVA, EVA-02): rotary position embedding (nothing per head to slice beyond the
head's q/k/v rows) and SwiGLU MLPs, where a unit is its gate row, its value row and its fc2
column; class and register tokens in front, optional layer scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import (
    Adapter,
    build_timm,
    is_identity,
    slice_linear,
    slice_norm,
    slice_qkv_biases,
    timm_mean_std,
)
from edgevit.graph.adapters.timm_attention import allow_fewer_heads
from edgevit.graph.adapters.timm_beit import mlp_spec, slice_mlp_norm
from edgevit.graph.adapters.timm_swin import _SwinBase
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete


class TimmEvaAdapter(Adapter):
    name = "timm_eva"
    supports = "timm Eva / EVA-02"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(module, Eva)

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        from timm.models.eva import EvaBlock

        what = type(module).__name__
        if module.global_pool not in ("token", "avg"):
            raise EdgeVitError(f"model: {what} with global_pool={module.global_pool!r} is not supported; "
                               "use 'token' or 'avg'")
        blocks = []
        for i, blk in enumerate(module.blocks):
            if type(blk) is not EvaBlock:
                raise EdgeVitError(f"model: {what} block {i} is an {type(blk).__name__}; edgevit supports the "
                                   "pre-norm EvaBlock")
            p, a = f"blocks.{i}", blk.attn
            fused = a.qkv is not None
            proj = dict(qkv=f"{p}.attn.qkv") if fused else dict(q=f"{p}.attn.q_proj", k=f"{p}.attn.k_proj",
                                                                    v=f"{p}.attn.v_proj")
            attn = AttentionSpec(path=f"{p}.attn", proj=f"{p}.attn.proj", num_heads=a.num_heads, head_dim=a.head_dim,
                                 kind="rope" if module.rope is not None else "global",
                                 qk_norm=not is_identity(a.q_norm), **proj)
            blocks.append(BlockSpec(index=i, path=p, attn=attn, mlp=mlp_spec(f"{p}.mlp", blk.mlp, f"{what} block"),
                                    norm1=f"{p}.norm1", norm2=f"{p}.norm2", layer_scale=blk.gamma_1 is not None))
        pe = module.patch_embed
        m, sd = timm_mean_std(module, mean, std)
        spec = GraphSpec(
            family=self.name, embed_dim=module.embed_dim, img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size),
            in_chans=pe.proj.in_channels, mean=m, std=sd, num_classes=module.num_classes,
            num_prefix_tokens=module.num_prefix_tokens, pool=module.global_pool, patch_embed="patch_embed",
            classifiers=["head"], blocks=blocks,
            register_tokens=module.reg_token.shape[1] if module.reg_token is not None else 0,
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        from timm.models.eva import Eva

        return build_timm(recipe, {"Eva": Eva})

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        attn.num_heads = int(channels.numel()) // spec.head_dim
        slice_qkv_biases(attn, channels)
        if attn.gate is not None:
            slice_linear(attn.gate, out_idx=channels)
        if not is_identity(attn.norm):
            slice_norm(attn.norm, channels)
        allow_fewer_heads(attn)

    def after_keep_mlp_units(self, mlp: nn.Module, spec: MlpSpec, units: torch.Tensor) -> None:
        slice_mlp_norm(mlp, units)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        module.blocks = nn.ModuleList([module.blocks[i] for i in blocks])

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        module.reset_classifier(num_classes)

    export_mode = _SwinBase.export_mode
