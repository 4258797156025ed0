"""The host-CPU form of an exported ViT: rewrites for ONNX Runtime's CPU kernels.

``fuse_for_cpu`` applies :mod:`edgevit.ort_rewrites` (constants resolved, the patch embedding
as a MatMul, GELU as its tanh approximation), :mod:`edgevit.unread_tokens` (a token-pooling
head's last block computes the class token alone) and an attention fusion. ONNX
Runtime's session (graph optimization level ALL) already fuses the LayerNorms, bias adds and
GELUs of edgevit's exports when it loads them; its transformers optimizer
(``onnxruntime.transformers.optimizer``, model type ``vit``) does the same offline, but
neither fuses their attention: timm-style blocks compute q, k and v with one packed ``qkv``
projection (reshape to ``[B, N, 3, heads, head_dim]``), a pattern none of its attention
fusions match. So the attention fusion here is edgevit's own rewrite into ``Attention``
(whose weight is exactly that packed ``[C, 3C]`` layout), checked region by region against
the unfused graph; a region whose output differs is left unfused. The offline optimizer
(``ort_optimizer``) is optional: on the CPU measured in the README it ran slower than letting
the session fuse. The result uses contrib ops: ONNX Runtime only, never a TensorRT (Jetson)
target."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgevit import ort_rewrites
from edgevit.errors import EdgeVitError
from edgevit.fileio import atomic_path
from edgevit.ort_rewrites import MS_DOMAIN, GraphIndex
from edgevit.unread_tokens import slice_unread_tokens

# Ops that only move data between the packed qkv tensor and q, k, v (never change values).
LAYOUT_OPS = frozenset({"Transpose", "Squeeze", "Unsqueeze", "Split", "Gather", "Reshape", "Identity"})
# A region's output may differ from the unfused graph's by this much (relative to its scale):
# float reordering inside the fused kernel is ~1e-6; a wrong head or q/k/v layout is O(1).
REGION_RTOL = 1e-3


@dataclass
class FusionResult:
    """What the rewrite did: fused op counts, and the attention regions left unfused."""

    ops: dict[str, int] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)  # ort_rewrites: how many of each
    attention_regions: int = 0
    attention_fused: int = 0
    unfused_regions: list[str] = field(default_factory=list)


@dataclass
class _Region:
    x: str  # the block's normalized input to the qkv projection
    weights: list[str]  # one packed [C, 3C] initializer, or q, k and v's [C, C] ones
    biases: list[str | None]
    out: str  # [B, N, C]: heads concatenated, the input of the output projection
    heads: int
    width: int  # C
    scale: float


def _packed_projection(g: GraphIndex, name: str) -> tuple[onnx.NodeProto, float] | None:
    """Walk up from q, k or v through layout ops and constant scalings to the packed
    projection (the bias Add, else the MatMul); returns it with the scaling met on the way."""
    scale = 1.0
    for _ in range(32):
        n = g.producer.get(name)
        if n is None:
            return None
        s = g.scalar(n)
        if s is not None:
            name, scale = s[0], scale * s[1]
        elif n.op_type in LAYOUT_OPS:
            name = n.input[0]
        elif n.op_type in ("Add", "MatMul"):
            return n, scale
        else:
            return None
    return None


def _qkv_matmul(g: GraphIndex, n: onnx.NodeProto) -> tuple[onnx.NodeProto, str | None] | None:
    """The MatMul with a constant [C, 3C] weight behind ``n`` and its bias initializer name."""
    if n.op_type == "MatMul":
        return (n, None) if g.const(n.input[1]) is not None else None
    for k in (0, 1):
        bias, mm = g.const(n.input[k]), g.producer.get(n.input[1 - k])
        if bias is not None and bias.ndim == 1 and mm is not None and mm.op_type == "MatMul" \
                and g.const(mm.input[1]) is not None:
            return mm, n.input[k]
    return None


def _find_regions(model: onnx.ModelProto, shapes: dict[str, list]) -> list[_Region]:
    g = GraphIndex(model)
    regions = []
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        name, s_scale = sm.input[0], 1.0
        scores = g.producer.get(name)
        while scores is not None and g.scalar(scores) is not None:
            name, v = g.scalar(scores)  # type: ignore[misc]
            s_scale *= v
            scores = g.producer.get(name)
        outs = [c for c in g.consumers.get(sm.output[0], []) if c.op_type == "MatMul" and c.input[0] == sm.output[0]]
        if scores is None or scores.op_type != "MatMul" or len(outs) != 1:
            continue
        q, k, v = (_packed_projection(g, i) for i in (scores.input[0], scores.input[1], outs[0].input[1]))
        if q is None or k is None or v is None:
            continue
        packed = q[0] is k[0] is v[0]
        projs = [_qkv_matmul(g, p[0]) for p in ((q,) if packed else (q, k, v))]
        if any(p is None for p in projs) or len({p[0].input[0] for p in projs}) != 1:  # type: ignore[index]
            continue
        end = outs[0].output[0]
        for _ in range(4):  # attn·v → Transpose → Reshape to [B, N, C]
            nxt = g.consumers.get(end, [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Transpose", "Reshape"):
                break
            end = nxt[0].output[0]
        s_shape, e_shape = shapes.get(scores.output[0]), shapes.get(end)
        if s_shape is None or e_shape is None or len(s_shape) != 4 or len(e_shape) != 3:
            continue
        heads, width = s_shape[1], e_shape[2]
        cols = sum(g.const(p[0].input[1]).shape[1] for p in projs)  # type: ignore[index, union-attr]
        if not isinstance(heads, int) or not isinstance(width, int) or cols != 3 * width or width % heads:
            continue
        regions.append(_Region(projs[0][0].input[0], [p[0].input[1] for p in projs],  # type: ignore[index]
                               [p[1] for p in projs], end, heads, width, q[1] * k[1] * s_scale))
    return regions


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - no shapes: no attention region is recognized
        return {}
    out = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return out


def _rewrite(model: onnx.ModelProto, regions: list[_Region]) -> onnx.ModelProto:
    """A copy of ``model`` with each region computed by one Attention node (dead nodes removed)."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    g = fused.graph
    at = {r.out: r for r in regions}
    nodes = []
    for n in g.node:
        r = next((at[o] for o in n.output if o in at), None)
        if r is None:
            nodes.append(n)
            continue
        weight, bias = _packed_parameters(fused, r)
        nodes.append(helper.make_node("Attention", [r.x, weight, bias], [r.out], name=f"{r.out}/Attention",
                                      domain=MS_DOMAIN, num_heads=r.heads, scale=r.scale))
    del g.node[:]
    g.node.extend(_live(nodes, {o.name for o in g.output}))
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return _with_ms_opset(fused)


def _with_ms_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN
                                                                         for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _packed_parameters(model: onnx.ModelProto, r: _Region) -> tuple[str, str]:
    """Names of the [C, 3C] weight and [3C] bias Attention takes: the packed projection's own,
    or q, k and v's concatenated into new initializers (zeros where a projection has no bias)."""
    inits = {i.name: i for i in model.graph.initializer}
    if len(r.weights) == 1 and r.biases[0] is not None:
        return r.weights[0], r.biases[0]
    weight = r.weights[0]
    if len(r.weights) > 1:
        weight = f"{r.out}/attention_qkv_weight"
        model.graph.initializer.append(numpy_helper.from_array(
            np.concatenate([numpy_helper.to_array(inits[w]) for w in r.weights], axis=1), weight))
    cols = [numpy_helper.to_array(inits[w]).shape[1] for w in r.weights]
    parts = [numpy_helper.to_array(inits[b]) if b is not None else np.zeros(c, np.float32)
             for b, c in zip(r.biases, cols, strict=True)]
    bias = f"{r.out}/attention_qkv_bias"
    model.graph.initializer.append(numpy_helper.from_array(np.concatenate(parts).astype(np.float32), bias))
    return weight, bias


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on, in their order."""
    needed, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    return m.SerializeToString()


def _run(model_bytes: bytes, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    got = sess.run(names, {sess.get_inputs()[0].name: images})
    return dict(zip(names, got, strict=True))


def _region_errors(model: onnx.ModelProto, fused: onnx.ModelProto, regions: list[_Region],
                   images: np.ndarray) -> dict[str, float]:
    names = [r.out for r in regions]
    ref = _run(_with_outputs(model, names), images, names)
    got = _run(_with_outputs(fused, names), images, names)
    return {n: float(np.abs(ref[n] - got[n]).max() / (np.abs(ref[n]).max() or 1.0)) for n in names}


def fuse_attention(model: onnx.ModelProto, images: np.ndarray) -> tuple[onnx.ModelProto, FusionResult]:
    """Packed-qkv attention regions → ``com.microsoft.Attention``, each checked on ``images``."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    if ort_rewrites.fold_identities(folded):  # a repeated constant (zero qkv biases) must read as a constant
        model = folded
    regions = _find_regions(model, _shapes(model))
    result = FusionResult(attention_regions=sum(n.op_type == "Softmax" for n in model.graph.node))
    if not regions:
        return model, result
    fused = _rewrite(model, regions)
    errors = _region_errors(model, fused, regions, images)
    bad = [n for n, e in errors.items() if not e <= REGION_RTOL]
    if bad:
        regions = [r for r in regions if r.out not in bad]
        fused = _rewrite(model, regions) if regions else model
        result.unfused_regions = bad
    result.attention_fused = len(regions)
    return fused, result


def ort_transformer_fusions(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's transformers optimizer (model type ``vit``, its fusions only, CPU):
    LayerNorm + residual → SkipLayerNormalization, bias + erf GELU → BiasGelu."""
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    opt = optimize_by_fusion(model, model_type="vit", num_heads=0, hidden_size=0)  # 0: read from the graph
    return opt.model


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes and types of every tensor, contrib ops included (ONNX's own inference skips
    them), so that ONNX Runtime's calibrator and quantizer see the fused graph's tensors."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - untyped still runs; only quantizing it is harder
        return model


def fuse_for_cpu(src: Path, dst: Path, images: np.ndarray, attention: bool = True, approximate_gelu: bool = True,
                 ort_optimizer: bool = False, unread_tokens: bool = True) -> FusionResult:
    """Write the host-CPU form of ``src`` to ``dst`` (atomically): constants resolved,
    (``unread_tokens``) the tokens the head does not read left uncomputed
    (:mod:`edgevit.unread_tokens`), the patch embedding as a MatMul, (``approximate_gelu``)
    GELU as FastGelu, (``attention``) edgevit's attention fusion, then (``ort_optimizer``) ONNX
    Runtime's offline transformer fusions. ``images``: a few real inputs for the per-region
    check (the caller gates the whole model's parity)."""
    model = onnx.load(str(src))
    rewrites = {"identities_folded": ort_rewrites.fold_identities(model)}
    rewrites["unread_tokens"] = slice_unread_tokens(model, _shapes(model)) if unread_tokens else 0
    rewrites["patch_embedding_matmul"] = ort_rewrites.patch_embedding_matmul(model, _shapes(model))
    rewrites["fast_gelu"] = ort_rewrites.approximate_gelu(model) if approximate_gelu else 0
    if attention:
        fused, result = fuse_attention(model, images.astype(np.float32))
    else:
        fused, result = model, FusionResult(attention_regions=sum(n.op_type == "Softmax" for n in model.graph.node))
    result.rewrites = rewrites
    if ort_optimizer:
        try:
            fused = ort_transformer_fusions(fused)
        except Exception as e:  # noqa: BLE001 - ORT's optimizer raises anything; one line for the user
            raise EdgeVitError(f"export: ONNX Runtime's transformer fusions failed on {src.name}: {e}") from e
    fused = _typed(_with_ms_opset(fused))
    with atomic_path(Path(dst)) as tmp:
        onnx.save(fused, str(tmp))
        onnx.checker.check_model(str(tmp))
    from collections import Counter

    counts = Counter(n.op_type for n in fused.graph.node if n.domain == MS_DOMAIN)
    result.ops = dict(sorted(counts.items()))
    return result
