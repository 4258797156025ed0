"""timm ``Beit`` (BEiT v1/v2) on the shared token-sequence layout (timm_sequence.py): each block
keeps a relative position bias table (one column per head, sliced with the head) and q/v biases."""

from __future__ import annotations

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.timm_attention import keep_heads
from edgevit.graph.adapters.timm_sequence import TimmSequenceAdapter
from edgevit.graph.spec import AttentionSpec


class TimmBeitAdapter(TimmSequenceAdapter):
    name = "timm_beit"
    supports = "timm Beit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(module, Beit)

    def timm_classes(self) -> dict[str, type[nn.Module]]:
        from timm.models.beit import Beit

        return {"Beit": Beit}

    def refuse(self, module: nn.Module, what: str) -> None:
        if module.rel_pos_bias is not None:
            raise EdgeVitError(f"model: {what} with a shared relative position bias (use_shared_rel_pos_bias) "
                               "ties every block to one head count; use a per-block bias (use_rel_pos_bias)")

    def attention(self, module: nn.Module, p: str, blk: nn.Module, what: str) -> AttentionSpec:
        a = blk.attn
        table = a.relative_position_bias_table
        return AttentionSpec(
            path=f"{p}.attn", qkv=f"{p}.attn.qkv", proj=f"{p}.attn.proj", num_heads=a.num_heads,
            head_dim=a.qkv.out_features // 3 // a.num_heads, kind="rel_pos" if table is not None else "global",
            bias_table=f"{p}.attn.relative_position_bias_table" if table is not None else None,
            bias_rows=table.shape[0] if table is not None else 0,
        )

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        keep_heads(attn, spec, channels)
