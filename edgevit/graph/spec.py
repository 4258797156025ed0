"""The structural index of a ViT: what passes may touch, independent of where the model came from.

Paths are dotted module paths from the model's root, so a pass finds the real
``nn.Linear`` with ``module.get_submodule(path)`` whatever the model family.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttentionSpec(_Strict):
    path: str
    qkv: str | None = None  # fused q/k/v projection (timm), rows ordered [q | k | v]
    q: str | None = None  # separate projections (Hugging Face, built-in)
    k: str | None = None
    v: str | None = None
    proj: str
    num_heads: int
    head_dim: int

    @model_validator(mode="after")
    def _one_layout(self) -> AttentionSpec:
        separate = (self.q, self.k, self.v)
        if (self.qkv is None) == all(p is None for p in separate) or (
            self.qkv is None and any(p is None for p in separate)
        ):
            raise ValueError("attention needs either `qkv` or all of `q`, `k`, `v`")
        return self

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def input_projections(self) -> list[str]:
        """Paths of the linears that produce q, k and v."""
        return [self.qkv] if self.qkv else [self.q, self.k, self.v]  # type: ignore[list-item]


class MlpSpec(_Strict):
    path: str
    fc1: str
    fc2: str
    hidden: int


class BlockSpec(_Strict):
    index: int
    path: str
    attn: AttentionSpec
    mlp: MlpSpec
    norm1: str | None = None  # pre-attention LayerNorm (pre-norm blocks)
    norm2: str | None = None  # pre-MLP LayerNorm


class GraphSpec(_Strict):
    """Everything a pass, the cost model or an exporter needs to know about the model's shape."""

    family: str  # the adapter that understands this model ("timm", "hf", "builtin")
    embed_dim: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    num_prefix_tokens: int  # class (+ distillation) tokens in front of the patch tokens
    pool: str  # "token" (class token) or "avg"
    patch_embed: str
    heads: list[str]  # classifier head paths; distilled DeiT has two, averaged at inference
    blocks: list[BlockSpec]

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def block(self, index: int) -> BlockSpec:
        if not 0 <= index < len(self.blocks):
            raise IndexError(f"block {index} out of range: the model has {len(self.blocks)} blocks")
        return self.blocks[index]
