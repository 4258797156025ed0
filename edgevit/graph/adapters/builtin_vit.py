"""edgevit's own :class:`~edgevit.models.simple_vit.SimpleViT`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevit.graph.adapters.base import IMAGENET_MEAN, IMAGENET_STD, Adapter, as_triple
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete
from edgevit.models.simple_vit import SimpleViT


class BuiltinViTAdapter(Adapter):
    name = "builtin"
    supports = "edgevit SimpleViT"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, SimpleViT)

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        blocks = []
        for i, blk in enumerate(module.blocks):
            p = f"blocks.{i}"
            blocks.append(
                BlockSpec(
                    index=i,
                    path=p,
                    attn=AttentionSpec(
                        path=f"{p}.attn",
                        q=f"{p}.attn.q",
                        k=f"{p}.attn.k",
                        v=f"{p}.attn.v",
                        proj=f"{p}.attn.proj",
                        num_heads=blk.attn.num_heads,
                        head_dim=blk.attn.head_dim,
                    ),
                    norm1=f"{p}.norm1",
                    norm2=f"{p}.norm2",
                    mlp=MlpSpec(
                        path=f"{p}.mlp", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2", hidden=blk.mlp.fc1.out_features
                    ),
                )
            )
        spec = GraphSpec(
            family=self.name,
            embed_dim=module.embed_dim,
            img_size=(module.img_size, module.img_size),
            patch_size=(module.patch_size, module.patch_size),
            in_chans=module.patch_embed.in_channels,
            mean=as_triple(mean, IMAGENET_MEAN),
            std=as_triple(std, IMAGENET_STD),
            num_classes=module.num_classes,
            num_prefix_tokens=module.num_prefix_tokens,
            pool=module.pool,
            patch_embed="patch_embed",
            classifiers=["head"],
            blocks=blocks,
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        return SimpleViT(**(recipe.get("kwargs") or {}))

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        attn.num_heads = int(channels.numel()) // spec.head_dim

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        module.blocks = nn.Sequential(*[module.blocks[i] for i in blocks])

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        module.head = nn.Linear(module.embed_dim, num_classes)
        module.num_classes = num_classes
