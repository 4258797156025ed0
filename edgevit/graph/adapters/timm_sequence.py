"""What timm's ``Beit`` and ``Eva`` share: one token sequence through pre-norm blocks, class
(and register) tokens in front, optional layer scale, MLPs of timm's three kinds and one
``head``. A subclass names its timm class and describes a block's attention."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import build_timm, is_identity, slice_norm, timm_mean_std
from edgevit.graph.adapters.timm_attention import TimmAdapter
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


class TimmSequenceAdapter(TimmAdapter):
    """The shared layout; :meth:`attention` is the one per-family part of a block."""

    @abstractmethod
    def timm_classes(self) -> dict[str, type[nn.Module]]:
        """Architecture name -> timm class, for :meth:`build`."""

    @abstractmethod
    def attention(self, module: nn.Module, p: str, blk: nn.Module, what: str) -> AttentionSpec:
        """Block ``blk`` (at path ``p``)'s attention; a clear EdgeVitError for an unsupported block
        (``what``: the model's class name, for the message)."""

    def refuse(self, module: nn.Module, what: str) -> None:
        """Raise for a whole-model option the graph cannot slice (checked before anything else)."""
        return None

    def spec_extras(self, module: nn.Module) -> dict[str, Any]:
        """More GraphSpec fields the family sets (e.g. register tokens)."""
        return {}

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        what = type(module).__name__
        self.refuse(module, what)
        if module.global_pool not in ("token", "avg"):
            raise EdgeVitError(f"model: {what} with global_pool={module.global_pool!r} is not supported; "
                               "use 'token' or 'avg'")
        blocks = []
        for i, blk in enumerate(module.blocks):
            p = f"blocks.{i}"
            attn = self.attention(module, p, blk, what)
            blocks.append(BlockSpec(index=i, path=p, attn=attn, mlp=mlp_spec(f"{p}.mlp", blk.mlp, f"{what} block"),
                                    norm1=f"{p}.norm1", norm2=f"{p}.norm2", layer_scale=blk.gamma_1 is not None))
        pe = module.patch_embed
        m, sd = timm_mean_std(module, mean, std)
        spec = GraphSpec(
            family=self.name, embed_dim=module.embed_dim, img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size),
            in_chans=pe.proj.in_channels, mean=m, std=sd, num_classes=module.num_classes,
            num_prefix_tokens=module.num_prefix_tokens, pool=module.global_pool, patch_embed="patch_embed",
            classifiers=["head"], blocks=blocks, **self.spec_extras(module),
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        return build_timm(recipe, self.timm_classes())

    def after_keep_mlp_units(self, mlp: nn.Module, spec: MlpSpec, units: torch.Tensor) -> None:
        norm = getattr(mlp, "norm", None)  # the MLP's norm over its hidden units (timm's scale_mlp)
        if not is_identity(norm):
            slice_norm(norm, units)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        module.blocks = nn.ModuleList([module.blocks[i] for i in blocks])

