"""The structural index of a vision transformer: what passes may touch, independent of where
the model came from.

Each transformer block is described on its own (width, tokens, heads, attention and MLP kind),
so hierarchical (Swin) and hybrid (MobileViT) models fit as well as the plain ViT; everything
between blocks that no edit touches (stems, patch merging, MobileNetV2 blocks, final norms) is
a fixed part with its shapes and multiply-accumulates, so cost, export and prediction stay exact.
Paths are dotted module paths from the model's root, so a pass finds the real ``nn.Linear``
with ``module.get_submodule(path)`` whatever the model family.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

# global: every token with every token; window: Swin v1 windows + relative position bias table;
# window_cpb: Swin v2 windows + continuous position bias MLP + per-head logit scale (cosine
# attention); rel_pos: BEiT relative position bias table; rope: rotary embedding (EVA-02)
AttentionKind = Literal["global", "window", "window_cpb", "rel_pos", "rope"]
MlpKind = Literal["gelu", "swiglu"]


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
    kind: AttentionKind = "global"
    windows: int = 1  # attention groups per image (Swin windows, MobileViT patch positions)
    window_tokens: int = 0  # tokens per group (= the block's tokens for global attention)
    qk_norm: bool = False  # per-head LayerNorm on q and k (sliced with nothing: shared over heads)
    bias_table: str | None = None  # parameter with one column per head: relative position bias table
    cpb: str | None = None  # Swin v2 continuous position bias MLP (last linear: one output per head)
    bias_rows: int = 0  # rows the bias table has or the cpb MLP computes, per forward

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
    fc1: str  # the value rows (SwiGLU) or the hidden layer (GELU); fused SwiGLU: [value | gate] rows
    fc2: str
    hidden: int
    kind: MlpKind = "gelu"
    gate: str | None = None  # SwiGLU's separate gate linear (its rows are units too)
    fused_gate: bool = False  # SwiGLU with value and gate as the two halves of fc1's rows

    def unit_rows(self) -> list[str]:
        """Paths of the linears whose output rows are the hidden units (fc1, and the gate)."""
        return [self.fc1] + ([self.gate] if self.gate else [])


class BlockSpec(_Strict):
    index: int
    path: str
    attn: AttentionSpec
    mlp: MlpSpec
    norm1: str | None = None  # pre-attention LayerNorm (pre-norm blocks)
    norm2: str | None = None  # pre-MLP LayerNorm
    dim: int = 0  # the width of the tokens the block reads and writes
    tokens: int = 0  # tokens per image the block's MLP sees (class/register tokens included)
    stage: int = 0  # hierarchical models: the stage (resolution) the block belongs to
    layer_scale: bool = False  # learned per-channel scale on each residual branch


class FixedSpec(_Strict):
    """A part no edit changes (stem, patch merging, conv block, final norm), measured once."""

    path: str
    module: str  # its class, e.g. PatchMerging, ConvNormAct, BottleneckBlock
    in_shape: list[int]  # per image, without the batch dimension
    out_shape: list[int]
    macs: int  # multiply-accumulates per image (convolutions and linears inside it)


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
    classifiers: list[str]  # classifier head paths; distilled DeiT has two, averaged at inference
    blocks: list[BlockSpec]
    fixed: list[FixedSpec] = []  # the parts between blocks, in module order
    register_tokens: int = 0  # of the prefix tokens, how many are registers (no class meaning)
    task: Literal["classification", "segmentation"] = "classification"

    @property
    def plain(self) -> bool:
        """One token sequence of one width through every block (a plain ViT)."""
        return all(b.dim == self.embed_dim and b.tokens == self.num_tokens and b.attn.windows == 1
                   for b in self.blocks)

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
