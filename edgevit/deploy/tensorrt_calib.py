"""TensorRT implicit-INT8 calibration: an ``IInt8EntropyCalibrator2`` fed from a calibration
manifest's images, writing TensorRT's calibration cache.

Written against the TensorRT Python API of 8.2 (JetPack 4.6) and 10.x; ``tensorrt`` and
``pycuda`` are imported inside the functions, so this module imports on any machine. Only a
machine with an NVIDIA GPU and TensorRT can run it (the ``gpu``-marked test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.fileio import atomic_path


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, pycuda.driver) with a CUDA context, or one clear error."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EdgeVitError(
            "tensorrt is not installed: INT8 calibration caches and engines need NVIDIA TensorRT "
            "(JetPack on a Jetson; `pip install 'edgevit[tensorrt]'` with NVIDIA's index elsewhere)"
        ) from e
    try:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver as cuda
    except ImportError as e:
        raise EdgeVitError("pycuda is not installed: TensorRT calibration needs it to copy batches to the GPU") from e
    return trt, cuda


def entropy_calibrator(images: np.ndarray, cache: Path, batch_size: int = 8) -> Any:
    """A TensorRT IInt8EntropyCalibrator2 over ``images`` (N, C, H, W float32, already
    normalised like the model's input) that reads/writes ``cache``."""
    trt, cuda = require_tensorrt()
    data = np.ascontiguousarray(images, dtype=np.float32)
    if len(data) < batch_size:
        raise EdgeVitError(f"calibration: {len(data)} images are fewer than one batch of {batch_size}")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.device = cuda.mem_alloc(data[:batch_size].nbytes)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:  # noqa: ARG002 - TensorRT's signature
            if self.index + batch_size > len(data):
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(data[self.index:self.index + batch_size]))
            self.index += batch_size
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return Path(cache).read_bytes() if Path(cache).is_file() else None

        def write_calibration_cache(self, blob: Any) -> None:
            with atomic_path(Path(cache)) as tmp:
                Path(tmp).write_bytes(bytes(blob))

    return EntropyCalibrator()


def write_calibration_cache(onnx_path: Path, images: np.ndarray, cache: Path, batch_size: int = 8,
                            workspace_mb: int = 512) -> Path:
    """Build an INT8 engine once with the entropy calibrator so TensorRT writes ``cache``
    (reused by later builds, on the host or the Jetson, for the same network)."""
    from edgevit.deploy.jetson import edgevit_jetson_bench as jetson

    trt, _ = require_tensorrt()
    shape = [batch_size, *images.shape[1:]]
    try:
        jetson.build_engine(trt, str(onnx_path), "int8", shape, workspace_mb,
                            calibrator=entropy_calibrator(images, cache, batch_size), max_batch=batch_size)
    except SystemExit as e:
        raise EdgeVitError(f"tensorrt: {str(e.code).removeprefix('error: ')}") from e
    if not Path(cache).is_file():
        raise EdgeVitError("tensorrt: the build finished but wrote no calibration cache")
    return Path(cache)
