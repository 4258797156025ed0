"""Static INT8 post-training quantization with ONNX Runtime's tooling, QDQ format.

Layouts: ``tensorrt`` = signed INT8 activations and weights, symmetric, zero point 0 (what
TensorRT's explicit quantization accepts); ``ort_cpu`` = unsigned INT8 activations
(asymmetric) with signed symmetric per-channel weights, which ONNX Runtime's x86 kernels
(VNNI) run fastest. Both quantize weights per output channel and only the inputs of MatMul
and Gemm, never their outputs. NVIDIA's ModelOpt places Q/DQ so for TensorRT (its ONNX PTQ
output in bench/peers.py); on ONNX Runtime it turns each DQ→MatMul into one
MatMulIntegerToFloat instead of a QLinearMatMul followed by a DequantizeLinear."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from edgevit.errors import EdgeVitError
from edgevit.fileio import atomic_path
from edgevit.quantize.cpu_features import int8_weights_need_reduced_range

CalibrationMethod = Literal["minmax", "percentile", "entropy"]
Layout = Literal["tensorrt", "ort_cpu", "ort_cpu_dynamic"]


class _Reader:
    """Feeds calibration images to ONNX Runtime's calibrator, a batch at a time; a model with a
    fixed batch (a static-batch export for a Jetson) gets batches of exactly that size."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int, fixed: int | None = None) -> None:
        if fixed:
            if len(images) < fixed:
                raise EdgeVitError(f"quantize: the model's input has a fixed batch of {fixed}; give at least "
                                   f"{fixed} calibration images (got {len(images)})")
            batch, images = fixed, images[: len(images) // fixed * fixed]
        self.batches: Iterator[np.ndarray] = iter([images[i:i + batch] for i in range(0, len(images), batch)])
        self.name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self.batches, None)
        return None if b is None else {self.name: b}

    def rewind(self) -> None:  # pragma: no cover - part of the reader protocol
        pass


def _ort_method(method: CalibrationMethod) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]


def preprocess(src: Path, dst: Path) -> None:
    """Shape inference + graph optimisation, as ONNX Runtime recommends before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def activation_matmuls(path: Path) -> list[str]:
    """MatMuls of two activations (attention's q·kᵀ and attn·v): no weight on either side."""
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in inits for i in n.input)]


def quantize_dynamic_int8(src: Path, dst: Path, op_types: list[str] | None = None,
                          nodes_to_exclude: list[str] | None = None, reduce_range: bool | None = None) -> None:
    """INT8 weights, activations quantized on the fly per batch (ONNX Runtime's
    DynamicQuantizeMatMul): no calibration. ``reduce_range`` (7-bit weights; default: on an
    x86 CPU without VNNI, see :mod:`edgevit.quantize.cpu_features`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if reduce_range is None:
        reduce_range = int8_weights_need_reduced_range()
    with atomic_path(Path(dst)) as tmp:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                         op_types_to_quantize=[t for t in (op_types or ["MatMul", "Gemm"]) if t != "Conv"],
                         nodes_to_exclude=nodes_to_exclude or [], per_channel=False, reduce_range=reduce_range,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # contrib ops: no inferred type


def quantizable_nodes(path: Path, op_types: list[str]) -> list[str]:
    model = onnx.load(str(path))
    return [n.name for n in model.graph.node if n.op_type in op_types]


def compute_activation_ranges(src: Path, images: np.ndarray, ranges: Path,
                              calibration_method: CalibrationMethod = "percentile", percentile: float = 99.999,
                              layout: Layout = "tensorrt", op_types: list[str] | None = None,
                              batch: int = 32) -> Path:
    """Activation ranges of ``src`` on the calibration ``images``, written to ``ranges``
    (ORT's tensor-range JSON): computed once, reused by every quantization of the same model
    and calibration method."""
    import tempfile

    from onnxruntime.quantization import create_calibrator, save_tensors_data

    calib = _ort_method(calibration_method)
    options: dict[str, Any] = {"symmetric": layout == "tensorrt", "moving_average": False, "percentile": percentile}
    if calibration_method == "entropy":
        # ORT's entropy default is 128 histogram bins for 128 quantized bins, which leaves one
        # candidate threshold, the full range (= min/max); TensorRT's calibrator uses 2048 bins.
        options.update(num_bins=2048, num_quantized_bins=128)
    graph_input = onnx.load(str(src), load_external_data=False).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    with tempfile.TemporaryDirectory(prefix="edgevit-calib-") as tmp:
        calibrator = create_calibrator(Path(src), op_types or ["MatMul", "Gemm", "Conv"],
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calib, providers=["CPUExecutionProvider"],
                                       extra_options=options)
        calibrator.collect_data(_Reader(images.astype(np.float32), graph_input.name, batch, fixed))
        computed = calibrator.compute_data()
        del calibrator
    with atomic_path(Path(ranges)) as tmp_ranges:
        save_tensors_data(computed, str(tmp_ranges))
    return Path(ranges)


def quantize_int8(
    src: Path,
    dst: Path,
    images: np.ndarray | None = None,
    calibration_method: CalibrationMethod = "percentile",
    percentile: float = 99.999,
    layout: Layout = "tensorrt",
    op_types: list[str] | None = None,
    nodes_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | None = None,
    batch: int = 32,
    ranges: Path | None = None,
    reduce_range: bool | None = None,
) -> None:
    """Quantize the (pre-processed) float model ``src`` into ``dst`` (written atomically),
    calibrating on ``images`` unless activation ``ranges`` from
    :func:`compute_activation_ranges` are given.
    ``reduce_range``: 7-bit weights; default: for ``ort_cpu`` on an x86 CPU without VNNI,
    whose u8×s8 kernels saturate otherwise (:mod:`edgevit.quantize.cpu_features`); never
    for ``tensorrt``, whose kernels accumulate in 32 bits."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calib = _ort_method(calibration_method)
    trt = layout == "tensorrt"
    if reduce_range is None:
        reduce_range = not trt and int8_weights_need_reduced_range()
    op_types = op_types or ["MatMul", "Gemm", "Conv"]
    extra: dict[str, Any] = {
        "ActivationSymmetric": trt,
        "WeightSymmetric": True,
        # TensorRT keeps biases in float: an int32 bias DequantizeLinear is not something it fuses
        "QuantizeBias": not trt,
        # Outputs of MatMul/Gemm stay float (see the module docstring; measured in the README).
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
        "DefaultTensorType": onnx.TensorProto.FLOAT,  # outputs of contrib ops (fused CPU form): no inferred type
    }
    with atomic_path(Path(dst)) as tmp:
        own_ranges = ranges is None
        if ranges is None:
            if images is None:
                raise ValueError("give calibration images or their activation ranges")
            ranges = compute_activation_ranges(src, images, Path(str(tmp) + ".ranges.json"), calibration_method,
                                               percentile, layout, op_types, batch)
        try:
            quantize_static(
                str(src), str(tmp), None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                nodes_to_quantize=nodes_to_quantize or None,
                nodes_to_exclude=nodes_to_exclude or [],
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calib,
                calibration_cache_path=str(ranges),
                extra_options=extra,
                use_external_data_format=False,
            )
        except (ValueError, RuntimeError) as e:
            raise EdgeVitError(f"quantize: ONNX Runtime could not quantize {src.name}: {str(e).splitlines()[0]}") from e
        finally:
            if own_ranges:
                Path(ranges).unlink(missing_ok=True)


def quantized_nodes(path: Path, op_types: list[str] | None = None) -> list[str]:
    """Names of the compute nodes (of ``op_types``) whose two main inputs both come through
    DequantizeLinear: in QDQ form those are the ones a back end runs in INT8."""
    model = onnx.load(str(path))
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    types = set(op_types or ["MatMul", "Gemm", "Conv"])
    return [n.name for n in model.graph.node
            if n.op_type in types and len(n.input) >= 2 and all(i in dq_out for i in n.input[:2])]


def activation_scales(path: Path) -> dict[str, float]:
    """Scale of every QuantizeLinear whose input is an activation (not an initializer)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits:
            out[n.input[0]] = float(np.asarray(inits[n.input[1]]).reshape(-1)[0])
    return out


def zero_points(path: Path) -> list[np.ndarray]:
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
