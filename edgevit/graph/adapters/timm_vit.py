"""timm ``VisionTransformer`` and DeiT (``VisionTransformerDistilled``, two heads)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BlockBranches,
    as_triple,
    slice_linear,
    slice_norm,
)
from edgevit.graph.adapters.timm_attention import TimmAdapter
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete

ARCHITECTURES = ("VisionTransformer", "VisionTransformerDistilled")


def _classes() -> dict[str, type[nn.Module]]:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}


class TimmViTAdapter(TimmAdapter):
    name = "timm"
    supports = "timm VisionTransformer / DeiT (incl. distilled)"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(module, VisionTransformer)

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        if module.global_pool not in ("token", "avg"):
            raise EdgeVitError(
                f"model: {type(module).__name__} with global_pool={module.global_pool!r} is not supported; "
                "use global_pool 'token' or 'avg'"
            )
        return self._describe(module, mean, std)

    def describe_backbone(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        from timm.models.deit import VisionTransformerDistilled

        if isinstance(module, VisionTransformerDistilled) or not isinstance(module.head, nn.Identity):
            raise EdgeVitError(f"model.backbone: a segmenter's backbone has no classifier of its own; build the "
                               f"{type(module).__name__} with num_classes=0")
        return self._describe(module, mean, std).model_copy(update={"pool": "none", "classifiers": []})

    def patch_tokens(self, module: nn.Module, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        return module.forward_intermediates(images, indices=blocks, norm=True, output_fmt="NLC",
                                            intermediates_only=True)

    def _describe(self, module: nn.Module, mean: Any, std: Any) -> GraphSpec:
        from timm.layers import Attention, Mlp
        from timm.models.deit import VisionTransformerDistilled

        what = type(module).__name__
        blocks = []
        for i, blk in enumerate(module.blocks):
            attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
            if type(attn) is not Attention or type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
                raise EdgeVitError(
                    f"model: block {i} of {what} is {type(blk).__name__} with "
                    f"{type(attn).__name__}/{type(mlp).__name__}; edgevit supports timm's standard "
                    "Block (Attention + Mlp)"
                )
            p = f"blocks.{i}"
            blocks.append(
                BlockSpec(
                    index=i,
                    path=p,
                    attn=AttentionSpec(
                        path=f"{p}.attn",
                        qkv=f"{p}.attn.qkv",
                        proj=f"{p}.attn.proj",
                        num_heads=attn.num_heads,
                        head_dim=attn.head_dim,
                        qk_norm=not isinstance(attn.q_norm, nn.Identity),
                    ),
                    layer_scale=not isinstance(blk.ls1, nn.Identity),
                    norm1=f"{p}.norm1",
                    norm2=f"{p}.norm2",
                    mlp=MlpSpec(
                        path=f"{p}.mlp", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2", hidden=mlp.fc1.out_features
                    ),
                )
            )
        cfg = getattr(module, "pretrained_cfg", None) or {}
        classifiers = ["head"] + (["head_dist"] if isinstance(module, VisionTransformerDistilled) else [])
        pe = module.patch_embed
        spec = GraphSpec(
            family=self.name,
            embed_dim=module.embed_dim,
            img_size=tuple(pe.img_size),
            patch_size=tuple(pe.patch_size),
            in_chans=pe.proj.in_channels,
            mean=as_triple(mean if mean is not None else cfg.get("mean"), IMAGENET_MEAN),
            std=as_triple(std if std is not None else cfg.get("std"), IMAGENET_STD),
            num_classes=module.num_classes,
            num_prefix_tokens=module.num_prefix_tokens,
            pool=module.global_pool,
            patch_embed="patch_embed.proj",
            classifiers=classifiers,
            blocks=blocks,
            register_tokens=getattr(module, "num_reg_tokens", 0),
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        import timm

        kwargs = dict(recipe.get("kwargs") or {})
        if recipe.get("name"):
            return timm.create_model(recipe["name"], pretrained=False, **kwargs)
        arch = recipe.get("architecture", "VisionTransformer")
        classes = _classes()
        if arch not in classes:
            raise EdgeVitError(f"model.architecture: unknown {arch!r}; choose one of {', '.join(classes)}")
        return classes[arch](**kwargs)

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        attn.num_heads = int(channels.numel()) // spec.head_dim
        attn.attn_dim = int(channels.numel())
        if getattr(attn, "gate", None) is not None:
            slice_linear(attn.gate, out_idx=channels)
        slice_norm(attn.norm, channels)

    def after_keep_mlp_units(self, mlp: nn.Module, spec: MlpSpec, units: torch.Tensor) -> None:
        slice_norm(mlp.norm, units)

    def block_branches(self, module: nn.Module, blk: BlockSpec) -> BlockBranches:
        block, attn = module.get_submodule(blk.path), module.get_submodule(blk.attn.path)
        if getattr(attn, "gate", None) is not None:
            raise EdgeVitError(f"block {blk.index}'s attention has an output gate, which running other tokens "
                               "through the block does not apply; use a model without attention gates")
        ident = nn.Identity()
        return BlockBranches(mlp=block.mlp, attn_scale=getattr(block, "ls1", ident),
                             mlp_scale=getattr(block, "ls2", ident), q_norm=getattr(attn, "q_norm", ident),
                             k_norm=getattr(attn, "k_norm", ident), attn_norm=getattr(attn, "norm", ident))

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        module.blocks = nn.Sequential(*[module.blocks[i] for i in blocks])
        if hasattr(module, "feature_info"):
            info = module.feature_info[: len(blocks)]
            module.feature_info = [dict(f, module=f"blocks.{j}") for j, f in enumerate(info)]

