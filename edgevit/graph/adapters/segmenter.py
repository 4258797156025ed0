"""Segmenters (:class:`edgevit.seg.model.Segmenter`): the backbone's own adapter, under ``backbone.``.

The spec is the backbone's spec (described by the adapter the registry picks for it) with every
path prefixed, plus the decode head: ``task="segmentation"``, the ``decoder`` and the head's final
linear as the classifier. Head/unit edits therefore work on the prefixed paths unchanged;
dropping blocks drops backbone blocks and remaps the head's taps.

Recipe: ``{backbone: {family, <the backbone adapter's recipe>}, decoder: {kind, taps, width},
num_classes}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import Adapter, BlockBranches
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec, prefix_paths
from edgevit.graph.trace import complete

PREFIX = "backbone."


def _registry() -> Any:
    from edgevit.registry import Registry

    return Registry()


def assemble(backbone: nn.Module, inner: Adapter, decoder: dict[str, Any], num_classes: int) -> nn.Module:
    """A :class:`Segmenter` of ``backbone`` (understood by ``inner``) and a fresh decode head
    from ``decoder`` (``{kind: linear}`` or ``{kind: mla, taps?, width?}``)."""
    from edgevit.seg.model import LinearDecoder, MultiLevelDecoder, Segmenter, default_taps

    base = inner.describe_backbone(backbone)
    if not base.plain:
        raise EdgeVitError(f"model.backbone: a segmenter needs a plain ViT backbone (one token grid through every "
                           f"block); this {base.family} model has stages; use a timm VisionTransformer")
    cfg = dict(decoder)
    kind = cfg.pop("kind", "linear")
    if num_classes < 1:
        raise EdgeVitError(f"model.num_classes: a segmenter needs at least one class, got {num_classes}")
    try:
        if kind == "linear":
            if cfg:
                raise ValueError(f"the linear decoder takes no options, got {sorted(cfg)}")
            head: nn.Module = LinearDecoder(base.embed_dim, num_classes, base.depth - 1)
        elif kind == "mla":
            taps = cfg.pop("taps", None) or default_taps(base.depth)
            if any(t >= base.depth for t in taps):
                raise ValueError(f"taps {taps} beyond the backbone's {base.depth} blocks")
            head = MultiLevelDecoder(base.embed_dim, num_classes, list(taps), **cfg)
        else:
            raise ValueError(f"unknown kind {kind!r}; choose linear or mla")
    except (TypeError, ValueError) as e:
        raise EdgeVitError(f"model.decoder: {e}") from e
    return Segmenter(backbone, head, base.patch_size, inner.patch_tokens)


class SegmenterAdapter(Adapter):
    name = "segmenter"
    supports = "edgevit Segmenter (a plain ViT backbone + decode head)"

    def __init__(self) -> None:
        self._inner: Adapter | None = None  # the backbone's adapter, found on first describe/build

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from edgevit.seg.model import Segmenter

        return isinstance(module, Segmenter)

    def inner(self, module: nn.Module | None = None) -> Adapter:
        if self._inner is None:
            if module is None:
                raise RuntimeError("the segmenter adapter has not described a model yet")
            self._inner = _registry().adapter_for(module.backbone)
        return self._inner

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        base = self.inner(module).describe_backbone(module.backbone, mean=mean, std=std)
        if not base.plain:
            raise EdgeVitError(f"model.backbone: a segmenter needs a plain ViT backbone (one token grid through "
                               f"every block); this {base.family} model has stages; use a timm VisionTransformer")
        head = module.head
        fields = prefix_paths(base, PREFIX).model_dump()
        decoder = head.spec("head")
        fields.update(family=self.name, task="segmentation", decoder=decoder.model_dump(), pool="none",
                      num_classes=head.num_classes, classifiers=[decoder.classifier], fixed=[])
        return complete(GraphSpec.model_validate(fields), module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        backbone = dict(recipe["backbone"])
        inner = _registry().adapter(backbone.pop("family", "timm"))
        self._inner = inner
        return assemble(inner.build(backbone), inner, dict(recipe["decoder"]), int(recipe["num_classes"]))

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        self.inner().after_keep_heads(attn, spec, channels)

    def after_keep_mlp_units(self, mlp: nn.Module, spec: MlpSpec, units: torch.Tensor) -> None:
        self.inner().after_keep_mlp_units(mlp, spec, units)

    def block_branches(self, module: nn.Module, blk: BlockSpec) -> BlockBranches:
        return self.inner(module).block_branches(module, blk)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        self.inner(module).keep_blocks(module.backbone, blocks)
        module.head.remap_taps(blocks)

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        module.head.reset_classifier(num_classes)

    @contextmanager
    def export_mode(self, module: nn.Module) -> Iterator[None]:
        with self.inner(module).export_mode(module.backbone):
            yield
