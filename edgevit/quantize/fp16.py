"""FP16 ONNX: weights and compute in half precision, with numerically touchy ops (LayerNorm,
Softmax and the pieces of a decomposed LayerNorm) kept in FP32 behind Cast nodes."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgevit.fileio import atomic_path

KEEP_FP32 = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"]


def convert_fp16(src: Path, dst: Path, keep_fp32: list[str] | None = None) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32 or KEEP_FP32))
    # The converter appends its Cast nodes at the end; the checker and TensorRT's parser need
    # each node after its inputs' producers: ONNX Runtime's own sort.
    OnnxModel.graph_topological_sort(half.graph)
    with atomic_path(Path(dst)) as tmp:
        onnx.save(half, str(tmp))
    onnx.checker.check_model(str(dst))

