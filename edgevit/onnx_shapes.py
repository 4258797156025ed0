"""Shapes and dtypes of the tensors inside an ONNX model, from one ONNX Runtime run on zeros.

Static shape inference stops at Reshapes whose target shape is computed at run time (how ViT
exports split heads), so the inspector and the latency predictor both ask ONNX Runtime: every
wanted tensor is exposed as a graph output and the model runs once, dynamic dims set to 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from edgevit.errors import EdgeVitError

TensorInfo = tuple[tuple[int, ...], np.dtype]


def runtime_tensors(model: Any, names: Iterable[str] | None = None, where: str = "onnx") -> dict[str, TensorInfo]:
    """Shape and dtype of ``names`` (default: every node output) plus the fed inputs."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = set(names) if names is not None else {o for n in probe.graph.node for o in n.output if o}
    for name in sorted(wanted - known):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise EdgeVitError(f"{where}: ONNX Runtime cannot load the model to read its shapes: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for inp in sess.get_inputs():
        if inp.name in inits:
            continue
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        dtype = np.float16 if "float16" in inp.type else np.float32
        feed[inp.name] = np.zeros(shape, dtype=dtype)
    try:
        outs = sess.run(None, feed)
    except Exception as e:  # a model that loads but cannot run on zeros
        raise EdgeVitError(f"{where}: ONNX Runtime cannot run the model on zeros to read its shapes: {e}") from e
    tensors = {o.name: (tuple(v.shape), v.dtype) for o, v in zip(sess.get_outputs(), outs, strict=True)}
    tensors.update({k: (v.shape, v.dtype) for k, v in feed.items()})
    return tensors
