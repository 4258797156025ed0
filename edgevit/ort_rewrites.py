"""Graph rewrites for ONNX Runtime's CPU kernels, besides attention (:mod:`edgevit.ort_fusion`).

Each rewrite matches one pattern of edgevit's exports and replaces it with what ONNX Runtime
runs faster on a CPU; the caller gates the whole model's parity:
- ``fold_identities``: the exporter writes a repeated constant (identical zero biases of a
  fresh model) once and the others as ``Identity`` of it; consumers read the initializer
  itself, so the other rewrites (and the quantizer) see constants where there are constants.
- ``patch_embedding_matmul``: a patch embedding (a Conv whose stride is its kernel, no
  padding, followed by flatten and transpose to tokens) becomes patchify (SpaceToDepth,
  Transpose, Reshape) and one MatMul: the same sums, but a MatMul that INT8 quantization covers (ONNX Runtime's
  dynamic INT8 has no Conv; its float Conv ran slower than the rewrite: README).
- ``approximate_gelu``: the exact (erf) GELU becomes ``com.microsoft.FastGelu``, its tanh
  approximation (|error| < 5e-4 for every input; what Optimum's O3 level does), whose kernel
  ran faster than the erf one (README).
Not done, because measured slower here: SkipLayerNormalization returning the residual sum
(ONNX Runtime's session fuses only the Adds whose sum has no other use)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class GraphIndex:
    """Producer/consumer maps and constants of one ONNX graph (rebuilt after each rewrite;
    :mod:`edgevit.ort_fusion` reads graphs through it too)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, n: onnx.NodeProto) -> tuple[str, float] | None:
        """(the other input, the factor) of a Mul or Div by one constant scalar."""
        if n.op_type not in ("Mul", "Div") or len(n.input) != 2:
            return None
        for k in (1, 0) if n.op_type == "Mul" else (1,):
            c = self.const(n.input[k])
            if c is not None and c.size == 1:
                v = float(c.reshape(-1)[0])
                return n.input[1 - k], v if n.op_type == "Mul" else 1.0 / v
        return None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in self.outputs else None


def _outputs_of(model: onnx.ModelProto, op_type: str) -> list[str]:
    """First outputs of the ``op_type`` nodes: keys that survive rewrites (node objects do not:
    the graph's node list is rebuilt, which copies them)."""
    return [n.output[0] for n in model.graph.node if n.op_type == op_type]


def _attr(n: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _replace(model: onnx.ModelProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto],
             inits: list[onnx.TensorProto] = ()) -> None:
    """Put ``new`` where the first of ``old`` was, drop ``old``, add ``inits``."""
    g = model.graph
    ids = {id(n) for n in old}
    at = min(i for i, n in enumerate(g.node) if id(n) in ids)
    kept = [n for i, n in enumerate(g.node) if id(n) not in ids and i < at]
    rest = [n for i, n in enumerate(g.node) if id(n) not in ids and i > at]
    del g.node[:]
    g.node.extend(kept + new + rest)
    g.initializer.extend(inits)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Also the nodes (Constants the rewrites orphaned) no graph output depends on."""
    needed, live = {o.name for o in model.graph.output}, []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    del model.graph.node[:]
    model.graph.node.extend(live[::-1])
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def fold_identities(model: onnx.ModelProto) -> int:
    """Consumers of ``Identity(initializer)`` read the initializer; returns how many Identities went."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    nodes = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in nodes:
        for k, i in enumerate(n.input):
            if i in alias:
                n.input[k] = alias[i]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(alias)


def patch_embedding_matmul(model: onnx.ModelProto, shapes: dict[str, list]) -> int:
    """Conv(kernel == stride, no padding) → flatten(2) → transpose(1, 2) becomes patchify + MatMul."""
    done = 0
    for key in _outputs_of(model, "Conv"):
        ix = GraphIndex(model)
        conv = ix.producer[key]
        w = ix.const(conv.input[1])
        x_shape = shapes.get(conv.input[0])
        if w is None or w.ndim != 4 or x_shape is None or len(x_shape) != 4:
            continue
        d, c, kh, kw = w.shape
        _, cx, h, wd = x_shape
        if (list(_attr(conv, "strides", [1, 1])) != [kh, kw] or any(_attr(conv, "pads", [0, 0, 0, 0]))
                or any(v != 1 for v in _attr(conv, "dilations", [1, 1])) or _attr(conv, "group", 1) != 1
                or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or cx != c
                or not isinstance(h, int) or not isinstance(wd, int) or h % kh or wd % kw
                or kh != kw):  # square patches: SpaceToDepth has one block size
            continue
        flat = _sole_use(ix, conv.output[0])  # flatten(2) exports as Reshape to [B, D, h * w]
        if flat is None or flat.op_type != "Reshape":
            continue
        if shapes.get(flat.output[0], [None])[1:] != [d, (h // kh) * (wd // kw)]:
            continue
        tr = _sole_use(ix, flat.output[0])
        if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [])) != [0, 2, 1]:
            continue
        gh, gw, k = h // kh, wd // kw, c * kh * kw
        p = conv.output[0] + "/patchify"
        bias = ix.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        # SpaceToDepth puts patch pixel (i, j) of channel c at depth (i * kw + j) * c_in + c (DCR)
        weight = w.transpose(2, 3, 1, 0).reshape(k, d).astype(np.float32)
        inits = [numpy_helper.from_array(np.array([0, gh * gw, k], np.int64), p + "/tokens"),
                 numpy_helper.from_array(np.ascontiguousarray(weight), p + "/weight")]
        mm_out = tr.output[0] if bias is None else p + "/matmul"
        new = [helper.make_node("SpaceToDepth", [conv.input[0]], [p + "/depth"], blocksize=kh, name=p + "/S2D"),
               helper.make_node("Transpose", [p + "/depth"], [p + "/patches"], perm=[0, 2, 3, 1],
                                name=p + "/Transpose"),
               helper.make_node("Reshape", [p + "/patches", p + "/tokens"], [p + "/rows"], name=p + "/Reshape"),
               helper.make_node("MatMul", [p + "/rows", p + "/weight"], [mm_out], name=p + "/MatMul")]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.astype(np.float32).reshape(d), p + "/bias"))
            new.append(helper.make_node("Add", [mm_out, p + "/bias"], [tr.output[0]], name=p + "/Add"))
        # Shape nodes of the two removed tensors: the batch of the input, then the constant dims
        tails = {conv.output[0]: [d, gh, gw], flat.output[0]: [d, gh * gw]}
        shape_nodes = [n for t in tails for n in ix.consumers.get(t, []) if n.op_type == "Shape"]
        if shape_nodes:
            inits.append(numpy_helper.from_array(np.array([0], np.int64), p + "/zero"))
            inits.append(numpy_helper.from_array(np.array([1], np.int64), p + "/one"))
            new[:0] = [helper.make_node("Shape", [conv.input[0]], [p + "/in_shape"], name=p + "/Shape"),
                       helper.make_node("Slice", [p + "/in_shape", p + "/zero", p + "/one"], [p + "/batch"],
                                        name=p + "/batch")]
        for i, n in enumerate(shape_nodes):
            dims = ["batch", *tails[n.input[0]]]
            dims = dims[_attr(n, "start", 0):_attr(n, "end", len(dims))]  # Shape's own slicing (opset 15)
            batch = [p + "/batch"] if dims[:1] == ["batch"] else []
            inits.append(numpy_helper.from_array(np.array(dims[len(batch):], np.int64), f"{p}/dims_{i}"))
            new.append(helper.make_node("Concat", [*batch, f"{p}/dims_{i}"], [n.output[0]], axis=0,
                                        name=f"{p}/shape_{i}"))
        before = onnx.ModelProto()
        before.CopyFrom(model)
        _replace(model, [conv, flat, tr, *shape_nodes], new, inits)
        _drop_unused_initializers(model)
        if _dangling(model):  # something else read a removed tensor: leave this one
            model.CopyFrom(before)
            continue
        done += 1
    return done


def _sole_use(ix: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The one consumer of ``name`` besides Shape nodes (the exporter computes reshape targets
    and the batch size from them; the rewrite computes those from its input instead)."""
    uses = [n for n in ix.consumers.get(name, []) if n.op_type != "Shape"]
    return uses[0] if len(uses) == 1 and name not in ix.outputs else None


def _dangling(model: onnx.ModelProto) -> list[str]:
    """Inputs no node, initializer or graph input provides."""
    have = ({i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
            | {o for n in model.graph.node for o in n.output} | {""})
    return [i for n in model.graph.node for i in n.input if i not in have]


def approximate_gelu(model: onnx.ModelProto) -> int:
    """x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it, → FastGelu(x)."""
    done = 0
    for key in _outputs_of(model, "Erf"):
        ix = GraphIndex(model)
        erf = ix.producer[key]
        pre = ix.producer.get(erf.input[0])
        if pre is None:
            continue
        scaled = ix.scalar(pre)  # x / sqrt 2
        if scaled is None or not math.isclose(scaled[1], 1 / math.sqrt(2), rel_tol=1e-4):
            continue
        x = scaled[0]
        add = ix.only_consumer(erf.output[0])
        if add is None or add.op_type != "Add":
            continue
        other = [i for i in add.input if i != erf.output[0]]
        c = ix.const(other[0]) if len(other) == 1 else None
        if c is None or c.size != 1 or float(c.reshape(-1)[0]) != 1.0:
            continue
        m1 = ix.only_consumer(add.output[0])
        if m1 is None or m1.op_type != "Mul":
            continue
        nodes, src = [pre, erf, add, m1], [i for i in m1.input if i != add.output[0]]
        if src == [x]:  # (x * (1 + erf)) * 0.5
            m2 = ix.only_consumer(m1.output[0])
            half = ix.scalar(m2) if m2 is not None else None
            if half is None or half[0] != m1.output[0] or half[1] != 0.5:
                continue
            nodes.append(m2)
        else:  # (x * 0.5) * (1 + erf)
            xh = ix.producer.get(src[0]) if len(src) == 1 else None
            half = ix.scalar(xh) if xh is not None else None
            if half is None or half[0] != x or half[1] != 0.5 or ix.only_consumer(xh.output[0]) is not m1:
                continue
            nodes.append(xh)
        final = nodes[-1] if src == [x] else m1  # whose output becomes FastGelu's
        if (any(o in ix.outputs for n in nodes if n is not final for o in n.output)
                or len(ix.consumers.get(pre.output[0], [])) != 1):
            continue
        out = final.output[0]
        _replace(model, nodes, [helper.make_node("FastGelu", [x], [out], name=out + "/FastGelu", domain=MS_DOMAIN)])
        done += 1
    if done:
        _drop_unused_initializers(model)
    return done
