"""Compute only the tokens a classifier reads: the CPU form's tail rewrite.

A ViT with token pooling reads one token (the class token) of its last block's output, yet
the exported graph computes every token through that block: its projection, MLP, norms and
every query row of its attention. ``slice_unread_tokens`` works back from each
``Gather(x, c, axis)`` of one constant token: a tensor every consumer of which wants only row
``c`` is computed for that row alone, where its producer works row by row (elementwise ops
with broadcasting, LayerNormalization and Softmax over other axes, MatMul over a row's
operand, Transpose, Reshape, Squeeze, Unsqueeze); a tensor some consumer needs whole (the last
block's keys and values, all the blocks before) is computed whole and sliced where the rows
begin. The sums per row are the ones the full graph does, so the logits stay what they were
(the caller gates parity). On a DeiT-Tiny shape that is the last block's projection and MLP
and two thirds of its attention: about 6 % of the MACs (tests/test_unread_tokens.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgevit.ort_rewrites import GraphIndex, _attr, _drop_unused_initializers

Rows = tuple[int, int]  # (axis, index): the one row of that axis a tensor's consumers read

UNARY = frozenset({"Erf", "Tanh", "Sigmoid", "Relu", "Neg", "Sqrt", "Exp", "Log", "Abs", "Cast", "Identity",
                   "Softplus", "Gelu", "Reciprocal", "HardSigmoid", "HardSwish", "LeakyRelu", "Clip"})
BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"})


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(ix: GraphIndex, n: onnx.NodeProto, rank: int) -> list[int] | None:
    """Squeeze/Unsqueeze axes (an input from opset 13, an attribute before)."""
    if len(n.input) > 1 and n.input[1]:
        c = ix.const(n.input[1])
        return None if c is None else [_norm(int(a), rank) for a in c.reshape(-1)]
    a = _attr(n, "axes", None)
    return None if a is None else [_norm(int(v), rank) for v in a]


def _broadcast(ins: list[list | None], axis: int, out: list) -> list[int | None] | None:
    """Where each input of a broadcasting op holds the output's ``axis`` (numpy rules: trailing
    axes aligned): its own axis of the same size, None where it has none or size 1; None
    overall where a size is unknown (a symbolic 1 would broadcast)."""
    got: list[int | None] = []
    for s in ins:
        if s is None:
            return None
        k = axis - (len(out) - len(s))
        if k < 0 or s[k] == 1:
            got.append(None)
        elif s[k] == out[axis] and isinstance(s[k], int):
            got.append(k)
        else:
            return None
    return got


def _input_axes(ix: GraphIndex, n: onnx.NodeProto, axis: int, shapes: dict[str, list]) -> list[int | None] | None:
    """For a node whose output is wanted at one row of ``axis``: the axis of each input that row
    comes from (None: the input is read whole, e.g. broadcast), or None where the node does not
    work row by row along ``axis``."""
    out = shapes.get(n.output[0])
    if out is None or len(n.output) != 1:
        return None
    rank = len(out)
    ins = [list(ix.inits[i].dims) if i in ix.inits else shapes.get(i) for i in n.input]
    if n.op_type in UNARY:
        return [axis] + [None] * (len(n.input) - 1)  # Clip's bounds, LeakyRelu has none
    if n.op_type in BROADCAST:
        return _broadcast(ins, axis, out)
    if n.op_type == "LayerNormalization":
        if axis >= _norm(_attr(n, "axis", -1), rank):
            return None
        return [axis] + [None] * (len(n.input) - 1)
    if n.op_type in ("Softmax", "LogSoftmax"):
        return None if axis == _norm(_attr(n, "axis", -1), rank) else [axis]
    if n.op_type == "MatMul":
        a, b = ins
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        if axis == rank - 2:
            return [len(a) - 2, None]
        if axis == rank - 1:
            return [None, len(b) - 1]
        return _broadcast([a[:-2], b[:-2]], axis, out[:-2])
    if n.op_type == "Transpose":
        perm = _attr(n, "perm", list(range(rank))[::-1])
        return [int(perm[axis])]
    if n.op_type in ("Squeeze", "Unsqueeze"):
        s = ins[0]
        if s is None:
            return None
        axes = _axes(ix, n, len(s) if n.op_type == "Squeeze" else rank)
        if axes is None:
            return None
        if n.op_type == "Squeeze":
            kept = [k for k in range(len(s)) if k not in axes]
            return [kept[axis], *([None] * (len(n.input) - 1))]
        if axis in axes:
            return None
        return [axis - sum(1 for k in axes if k < axis), *([None] * (len(n.input) - 1))]
    if n.op_type == "Reshape":
        s = ins[0]
        if s is None or _reshape_target(out, axis) is None:
            return None
        for k in range(len(s)):  # the same leading dims, then this one: the row keeps its place
            if list(s[:k]) == list(out[:axis]) and s[k] == out[axis]:
                return [k, None]
        return None
    return None


def _reshape_target(out: list, axis: int) -> list[int] | None:
    """A constant shape for a Reshape computing one row of ``axis``: 1 there, -1 for the one
    symbolic (batch) dim, the others as they are; None where more than one dim is symbolic."""
    dims = [1 if k == axis else (d if isinstance(d, int) and d > 0 else -1) for k, d in enumerate(out)]
    return dims if dims.count(-1) <= 1 else None


def _token_gathers(ix: GraphIndex, model: onnx.ModelProto, shapes: dict[str, list]) -> dict[str, Rows]:
    """Gather nodes (by output) reading one constant row of a ranked tensor along a fixed-size axis."""
    found = {}
    for n in model.graph.node:
        if n.op_type != "Gather" or n.input[0] in ix.inits:
            continue
        idx, s = ix.const(n.input[1]), shapes.get(n.input[0])
        if idx is None or idx.ndim != 0 or s is None:
            continue
        axis = _norm(_attr(n, "axis", 0), len(s))
        if not isinstance(s[axis], int) or s[axis] <= 1:
            continue
        c = int(idx)
        found[n.output[0]] = (axis, c + s[axis] if c < 0 else c)
    return found


def slice_unread_tokens(model: onnx.ModelProto, shapes: dict[str, list]) -> int:
    """Rewrite ``model`` so that tensors read at one row only are computed at that row (see the
    module docstring); ``shapes``: every tensor's shape (symbolic dims as strings). Returns how
    many nodes now compute one row."""
    ix = GraphIndex(model)
    gathers = _token_gathers(ix, model, shapes)
    if not gathers:
        return 0
    nodes = list(model.graph.node)
    # demand[(node output, input position)]: the row that consumer reads of that input
    wants: dict[tuple[int, int], Rows] = {}
    rows_of: dict[str, Rows] = {}  # tensors computed at one row
    for k, n in enumerate(nodes):
        if n.output and n.output[0] in gathers:
            wants[(k, 0)] = gathers[n.output[0]]
    position = {id(n): k for k, n in enumerate(nodes)}

    def demand(t: str) -> Rows | None:
        """The row every consumer of ``t`` reads, or None if one reads it whole."""
        if t in ix.outputs or t not in ix.consumers:
            return None
        got = set()
        for c in ix.consumers[t]:
            k = position[id(c)]
            got.update(wants.get((k, j)) for j, i in enumerate(c.input) if i == t)
        return got.pop() if len(got) == 1 and None not in got else None

    for k in range(len(nodes) - 1, -1, -1):  # consumers before producers
        n = nodes[k]
        if n.op_type == "Constant" or len(n.output) != 1:
            continue
        want = demand(n.output[0])
        if want is None:
            continue
        axes = _input_axes(ix, n, want[0], shapes)
        if axes is None:
            continue
        rows_of[n.output[0]] = want
        for j, a in enumerate(axes):
            if a is not None:
                wants[(k, j)] = (a, want[1])
    if not rows_of:
        return 0
    new_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    sliced: dict[tuple[str, Rows], str] = {}

    def rows(t: str, r: Rows) -> str:
        """``t`` at row ``r``: itself where its producer already computes that row, else a Slice."""
        if rows_of.get(t) == r:
            return t
        if (t, r) not in sliced:
            name = f"{t}/row{r[1]}_axis{r[0]}"
            for suffix, v in (("starts", r[1]), ("ends", r[1] + 1), ("axes", r[0])):
                inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{name}/{suffix}"))
            new_nodes.append(helper.make_node("Slice", [t, f"{name}/starts", f"{name}/ends", f"{name}/axes"],
                                              [name], name=name))
            sliced[(t, r)] = name
        return sliced[(t, r)]

    zero = "unread_tokens/zero"
    inits.append(numpy_helper.from_array(np.array(0, np.int64), zero))
    for k, n in enumerate(nodes):
        inputs = list(n.input)
        if n.output and n.output[0] in rows_of:
            for j, i in enumerate(inputs):
                r = wants.get((k, j))
                if r is not None and i:
                    inputs[j] = rows(i, r)
        elif n.output and n.output[0] in gathers and rows_of.get(n.input[0]) == gathers[n.output[0]]:
            inputs[1] = zero  # its data holds that one row now
        if n.op_type == "Reshape" and n.output[0] in rows_of:
            target = _reshape_target(shapes[n.output[0]], rows_of[n.output[0]][0])
            shape_name = n.output[0] + "/row_shape"
            inits.append(numpy_helper.from_array(np.array(target, np.int64), shape_name))
            inputs[1] = shape_name
            del n.attribute[:]  # allowzero: the target has no zeros
        del n.input[:]
        n.input.extend(inputs)
        new_nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(inits)
    rewritten = set(rows_of)
    keep = [v for v in model.graph.value_info if v.name not in rewritten]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    _drop_unused_initializers(model)
    return len(rows_of)
