"""An ONNX graph as the kernels an inference engine like TensorRT would run.

Each matrix node (Conv, MatMul, Gemm) and each data-movement or reduction node starts a
kernel; point-wise nodes (bias add, activation, residual add, BatchNorm at inference) fuse
into the kernel that produced their input, as TensorRT's conv/GEMM epilogue and point-wise
fusions do: when nothing else reads that tensor, or when every input comes from that one
kernel (x·sigmoid(x), x·hardsigmoid(x) and the exported GELU chain are one kernel, not two).
A decomposed LayerNorm (ReduceMean … ReduceMean … Div) is one memory kernel. Concat and
Split run no kernel (producers write into the joined buffer); shape bookkeeping (Reshape,
Squeeze, Shape, Constant, integer arithmetic) runs none either. A kernel's bytes are what it
reads from and writes to memory: its external inputs, its weights and its final outputs.

Convolutions are told apart by what TensorRT runs them with: 3×3 stride-1 dense ones
(``conv3x3``: Winograd-style algorithms that do fewer multiplies than the direct count the
FLOPs here are), 1×1 ones and Linear layers (``gemm``: a GEMM with a weight operand), other
dense or grouped ones (``conv``), depth-wise ones (``dwconv``); MatMul of two activations
(attention) is ``matmul``.

Shapes come from one ONNX Runtime run on zeros (:mod:`edgevit.onnx_shapes`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.onnx_shapes import TensorInfo, runtime_tensors

# Ops that only relabel a tensor (TensorRT turns them into no-op shuffles or folds them).
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
# Element-wise ops that fuse into the producer of their input.
POINTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf",
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
    "Softplus", "Mish", "Gelu", "Max", "Min", "Where", "Cast", "BatchNormalization", "Not", "And", "Or",
    "Equal", "Less", "Greater", "Sign", "Floor", "Ceil", "Round",
    "QuantizeLinear", "DequantizeLinear",
})
# Rough FLOPs per output element of the costlier point-wise functions.
POINTWISE_FLOPS = {"Erf": 8, "Exp": 4, "Log": 4, "Sigmoid": 4, "Tanh": 6, "HardSigmoid": 2, "HardSwish": 3,
                   "Softplus": 6, "Mish": 10, "Gelu": 10, "Pow": 4, "Sqrt": 2, "Div": 2, "BatchNormalization": 2}
MATRIX_OPS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})
# Joins and splits along an axis: TensorRT writes the producers into one buffer (no kernel).
ELIDED_OPS = frozenset({"Concat", "Split"})
# Reductions of a normalization chain: they join a memory kernel that already reduces.
NORM_OPS = frozenset({"ReduceMean"})
# Edge of the output tile a batched GEMM computes at once: an assumption of the model (TensorRT's
# kernel choice on the board is not visible here), not a measured figure.
GEMM_TILE = 64
COMPUTE_KINDS = ("conv3x3", "conv", "gemm", "dwconv", "matmul")
KINDS = (*COMPUTE_KINDS, "memory")


@dataclass
class Kernel:
    """One launched kernel: its class, work and traffic (bytes at the engine's precision)."""

    kind: str  # one of KINDS
    nodes: list[str]
    ops: list[str]
    flops: int
    bytes: int
    weight_bytes: int = 0
    tile_flops: int = 0  # attention MatMul: FLOPs with M and N rounded up to whole GEMM tiles

    @property
    def work_flops(self) -> int:
        """The FLOPs the roofline times: tile-padded for attention MatMuls (a 16x16 product
        occupies a whole tile), the counted FLOPs otherwise."""
        return self.tile_flops or self.flops


@dataclass
class KernelGraph:
    """The kernels of one model at batch 1, plus what the memory estimate needs."""

    kernels: list[Kernel] = field(default_factory=list)
    weight_bytes: int = 0  # all float initializers at the engine's precision
    peak_activation_bytes: int = 0  # largest set of live activations, in execution order
    opset: int | None = None
    op_types: dict[str, int] = field(default_factory=dict)
    input_shape: list[int] = field(default_factory=list)
    elem_bytes: int = 4

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    def counts(self) -> dict[str, int]:
        return dict(Counter(k.kind for k in self.kernels))

    def at(self, elem_bytes: int) -> KernelGraph:
        """The same kernels with float tensors at ``elem_bytes`` each: every byte count here is
        a float element count times the element size, so one graph serves every precision."""
        if elem_bytes == self.elem_bytes:
            return self

        def scale(n: int) -> int:
            return n * elem_bytes // self.elem_bytes

        kernels = [replace(k, bytes=scale(k.bytes), weight_bytes=scale(k.weight_bytes)) for k in self.kernels]
        return replace(self, kernels=kernels, weight_bytes=scale(self.weight_bytes), elem_bytes=elem_bytes,
                       peak_activation_bytes=scale(self.peak_activation_bytes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops"] = self.flops
        return d


def _attr(node: Any, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


@dataclass
class _Tensors:
    """What the kernel builder knows about every tensor: shape/dtype, constants, aliases."""

    info: dict[str, TensorInfo]
    elem_bytes: int
    const_like: set[str]
    alias: dict[str, str] = field(default_factory=dict)

    def resolve(self, t: str) -> str:
        while t in self.alias:
            t = self.alias[t]
        return t

    def nbytes(self, name: str) -> int:
        if name not in self.info:
            return 0
        shape, dtype = self.info[name]
        return int(np.prod(shape)) * self.elem_bytes if _is_float(dtype) else 0

    def is_activation(self, name: str) -> bool:
        return name not in self.const_like and name in self.info and _is_float(self.info[name][1])


def _load(path: Path | str | None, model: Any) -> Any:
    import onnx

    if model is not None:
        return model
    try:
        return onnx.load(str(path))
    except Exception as e:  # DecodeError and friends for damaged files
        raise EdgeVitError(f"predict: cannot read {path} as ONNX: {e}") from e


def _constants(nodes: list[Any], inits: set[str]) -> set[str]:
    """Initializers, Constant nodes and anything computed only from them: they fold away."""
    const_like = set(inits)
    for node in nodes:
        if node.op_type == "Constant" or (node.input and all(not i or i in const_like for i in node.input)):
            const_like.update(node.output)
    return const_like


def _free_nodes(nodes: list[Any], t: _Tensors) -> tuple[set[int], set[int]]:
    """Nodes that run no kernel: constants, integer shape arithmetic, relabelling (recorded as
    aliases), and Concat/Split, whose producers write straight into the joined buffer (the
    second set: their inputs count as written)."""
    free: set[int] = set()
    elided: set[int] = set()
    for idx, node in enumerate(nodes):
        outs = [o for o in node.output if o]
        if all(o in t.const_like for o in outs):
            free.add(idx)
        elif not any(o in t.info and _is_float(t.info[o][1]) for o in outs):
            free.add(idx)  # integer/bool shape arithmetic
        elif node.op_type in ALIAS_OPS:
            free.add(idx)
            t.alias[outs[0]] = node.input[0]
        elif node.op_type in ELIDED_OPS:
            free.add(idx)
            elided.add(idx)
    return free, elided


@dataclass
class _Builder:
    """Groups the non-free nodes into kernels, following TensorRT's fusions."""

    t: _Tensors
    consumers: dict[str, int]
    graph_outputs: set[str]
    kernels: list[Kernel] = field(default_factory=list)
    owner: dict[str, int] = field(default_factory=dict)  # tensor → the kernel that writes it
    internal: list[set[str]] = field(default_factory=list)  # per kernel: tensors it produces
    read: list[set[str]] = field(default_factory=list)  # per kernel: tensors it reads (each once)

    def fuse_target(self, node: Any, acts: list[str]) -> int | None:
        """The kernel this node joins, or None to start one. A point-wise node joins the kernel
        that made all its inputs (x·f(x), GELU's x·(1+erf(x/√2))/2: the diamond stays in one
        kernel) or, failing that, the producer of an input it alone reads. A reduction joins
        a memory kernel that already reduces: a decomposed LayerNorm is one kernel."""
        owners = {self.owner.get(a) for a in acts}
        if node.op_type in POINTWISE_OPS:
            if len(owners) == 1 and None not in owners and not any(a in self.graph_outputs for a in acts):
                return owners.pop()
            for a in acts:
                if a in self.owner and self.consumers[a] == 1 and a not in self.graph_outputs:
                    return self.owner[a]
        if node.op_type in NORM_OPS and len(owners) == 1 and None not in owners:
            k = owners.pop()
            if self.kernels[k].kind == "memory" and any(op in NORM_OPS for op in self.kernels[k].ops):
                return k
        return None

    def add(self, idx: int, node: Any) -> None:
        t = self.t
        acts = [r for r in (t.resolve(i) for i in node.input if i) if t.is_activation(r)]
        # constant inputs: initializers and constants computed from them (e.g. DequantizeLinear of
        # INT8 weights), counted at the engine's element size
        weights = [i for i in node.input if i and i in t.const_like and i in t.info]
        out_elems = sum(int(np.prod(t.info[o][0])) for o in node.output if o in t.info)
        k_idx = self.fuse_target(node, acts)
        if k_idx is None:
            kind, flops = _classify(node, t, out_elems)
            self.kernels.append(Kernel(kind, [], [], 0, 0))
            self.internal.append(set())
            self.read.append(set())
            k_idx = len(self.kernels) - 1
        else:
            flops = out_elems * POINTWISE_FLOPS.get(node.op_type, 1)
        k = self.kernels[k_idx]
        k.nodes.append(node.name or f"{node.op_type}_{idx}")
        k.ops.append(node.op_type)
        if k.kind == "matmul" and not k.ops[:-1]:  # the MatMul that starts the kernel
            k.tile_flops = _tile_flops(node, t)
        elif k.tile_flops:
            k.tile_flops += flops  # its fused epilogue
        k.flops += flops
        new = {x for x in (*weights, *acts) if x not in self.internal[k_idx] and x not in self.read[k_idx]}
        self.read[k_idx] |= new
        k.weight_bytes += sum(t.nbytes(w) for w in new if w in t.const_like)
        k.bytes += sum(t.nbytes(x) for x in new)
        for o in node.output:
            if o:
                self.owner[o] = k_idx
                self.internal[k_idx].add(o)

    def add_writes(self, nodes: list[Any], free: set[int], elided: set[int]) -> None:
        """A kernel writes the tensors that anyone outside it reads (or the graph returns)."""
        read_outside: set[str] = set(self.graph_outputs)
        for idx, node in enumerate(nodes):
            if idx in free and idx not in elided:
                continue
            here = self.owner.get(node.output[0], -1) if node.output and idx not in elided else -2
            for i in node.input:
                r = self.t.resolve(i) if i else ""
                if r in self.owner and self.owner[r] != here:
                    read_outside.add(r)
        for x in read_outside:
            if x in self.owner:
                self.kernels[self.owner[x]].bytes += self.t.nbytes(x)


def kernel_graph(path: Path | str | None, elem_bytes: int = 2, model: Any = None) -> KernelGraph:
    """The kernels of the ONNX model at ``path`` (or the loaded ``model``); float tensors count
    ``elem_bytes`` each (2 for an FP16 engine, 4 for FP32, 1 for INT8 activations)."""
    from onnx import numpy_helper

    model = _load(path, model)
    init_arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    info = runtime_tensors(model, where="predict")
    info.update({name: (arr.shape, arr.dtype) for name, arr in init_arrays.items()})
    nodes = list(model.graph.node)
    t = _Tensors(info, elem_bytes, _constants(nodes, set(init_arrays)))
    free, elided = _free_nodes(nodes, t)
    consumers: dict[str, int] = defaultdict(int)
    for idx, node in enumerate(nodes):
        if idx not in free:
            for i in node.input:
                if i and i not in t.const_like:
                    consumers[t.resolve(i)] += 1
    b = _Builder(t, consumers, {t.resolve(o.name) for o in model.graph.output})
    for idx, node in enumerate(nodes):
        if idx not in free:
            b.add(idx, node)
    b.add_writes(nodes, free, elided)
    kg = KernelGraph(kernels=b.kernels, weight_bytes=sum(k.weight_bytes for k in b.kernels), elem_bytes=elem_bytes,
                     peak_activation_bytes=_peak_live(nodes, (set(range(len(nodes))) - free) | elided, t,
                                                                b.graph_outputs),
                     opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
                     op_types=dict(sorted(Counter(n.op_type for n in nodes).items())))
    inp = next((i for i in model.graph.input if i.name not in init_arrays), None)
    if inp is not None and inp.name in info:
        kg.input_shape = list(info[inp.name][0])
    return kg


def _classify(node: Any, t: _Tensors, out_elems: int) -> tuple[str, int]:
    """A new kernel's class and FLOPs (2 per multiply-accumulate for matrix work)."""
    op, info = node.op_type, t.info
    if op in ("Conv", "ConvTranspose") and node.input[1] in info:
        w = info[node.input[1]][0]
        group = _attr(node, "group", 1)
        in_elems = int(np.prod(info[node.input[0]][0])) if node.input[0] in info else 0
        # Conv weights are [C_out, C_in/g, kh, kw] (MACs per output element); ConvTranspose weights
        # are [C_in, C_out/g, kh, kw] (MACs per input element)
        macs = (in_elems if op == "ConvTranspose" else out_elems) * int(np.prod(w[1:]))
        in_ch = info[node.input[0]][0][1] if node.input[0] in info else 0
        return _conv_kind(node, tuple(w[2:]), group, in_ch), 2 * macs
    if op in ("MatMul", "Gemm") and node.input[0] in info:
        a = info[node.input[0]][0]
        k = a[-2] if op == "Gemm" and _attr(node, "transA") else a[-1]
        weighted = len(node.input) > 1 and node.input[1] in t.const_like
        return ("gemm" if weighted else "matmul"), 2 * out_elems * int(k)
    if op in POINTWISE_OPS:
        return "memory", out_elems * POINTWISE_FLOPS.get(op, 1)
    in_elems = sum(int(np.prod(info[i][0])) for i in node.input if i in info)
    return "memory", max(in_elems, out_elems)


def _tile_flops(node: Any, t: _Tensors) -> int:
    """2·M'·N'·K per product of a MatMul, M' and N' rounded up to GEMM_TILE (the batched
    GEMM runs whole tiles, so small attention products waste most of each)."""
    a, b = (t.info[i][0] if i in t.info else None for i in node.input[:2])
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return 0
    m, k, n = a[-2], a[-1], b[-1]
    batch = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))) if len(a) > 2 or len(b) > 2 else 1

    def up(x: int) -> int:
        return -(-int(x) // GEMM_TILE) * GEMM_TILE

    return 2 * batch * up(m) * up(n) * int(k)


def _conv_kind(node: Any, kernel: tuple[int, ...], group: int, in_ch: int) -> str:
    if group > 1 and group == in_ch:
        return "dwconv"
    if all(k == 1 for k in kernel):
        return "gemm"
    strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])
    dilations = next((list(a.ints) for a in node.attribute if a.name == "dilations"), [1])
    if (node.op_type == "Conv" and group == 1 and kernel == (3, 3) and set(strides) == {1}
            and set(dilations) == {1}):
        return "conv3x3"
    return "conv"


def _peak_live(nodes: list[Any], running: set[int], t: _Tensors, graph_outputs: set[str]) -> int:
    """Largest sum of activation bytes alive at once, running nodes in file order (``running``:
    the nodes whose outputs take memory of their own)."""
    last_use: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for i in node.input:
            if i and i not in t.const_like:
                last_use[t.resolve(i)] = idx
    live: dict[str, int] = {}
    peak = 0
    for idx, node in enumerate(nodes):
        if idx in running:
            for o in node.output:
                if o and o not in t.const_like:
                    live[o] = t.nbytes(o)
            peak = max(peak, sum(live.values()))
        for x in [x for x in live if last_use.get(x, -1) <= idx and x not in graph_outputs]:
            del live[x]
    return peak
