"""Per-layer cost from the spec: MACs, FLOPs, parameter bytes, activation bytes.

Analytic (no tracing), so it is exact for the shapes the spec describes and cheap enough to
call after every structural edit. Matrix work counts 2 FLOPs per MAC; element-wise work
(LayerNorm, Softmax, GELU, residual adds) is counted at a few FLOPs per element so that
memory-bound layers are visible to a roofline predictor.
"""

from __future__ import annotations

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
    b, n, d = batch, spec.num_tokens, spec.embed_dim
    el = dtype_bytes

    def add(name: str, kind: str, block: int | None, macs: int, extra_flops: int, params: int,
            inp: int, out: int, scratch: int = 0) -> None:
        report.layers.append(
            LayerCost(name, kind, block, macs, 2 * macs + extra_flops, params, params * el,
                      inp * el, out * el, scratch * el)
        )

    ph, pw = spec.patch_size
    p = spec.num_patches
    pe = module.get_submodule(spec.patch_embed)
    h, w = spec.img_size
    add(spec.patch_embed, "patch_embed", None, b * p * d * spec.in_chans * ph * pw, 0, _params(pe),
        b * spec.in_chans * h * w, b * p * d)

    for blk in spec.blocks:
        a, m, i = blk.attn, blk.mlp, blk.index
        counted = 0
        in_projs = a.input_projections()
        for path in in_projs:
            lin = module.get_submodule(path)
            counted += _params(lin)
            add(path, "linear", i, b * n * d * lin.out_features, 0, _params(lin), b * n * d, b * n * lin.out_features)
        hn = b * a.num_heads * n * n
        add(f"{a.path}.core", "attention", i, 2 * hn * a.head_dim, hn * SOFTMAX_FLOPS + b * n * a.attn_dim, 0,
            3 * b * n * a.attn_dim, b * n * a.attn_dim, hn)
        for path, fin, fout, extra in (
            (a.proj, a.attn_dim, d, 0),
            (m.fc1, d, m.hidden, b * n * m.hidden * GELU_FLOPS),
            (m.fc2, m.hidden, d, 0),
        ):
            lin = module.get_submodule(path)
            counted += _params(lin)
            add(path, "linear", i, b * n * fin * fout, extra, _params(lin), b * n * fin, b * n * fout)
        # the block's norms, residual adds and any scaling: element-wise, memory-bound
        rest = _params(module.get_submodule(blk.path)) - counted
        add(f"{blk.path}.norms+residual", "elementwise", i, 0, b * n * d * (2 * LAYERNORM_FLOPS + 2), rest,
            2 * b * n * d, b * n * d)

    pooled = b * d
    for path in spec.heads:
        head = module.get_submodule(path)
        add(path, "head", None, pooled * spec.num_classes, 0, _params(head), pooled, b * spec.num_classes)

    # what no row above owns: token and position embeddings, the final norm, pooling
    rest = _params(module) - report.params
    pool_flops = b * n * d if spec.pool == "avg" else 0
    add("embeddings+final_norm", "embedding", None, 0, b * n * d * (LAYERNORM_FLOPS + 1) + pool_flops, rest,
        b * n * d, b * n * d)
    return report
