"""TensorRT engines on the machine edgevit runs on: build one from an ONNX file (FP16/INT8,
workspace, timing cache) and check its outputs against ONNX Runtime with pycuda.

Engines are not portable between GPUs or TensorRT versions, so this is for a host that is
itself the target; for a Jetson the deploy bundle carries the ONNX and the board builds its
own engine with the same code (``deploy/jetson/edgevit_jetson_bench.py``, which this module
reuses so both sides build identically). Written against the TensorRT Python API of 8.2 and
10.x; ``tensorrt`` and ``pycuda`` are imported only when called."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgevit.deploy.jetson import edgevit_jetson_bench as jetson
from edgevit.deploy.tensorrt_calib import entropy_calibrator, require_tensorrt
from edgevit.errors import EdgeVitError
from edgevit.fileio import atomic_path


def build_engine(onnx_path: Path, engine_path: Path, precision: str = "fp16", workspace_mb: int = 512,
                 timing_cache: Path | None = None, calib_images: np.ndarray | None = None,
                 calib_cache: Path | None = None, max_batch: int = 32) -> Path:
    """Serialize an engine for ``onnx_path``. INT8 without Q/DQ nodes in the model calibrates
    with the entropy calibrator on ``calib_images`` (cached in ``calib_cache``)."""
    import onnx

    trt, _ = require_tensorrt()
    model = onnx.load(str(onnx_path), load_external_data=False)
    inp = model.graph.input[0]
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    calibrator = None
    if precision == "int8" and not has_qdq:
        if calib_images is None or calib_cache is None:
            raise EdgeVitError("tensorrt: INT8 without Q/DQ nodes needs calibration images and a cache path")
        batch = min(8, len(calib_images))
        calibrator = entropy_calibrator(calib_images, calib_cache, batch_size=batch)
        shape = [batch, *shape[1:]]  # the calibration profile must take whole calibrator batches
    try:
        blob = jetson.build_engine(trt, str(onnx_path), precision, shape, workspace_mb,
                                   timing_cache=str(timing_cache) if timing_cache else None,
                                   calibrator=calibrator, max_batch=max_batch)
    except SystemExit as e:  # the board script reports with SystemExit; here it is a user-facing error
        raise EdgeVitError(f"tensorrt: {str(e.code).removeprefix('error: ')}") from e
    with atomic_path(Path(engine_path)) as tmp:
        Path(tmp).write_bytes(blob)
    return Path(engine_path)


def run_engine(engine_path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of ``images`` (N, C, H, W float32), one image at a time."""
    trt, cuda = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EdgeVitError(f"tensorrt: {engine_path} does not deserialize here (built by another GPU or "
                           "TensorRT version?); rebuild it on this machine")
    runner = jetson.Runner(trt, cuda, engine).bind([1, *images.shape[1:]])
    return np.concatenate([runner(images[i:i + 1]) for i in range(len(images))])


def parity(engine_path: Path, onnx_path: Path, images: np.ndarray, task: str = "classification") -> dict[str, Any]:
    """How far the engine's logits are from ONNX Runtime's on the same images (a segmenter: per pixel)."""
    from edgevit.onnx_io import parity_metrics, run_batches, session
    from edgevit.seg.deploy import seg_parity

    ref = run_batches(session(onnx_path), images.astype(np.float32))
    got = run_engine(engine_path, images.astype(np.float32))
    return seg_parity(ref, got) if task == "segmentation" else parity_metrics(ref, got)
