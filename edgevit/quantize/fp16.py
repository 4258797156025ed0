"""FP16 ONNX: weights and compute in half precision, with numerically touchy ops (LayerNorm,
Softmax and the pieces of a decomposed LayerNorm) kept in FP32 behind Cast nodes."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgevit.fileio import atomic_path

KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"]


def convert_fp16(src: Path, dst: Path, keep_fp32: list[str] | None = None) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32 or KEEP_FP32))
    _toposort(half.graph)  # the converter appends its Cast nodes at the end
    with atomic_path(Path(dst)) as tmp:
        onnx.save(half, str(tmp))
    onnx.checker.check_model(str(dst))


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (what the checker and
    TensorRT's parser require)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("the FP16 graph has a cycle or a missing input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
