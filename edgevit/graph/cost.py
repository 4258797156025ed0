"""Per-layer cost from the spec: MACs, FLOPs, parameter bytes, activation bytes.

Analytic (no tracing), so it is exact for the shapes the spec describes and cheap enough to
call after every structural edit. Matrix work counts 2 FLOPs per MAC; element-wise work
(LayerNorm, Softmax, GELU, residual adds) is counted at a few FLOPs per element so that
memory-bound layers are visible to a roofline predictor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

from edgevit.graph.spec import GraphSpec

LAYERNORM_FLOPS = 8  # per element: mean, variance, normalise, affine
GELU_FLOPS = 8
SOFTMAX_FLOPS = 5


@dataclass
class LayerCost:
    name: str
    kind: str  # patch_embed | linear | attention | elementwise | head | embedding
    block: int | None
    macs: int
    flops: int
    params: int
    param_bytes: int
    input_bytes: int
    output_bytes: int
    scratch_bytes: int = 0  # e.g. the attention score matrix


@dataclass
class CostReport:
    batch: int
    dtype_bytes: int
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def peak_activation_bytes(self) -> int:
        """Largest live set of one layer: its input, output and scratch."""
        return max((x.input_bytes + x.output_bytes + x.scratch_bytes for x in self.layers), default=0)

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "dtype_bytes": self.dtype_bytes,
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "param_bytes": self.param_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "layers": [asdict(x) for x in self.layers],
        }


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compute_cost(spec: GraphSpec, module: nn.Module, batch: int = 1, dtype_bytes: int = 4) -> CostReport:
    report = CostReport(batch=batch, dtype_bytes=dtype_bytes)
    b = batch
    el = dtype_bytes

    def add(name: str, kind: str, block: int | None, macs: int, extra_flops: int, params: int,
            inp: int, out: int, scratch: int = 0) -> None:
        report.layers.append(
            LayerCost(name, kind, block, macs, 2 * macs + extra_flops, params, params * el,
                      inp * el, out * el, scratch * el)
        )

    def linear(path: str, block: int | None, tokens: int, extra: int = 0, per_forward: bool = False) -> int:
        """A linear over ``tokens`` rows per image (``per_forward``: once, whatever the batch)."""
        lin = module.get_submodule(path)
        rows = tokens if per_forward else b * tokens
        add(path, "linear", block, rows * lin.in_features * lin.out_features, extra, _params(lin),
            rows * lin.in_features, rows * lin.out_features)
        return _params(lin)

    for part in spec.fixed:
        kind = "patch_embed" if part.path == spec.patch_embed else "fixed"
        add(part.path, kind, None, b * part.macs, 0, _params(module.get_submodule(part.path)),
            b * math.prod(part.in_shape), b * math.prod(part.out_shape))

    for blk in spec.blocks:
        a, m, i, d, n = blk.attn, blk.mlp, blk.index, blk.dim, blk.tokens
        na = a.windows * a.window_tokens  # tokens the attention projections see (Swin pads to whole windows)
        counted = 0
        for path in a.input_projections():
            counted += linear(path, i, na)
        if a.cpb:  # Swin v2: the position bias MLP runs once per forward, over the coordinate table
            for name, lin in module.get_submodule(a.cpb).named_modules():
                if isinstance(lin, nn.Linear):
                    counted += linear(f"{a.cpb}.{name}", i, a.bias_rows, per_forward=True)
        wt = a.window_tokens
        hn = b * a.windows * a.num_heads * wt * wt
        add(f"{a.path}.core", "attention", i, 2 * hn * a.head_dim, hn * SOFTMAX_FLOPS + b * na * a.attn_dim, 0,
            3 * b * na * a.attn_dim, b * na * a.attn_dim, hn)
        counted += linear(a.proj, i, na)
        act = GELU_FLOPS if m.kind == "gelu" else GELU_FLOPS + 1  # SwiGLU: SiLU, then the gate product
        for path in m.unit_rows():
            counted += linear(path, i, n, b * n * m.hidden * act if path == m.fc1 else 0)
        counted += linear(m.fc2, i, n)
        # the block's norms, residual adds, biases and tables: element-wise, memory-bound
        rest = _params(module.get_submodule(blk.path)) - counted
        add(f"{blk.path}.norms+residual", "elementwise", i, 0, b * n * d * (2 * LAYERNORM_FLOPS + 2), rest,
            2 * b * n * d, b * n * d)

    dec = spec.decoder
    if dec is not None:  # a decode head: its linears run on every patch token
        p = spec.num_patches
        for path in dec.projections:
            linear(path, None, p, b * p * dec.width if path != dec.projections[0] else 0)  # + the sum
        if dec.norm:
            norm = module.get_submodule(dec.norm)
            add(dec.norm, "elementwise", None, 0, b * p * dec.width * (LAYERNORM_FLOPS + GELU_FLOPS), _params(norm),
                b * p * dec.width, b * p * dec.width)
    rows = spec.num_patches if dec is not None else 1  # logits per image: one per patch, or one
    for path in spec.classifiers:
        head = module.get_submodule(path)
        width = head.in_features if isinstance(head, nn.Linear) else spec.embed_dim
        add(path, "head", None, b * rows * width * spec.num_classes, 0, _params(head), b * rows * width,
            b * rows * spec.num_classes)
    if dec is not None:  # bilinear upsampling to the input: four taps per output pixel, no MACs
        out = b * spec.num_classes * spec.img_size[0] * spec.img_size[1]
        add(f"{dec.path}.upsample", "elementwise", None, 0, 7 * out, 0, b * rows * spec.num_classes, out)

    # what no row above owns: token and position embeddings, pooling
    last = spec.blocks[-1] if spec.blocks else None
    n, d = (last.tokens, last.dim) if last else (spec.num_tokens, spec.embed_dim)
    rest = _params(module) - report.params
    pool_flops = b * n * d if spec.pool == "avg" else 0
    add("embeddings+pool", "embedding", None, 0, b * n * d + pool_flops, rest, b * n * d, b * n * d)
    return report
