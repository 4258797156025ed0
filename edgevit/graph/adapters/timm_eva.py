"""timm ``Eva`` (EVA, EVA-02) on the shared token-sequence layout (timm_sequence.py): rotary
position embedding (nothing per head to slice beyond the head's q/k/v rows and biases), fused
or separate q/k/v projections, an optional attention gate and norm over the heads' channels,
and SwiGLU MLPs; register tokens beside the class token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import is_identity, slice_linear, slice_norm
from edgevit.graph.adapters.timm_attention import keep_heads
from edgevit.graph.adapters.timm_sequence import TimmSequenceAdapter
from edgevit.graph.spec import AttentionSpec


class TimmEvaAdapter(TimmSequenceAdapter):
    name = "timm_eva"
    supports = "timm Eva / EVA-02"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(module, Eva)

    def timm_classes(self) -> dict[str, type[nn.Module]]:
        from timm.models.eva import Eva

        return {"Eva": Eva}

    def attention(self, module: nn.Module, p: str, blk: nn.Module, what: str) -> AttentionSpec:
        from timm.models.eva import EvaBlock

        if type(blk) is not EvaBlock:
            raise EdgeVitError(f"model: {what} block {p.removeprefix('blocks.')} is an {type(blk).__name__}; "
                               "edgevit supports the pre-norm EvaBlock")
        a = blk.attn
        fused = a.qkv is not None
        proj = dict(qkv=f"{p}.attn.qkv") if fused else dict(q=f"{p}.attn.q_proj", k=f"{p}.attn.k_proj",
                                                                v=f"{p}.attn.v_proj")
        return AttentionSpec(path=f"{p}.attn", proj=f"{p}.attn.proj", num_heads=a.num_heads, head_dim=a.head_dim,
                             kind="rope" if module.rope is not None else "global",
                             qk_norm=not is_identity(a.q_norm), **proj)

    def spec_extras(self, module: nn.Module) -> dict[str, Any]:
        return {"register_tokens": module.reg_token.shape[1] if module.reg_token is not None else 0}

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        keep_heads(attn, spec, channels)
        if attn.gate is not None:
            slice_linear(attn.gate, out_idx=channels)
        if not is_identity(attn.norm):
            slice_norm(attn.norm, channels)
