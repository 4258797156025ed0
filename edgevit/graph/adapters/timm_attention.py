"""timm attention modules of BEiT, EVA and Swin: heads removed, and their ONNX form.

These modules reshape their output to the *input* width ``C``; once heads are removed that
width differs. :func:`allow_fewer_heads` swaps such a module's class for a subclass whose
forward reshapes to the kept width instead (same parameters and state-dict keys, same
arithmetic otherwise), so a pruned block runs, traces and exports. :func:`keep_heads` is the
one place that keeps an attention module's per-head and per-channel extras true after the
graph sliced its q/k/v rows; :func:`unfused_attention` turns SDPA off for export, and
:class:`TimmAdapter` gives every timm family's adapter that export mode and timm's own
``reset_classifier``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.graph.adapters.base import Adapter, heads_of, slice_qkv_biases
from edgevit.graph.spec import AttentionSpec

_SUBCLASSES: dict[type, type] = {}


def _qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if attn.q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if getattr(attn, "qkv_bias_separate", False):
        return attn.qkv(x) + bias
    return F.linear(x, weight=attn.qkv.weight, bias=bias)


def _beit_forward(self: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = _qkv(self, x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def _eva_forward(self: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask

    b, n, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        q, k, v = _qkv(self, x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (p(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(n, attn, attn_mask, is_causal=is_causal))
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    x = self.norm(x.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _swinv2_forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = _qkv(self, x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    area = self.window_size[0] * self.window_size[1]
    bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).contiguous()
    attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, n, n)
    x = self.attn_drop(self.softmax(attn)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def _forward_for(cls: type) -> object:
    name = f"{cls.__module__}.{cls.__name__}"
    return {
        "timm.models.beit.Attention": _beit_forward,
        "timm.models.eva.EvaAttention": _eva_forward,
        "timm.models.swin_transformer_v2.WindowAttention": _swinv2_forward,
    }.get(name)


def allow_fewer_heads(attn: nn.Module) -> None:
    """Give ``attn`` a forward that reads its kept width (no-op if it has one already)."""
    cls = type(attn)
    if cls in _SUBCLASSES.values():
        return
    forward = _forward_for(cls)
    if forward is None:
        raise TypeError(f"no width-following forward for {cls.__module__}.{cls.__name__}")
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    attn.__class__ = _SUBCLASSES[cls]


def keep_heads(attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor, per_head: tuple[str, ...] = ()) -> None:
    """After the graph kept ``channels`` (head-major) of ``attn``'s q/k/v rows: slice its separate
    q/k/v biases, keep the kept heads' entries (dim 0) of each ``per_head`` parameter (Swin v2's
    logit scale), set ``num_heads`` and give it a forward that reads the kept width."""
    attn.num_heads = int(channels.numel()) // spec.head_dim
    slice_qkv_biases(attn, channels)
    if per_head:
        idx = heads_of(channels, spec.head_dim)
        for name in per_head:
            t = getattr(attn, name)
            setattr(attn, name, nn.Parameter(t.detach().index_select(0, idx.to(t.device)).clone()))
    allow_fewer_heads(attn)


@contextmanager
def unfused_attention(module: nn.Module) -> Iterator[None]:
    """Every timm attention in ``module`` as explicit MatMul + Softmax while the block runs: SDPA
    has no ONNX form below opset 14 (TensorRT 8.2 reads 13)."""
    attns = [m for m in module.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attns]
    for m in attns:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, f in zip(attns, saved, strict=True):
            m.fused_attn = f


class TimmAdapter(Adapter):
    """What timm's families share: the model's own ``reset_classifier`` and, for export,
    attention as explicit MatMul + Softmax."""

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        module.reset_classifier(num_classes)

    @contextmanager
    def export_mode(self, module: nn.Module) -> Iterator[None]:
        with unfused_attention(module):
            yield
