"""What an adapter is: the one place that knows a model family's module layout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec

Branch = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BlockBranches:
    """A pre-norm block's residual branches as the block's own modules, so other tokens (the
    disentangled tuner's queries) can run through its frozen weights:
    ``x + attn_scale(proj(attn_norm(heads)))`` with heads from ``q_norm``/``k_norm``-ed
    queries and keys, then ``+ mlp_scale(mlp(norm2(x)))``. Identity where the family has none."""

    mlp: Branch  # the MLP branch, without its residual add
    attn_scale: Branch = field(default_factory=nn.Identity)  # layer scale on the attention branch
    mlp_scale: Branch = field(default_factory=nn.Identity)  # layer scale on the MLP branch
    q_norm: Branch = field(default_factory=nn.Identity)  # per-head norms of queries and keys
    k_norm: Branch = field(default_factory=nn.Identity)
    attn_norm: Branch = field(default_factory=nn.Identity)  # norm of the merged heads before the projection

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Adapter(ABC):
    """Builds a :class:`GraphSpec` from a model, rebuilds the architecture from a JSON recipe,
    and keeps the module's own attributes true after the graph slices its weights."""

    name: ClassVar[str]
    supports: ClassVar[str]  # what it accepts, for error messages

    @classmethod
    @abstractmethod
    def matches(cls, module: nn.Module) -> bool:
        """True if this adapter understands ``module``'s family (cheap isinstance test)."""

    @abstractmethod
    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        """The structural spec of ``module``; a clear EdgeVitError if a part is unsupported."""

    @abstractmethod
    def build(self, recipe: dict[str, Any]) -> nn.Module:
        """A freshly initialised module of the recorded architecture; never downloads."""

    def adopt(self, module: nn.Module, recipe: dict[str, Any] | None) -> None:
        """Record on ``module`` what only its recipe says (e.g. the input size of a
        resolution-agnostic CNN hybrid), before :meth:`describe` reads it."""
        return None

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        """Slice family-specific per-channel extras and update the attributes forward reads.

        ``channels`` indexes the kept attention channels (head-major, head_dim each)."""
        return None

    def after_keep_mlp_units(self, mlp: nn.Module, spec: MlpSpec, units: torch.Tensor) -> None:
        """Like :meth:`after_keep_heads`, for MLP hidden units."""
        return None

    def block_branches(self, module: nn.Module, blk: BlockSpec) -> BlockBranches:
        """Block ``blk``'s branches in ``module`` (the backbone); by default its MLP is the module
        at ``blk.mlp.path`` and it has no layer scale or query/key norms."""
        return BlockBranches(mlp=module.get_submodule(blk.mlp.path))

    def feature_map(self, output: torch.Tensor, blk: BlockSpec, spec: GraphSpec, batch: int) -> torch.Tensor:
        """Block ``blk``'s output as a (B, C, h, w) map over its patch grid, so feature losses
        can match blocks of any family (projected and resampled where grids differ). By default
        the output is a (B, N, C) token sequence whose first tokens are the prefix tokens."""
        return token_map(output, spec, batch)

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        """Drop every transformer block not in ``blocks`` and keep the module's own attributes
        true (the graph records the edit; the base recipe stays as built)."""
        raise NotImplementedError(f"{self.name} models cannot drop blocks")

    def describe_backbone(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        """The spec of ``module`` as a dense-prediction backbone: its tokens are read after the
        blocks (:meth:`patch_tokens`), no pooling, no classifier. Plain ViTs only, for now."""
        raise EdgeVitError(f"model.backbone: a segmenter needs a plain ViT backbone (one token grid through "
                           f"every block); {self.supports} is not supported as one; use a timm VisionTransformer")

    def patch_tokens(self, module: nn.Module, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """The patch tokens (B, N, D) after each of ``blocks`` with the final norm applied and the
        prefix tokens dropped: what a decode head reads (see :meth:`describe_backbone`)."""
        raise EdgeVitError(f"{self.name} models cannot be a segmenter backbone")

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        """Replace the classifier head(s) with fresh ones for ``num_classes``."""
        raise NotImplementedError(f"{self.name} models cannot change their number of classes")

    @contextmanager
    def export_mode(self, module: nn.Module) -> Iterator[None]:
        """Switch the module to operators every ONNX opset can express (e.g. unfused attention)."""
        yield


def grid_of(tokens: int, img_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) patch grid of ``tokens`` patches over an image of ``img_size`` (same aspect)."""
    import math

    h = max(1, round(math.sqrt(tokens * img_size[0] / img_size[1])))
    if tokens % h:
        raise ValueError(f"{tokens} tokens do not form a grid of the image's aspect {img_size}")
    return h, tokens // h


def token_map(tokens: torch.Tensor, spec: GraphSpec, batch: int) -> torch.Tensor:
    """(B, N, C) tokens with ``spec.num_prefix_tokens`` in front → (B, C, h, w) patch map."""
    if tokens.dim() != 3 or tokens.shape[0] != batch:
        raise ValueError(f"expected ({batch}, N, C) tokens, got {tuple(tokens.shape)}")
    patches = tokens[:, spec.num_prefix_tokens:]
    n = patches.shape[1]
    h, w = spec.grid if n == spec.num_patches else grid_of(n, spec.img_size)
    return patches.transpose(1, 2).reshape(batch, patches.shape[2], h, w)


def slice_linear(
    linear: nn.Module, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
) -> None:
    """Keep only ``out_idx`` rows and/or ``in_idx`` columns of a Linear, in place."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    with torch.no_grad():
        w = linear.weight
        if out_idx is not None:
            w = w.index_select(0, out_idx.to(w.device))
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.index_select(0, out_idx.to(w.device)).clone())
            linear.out_features = int(out_idx.numel())
        if in_idx is not None:
            w = w.index_select(1, in_idx.to(w.device))
            linear.in_features = int(in_idx.numel())
        linear.weight = nn.Parameter(w.clone())


def slice_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    """Keep ``idx`` channels of a LayerNorm (its affine parameters and normalized_shape)."""
    if isinstance(norm, nn.Identity):
        return
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"cannot slice a {type(norm).__name__}; only LayerNorm is supported")
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight = nn.Parameter(norm.weight.index_select(0, idx).clone())
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias.index_select(0, idx).clone())
    norm.normalized_shape = (int(idx.numel()),)


def as_triple(values: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if values is None:
        return default
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"expected 3 values for mean/std, got {len(vals)}")
    return vals  # type: ignore[return-value]


def slice_qkv_biases(attn: nn.Module, channels: torch.Tensor) -> None:
    """Keep ``channels`` of the separate q/k/v bias vectors BEiT, EVA and Swin v2 keep beside a
    bias-free qkv linear (k_bias is a zero buffer)."""
    for name in ("q_bias", "k_bias", "v_bias"):
        t = getattr(attn, name, None)
        if t is None:
            continue
        kept = t.detach().index_select(0, channels.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(attn, name, nn.Parameter(kept, requires_grad=t.requires_grad))
        else:
            attn.register_buffer(name, kept, persistent=name in attn.state_dict())


def heads_of(channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The kept head indices behind head-major ``channels``."""
    return channels[::head_dim] // head_dim


def build_timm(recipe: dict[str, Any], classes: dict[str, Any]) -> nn.Module:
    """A timm model from ``{name | architecture, kwargs}``: a registered name (never pretrained
    here: weights come from the saved file) or one of ``classes`` built with its kwargs."""
    import timm

    kwargs = dict(recipe.get("kwargs") or {})
    if recipe.get("name"):
        return timm.create_model(recipe["name"], pretrained=False, **kwargs)
    arch = recipe.get("architecture")
    if arch not in classes:
        raise EdgeVitError(f"model.architecture: unknown {arch!r}; choose one of {', '.join(classes)}")
    return classes[arch](**kwargs)


def timm_mean_std(module: nn.Module, mean: Any, std: Any) -> tuple[tuple[float, float, float], ...]:
    cfg = getattr(module, "pretrained_cfg", None) or {}
    return (as_triple(mean if mean is not None else cfg.get("mean"), IMAGENET_MEAN),
            as_triple(std if std is not None else cfg.get("std"), IMAGENET_STD))


def is_identity(m: Any) -> bool:
    return m is None or isinstance(m, nn.Identity)
