"""Cost of an ONNX file at batch 1: parameters, op counts, and MACs of MatMul/Gemm/Conv.

Shapes come from one ONNX Runtime run on zeros (:mod:`edgevit.onnx_shapes`, the probe the
latency predictor uses too)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.onnx_shapes import runtime_tensors

MATRIX_OPS = ("MatMul", "Gemm", "Conv")


def onnx_summary(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends for damaged files
        raise EdgeVitError(f"inspect: cannot read {path} as ONNX: {e}") from e
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    matrix = [n for n in model.graph.node if n.op_type in MATRIX_OPS]
    wanted = {t for n in matrix for t in (*n.input[:2], n.output[0]) if t and t not in inits}
    shapes = {name: list(a.shape) for name, a in inits.items()}
    shapes.update({k: list(v[0]) for k, v in runtime_tensors(model, wanted, where="inspect").items()})
    layers = []
    for node in matrix:
        a, w, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not (a and w and out):
            continue
        if node.op_type == "Conv":
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        else:
            k = a[-2] if node.op_type == "Gemm" and _attr(node, "transA") else a[-1]
            macs = int(np.prod(out)) * k
        layers.append({"name": node.name, "op": node.op_type, "macs": macs})
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input if i.name not in inits}
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    return {
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": inputs,
        "outputs": outputs,
        "params": int(sum(a.size for a in inits.values())),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "macs": sum(x["macs"] for x in layers),
        "layers": layers,
    }


def _attr(node: Any, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
