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

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, model_validator

# global: every token with every token; window: Swin v1 windows + relative position bias table;
# window_cpb: Swin v2 windows + continuous position bias MLP + per-head logit scale (cosine
# attention); rel_pos: BEiT relative position bias table; rope: rotary embedding (EVA-02)
AttentionKind = Literal["global", "window", "window_cpb", "rel_pos", "rope"]
MlpKind = Literal["gelu", "swiglu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: ClassVar[tuple[str, ...]] = ()  # the fields holding module paths (see prefix_paths)


class AttentionSpec(_Strict):
    paths = ("path", "qkv", "q", "k", "v", "proj", "bias_table", "cpb")
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
    paths = ("path", "fc1", "fc2", "gate")
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
    paths = ("path", "norm1", "norm2")
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

    paths = ("path",)
    path: str
    module: str  # its class, e.g. PatchMerging, ConvNormAct, BottleneckBlock
    in_shape: list[int]  # per image, without the batch dimension
    out_shape: list[int]
    macs: int  # multiply-accumulates per image (convolutions and linears inside it)


class DecoderSpec(_Strict):
    """A segmentation decode head: what it reads (the patch tokens after the ``taps`` blocks,
    final norm applied) and its linears, so cost and edits see it like any other part."""

    paths = ("path", "projections", "norm", "classifier")
    kind: Literal["linear", "mla"]  # linear: one Linear per token (Segmenter); mla: multi-level (SETR-MLA)
    path: str  # the head module
    taps: list[int]  # block indices whose tokens it reads, ascending
    projections: list[str] = []  # mla: one Linear(dim, width) per tap, summed
    norm: str | None = None  # mla: the norm of the summed projections
    classifier: str  # the linear that gives one logit per class per patch
    width: int  # the features the classifier reads

    @model_validator(mode="after")
    def _consistent(self) -> DecoderSpec:
        if not self.taps or self.taps != sorted(set(self.taps)) or self.taps[0] < 0:
            raise ValueError(f"decoder taps must be distinct ascending block indices, got {self.taps}")
        if self.kind == "linear" and (len(self.taps) != 1 or self.projections or self.norm):
            raise ValueError("a linear decoder reads one block and has no projections or norm")
        if self.kind == "mla" and len(self.projections) != len(self.taps):
            raise ValueError(f"an mla decoder needs one projection per tap: {len(self.taps)} taps, "
                             f"{len(self.projections)} projections")
        if self.width < 1:
            raise ValueError("decoder width must be positive")
        return self


class GraphSpec(_Strict):
    """Everything a pass, the cost model or an exporter needs to know about the model's shape."""

    paths = ("patch_embed", "classifiers")
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
    decoder: DecoderSpec | None = None  # segmentation: the decode head (classifiers: its final linear)

    @model_validator(mode="after")
    def _task_has_its_head(self) -> GraphSpec:
        if (self.task == "segmentation") != (self.decoder is not None):
            raise ValueError("a segmentation spec needs a decoder, and only a segmentation spec has one")
        if self.decoder is not None and self.blocks and self.decoder.taps[-1] >= len(self.blocks):
            raise ValueError(f"decoder taps {self.decoder.taps} beyond the {len(self.blocks)} blocks")
        return self

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


def prefix_paths(spec: _Strict, prefix: str) -> Any:
    """A copy of ``spec`` with every module path under ``prefix`` (e.g. ``backbone.``), so a
    model nested inside another (a segmenter's backbone) keeps its own adapter's spec."""
    update: dict[str, Any] = {}
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        if name in spec.paths:
            if isinstance(value, str):
                update[name] = prefix + value
            elif isinstance(value, list):
                update[name] = [prefix + v for v in value]
        elif isinstance(value, _Strict):
            update[name] = prefix_paths(value, prefix)
        elif isinstance(value, list) and value and isinstance(value[0], _Strict):
            update[name] = [prefix_paths(v, prefix) for v in value]
    return spec.model_copy(update=update)
