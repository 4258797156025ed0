"""An ONNX graph as the kernels an inference engine like TensorRT would run.

Each matrix node (Conv, MatMul, Gemm) and each data-movement or reduction node starts a
kernel; point-wise nodes (bias add, activation, residual add, BatchNorm at inference) fuse
into the kernel that produced their input when nothing else reads that tensor, as TensorRT's
conv/GEMM epilogue and point-wise fusions do; chains of point-wise nodes fuse into one.
Shape bookkeeping (Reshape, Squeeze, Shape, Constant, integer arithmetic) runs no kernel.
A kernel's bytes are what it reads from and writes to memory: its external inputs, its
weights and its final outputs, never the tensors that stay inside a fused chain.

Shapes come from one ONNX Runtime run on zeros with every tensor exposed as an output,
because static shape inference stops at Reshapes whose shape is computed at run time.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgeVitError

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
KINDS = ("conv", "dwconv", "matmul", "memory")


@dataclass
class Kernel:
    """One launched kernel: its class, work and traffic (bytes at the engine's precision)."""

    kind: str  # conv | dwconv | matmul | memory
    nodes: list[str]
    ops: list[str]
    flops: int
    bytes: int
    weight_bytes: int = 0


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops"] = self.flops
        return d


def _runtime_tensors(model: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor, from one run on zeros (dynamic dims set to 1)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = {o for n in probe.graph.node for o in n.output if o} - {o.name for o in probe.graph.output}
    for name in sorted(names):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise EdgeVitError(f"predict: ONNX Runtime cannot load the model to read its shapes: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for inp in sess.get_inputs():
        if inp.name in inits:
            continue
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        dtype = np.float16 if "float16" in inp.type else np.float32
        feed[inp.name] = np.zeros(shape, dtype=dtype)
    outs = sess.run(None, feed)
    tensors = {o.name: (tuple(v.shape), v.dtype) for o, v in zip(sess.get_outputs(), outs, strict=True)}
    tensors.update({k: (v.shape, v.dtype) for k, v in feed.items()})
    return tensors


def _attr(node: Any, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


def kernel_graph(path: Path | str, elem_bytes: int = 2, model: Any = None) -> KernelGraph:
    """The kernels of the ONNX model at ``path``; float tensors count ``elem_bytes`` each
    (2 for an FP16 engine, 4 for FP32, 1 for INT8 activations)."""
    import onnx
    from onnx import numpy_helper

    if model is None:
        try:
            model = onnx.load(str(path))
        except Exception as e:  # DecodeError and friends for damaged files
            raise EdgeVitError(f"predict: cannot read {path} as ONNX: {e}") from e
    init_arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tensors = _runtime_tensors(model)
    for name, arr in init_arrays.items():
        tensors[name] = (arr.shape, arr.dtype)

    def nbytes(name: str) -> int:
        if name not in tensors:
            return 0
        shape, dtype = tensors[name]
        return int(np.prod(shape)) * elem_bytes if _is_float(dtype) else 0

    nodes = list(model.graph.node)
    const_like = set(init_arrays)
    for node in nodes:  # Constant nodes and anything computed only from constants fold away
        if node.op_type == "Constant" or (node.input and all(not i or i in const_like for i in node.input)):
            const_like.update(node.output)

    alias: dict[str, str] = {}

    def resolve(t: str) -> str:
        while t in alias:
            t = alias[t]
        return t

    free: set[int] = set()
    for idx, node in enumerate(nodes):
        outs = [o for o in node.output if o]
        if all(o in const_like for o in outs):
            free.add(idx)
        elif not any(o in tensors and _is_float(tensors[o][1]) for o in outs):
            free.add(idx)  # integer/bool shape arithmetic
        elif node.op_type in ALIAS_OPS:
            free.add(idx)
            alias[outs[0]] = node.input[0]
    consumers: dict[str, int] = defaultdict(int)
    for idx, node in enumerate(nodes):
        if idx in free:
            continue
        for i in node.input:
            if i and i not in const_like:
                consumers[resolve(i)] += 1
    graph_outputs = {resolve(o.name) for o in model.graph.output}

    kernels: list[Kernel] = []
    owner: dict[str, int] = {}  # tensor → index of the kernel that writes it
    internal: list[set[str]] = []  # per kernel: tensors it produces
    read: list[set[str]] = []  # per kernel: tensors it reads from memory (each counted once)
    for idx, node in enumerate(nodes):
        if idx in free:
            continue
        ins = [resolve(i) for i in node.input if i]
        acts = [i for i in ins if i not in const_like and i in tensors and _is_float(tensors[i][1])]
        # constant inputs: initializers, and constants computed from them (e.g. DequantizeLinear of
        # INT8 weights), counted at the engine's element size
        weights = [i for i in node.input if i and i in const_like and i in tensors]
        out_elems = sum(int(np.prod(tensors[o][0])) for o in node.output if o in tensors)
        k_idx = None
        if node.op_type in POINTWISE_OPS:
            for a in acts:  # fuse into the producer when this node is its tensor's only reader
                if a in owner and consumers[a] == 1 and a not in graph_outputs:
                    k_idx = owner[a]
                    break
        if k_idx is None:
            kind, flops = _classify(node, tensors, out_elems)
            kernels.append(Kernel(kind, [], [], 0, 0))
            internal.append(set())
            read.append(set())
            k_idx = len(kernels) - 1
        else:
            flops = out_elems * POINTWISE_FLOPS.get(node.op_type, 1)
        k = kernels[k_idx]
        k.nodes.append(node.name or f"{node.op_type}_{idx}")
        k.ops.append(node.op_type)
        k.flops += flops
        new = {t for t in (*weights, *acts) if t not in internal[k_idx] and t not in read[k_idx]}
        read[k_idx] |= new
        wb = sum(nbytes(w) for w in new if w in const_like)
        k.weight_bytes += wb
        k.bytes += sum(nbytes(t) for t in new)
        for o in node.output:
            if o:
                owner[o] = k_idx
                internal[k_idx].add(o)
    # a kernel writes the tensors that anyone outside it reads (or the graph returns)
    read_outside: set[str] = set(graph_outputs)
    for idx, node in enumerate(nodes):
        if idx in free:
            continue
        for i in node.input:
            r = resolve(i) if i else ""
            if r in owner and owner[r] != owner.get(node.output[0] if node.output else "", -1):
                read_outside.add(r)
    for t in read_outside:
        if t in owner:
            kernels[owner[t]].bytes += nbytes(t)

    kg = KernelGraph(kernels=kernels, weight_bytes=sum(k.weight_bytes for k in kernels), elem_bytes=elem_bytes,
                     peak_activation_bytes=_peak_live(nodes, free, resolve, nbytes, const_like, graph_outputs),
                     opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
                     op_types=dict(sorted(Counter(n.op_type for n in nodes).items())))
    inp = next((i for i in model.graph.input if i.name not in init_arrays), None)
    if inp is not None and inp.name in tensors:
        kg.input_shape = list(tensors[inp.name][0])
    return kg


def _classify(node: Any, tensors: dict[str, tuple[tuple[int, ...], np.dtype]], out_elems: int) -> tuple[str, int]:
    """A new kernel's class and FLOPs (2 per multiply-accumulate for matrix work)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and node.input[1] in tensors:
        w = tensors[node.input[1]][0]
        group = _attr(node, "group", 1)
        in_elems = int(np.prod(tensors[node.input[0]][0])) if node.input[0] in tensors else 0
        # Conv weights are [C_out, C_in/g, kh, kw] (MACs per output element); ConvTranspose weights
        # are [C_in, C_out/g, kh, kw] (MACs per input element)
        macs = (in_elems if op == "ConvTranspose" else out_elems) * int(np.prod(w[1:]))
        in_ch = tensors[node.input[0]][0][1] if node.input[0] in tensors else 0
        return ("dwconv" if group > 1 and group == in_ch else "conv"), 2 * macs
    if op in ("MatMul", "Gemm") and node.input[0] in tensors:
        a = tensors[node.input[0]][0]
        k = a[-2] if op == "Gemm" and _attr(node, "transA") else a[-1]
        return "matmul", 2 * out_elems * int(k)
    if op in POINTWISE_OPS:
        return "memory", out_elems * POINTWISE_FLOPS.get(op, 1)
    in_elems = sum(int(np.prod(tensors[i][0])) for i in node.input if i in tensors)
    return "memory", max(in_elems, out_elems)


def _peak_live(nodes: list[Any], free: set[int], resolve: Any, nbytes: Any, const_like: set[str],
               graph_outputs: set[str]) -> int:
    """Largest sum of activation bytes alive at once, running nodes in file order."""
    last_use: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for i in node.input:
            if i and i not in const_like:
                last_use[resolve(i)] = idx
    live: dict[str, int] = {}
    peak = 0
    for idx, node in enumerate(nodes):
        if idx not in free:
            for o in node.output:
                if o and o not in const_like:
                    live[o] = nbytes(o)
            peak = max(peak, sum(live.values()))
        for t in [t for t in live if last_use.get(t, -1) <= idx and t not in graph_outputs]:
            del live[t]
    return peak
