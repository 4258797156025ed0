"""Predict how an exported model runs on a device profile: latency, memory and a verdict.

The verdict lists every reason the model would not deploy as is: the engine does not fit
in what a process can use, the precision has no kernels there, the opset is newer than the
device's parser reads, or an operator is missing from that TensorRT version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgevit.errors import EdgeVitError
from edgevit.predict.kernels import KernelGraph, kernel_graph
from edgevit.predict.roofline import PRECISION_BYTES, latency_ms, memory_mb
from edgevit.profiles import DeviceProfile


def onnx_precision(kg: KernelGraph, path: Path) -> str | None:
    """The precision an ONNX file was quantized/converted to, if any (else None: float32 weights)."""
    if "QuantizeLinear" in kg.op_types or "DynamicQuantizeLinear" in kg.op_types or "MatMulInteger" in kg.op_types:
        return "int8"
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return None


def operator_problems(kg: KernelGraph, profile: DeviceProfile) -> list[str]:
    reasons = []
    if kg.opset is not None and kg.opset > profile.max_opset:
        reasons.append(f"opset {kg.opset} > {profile.max_opset}, the newest {profile.name}'s parser reads; "
                       f"export at opset {profile.export_opset()}")
    if not profile.layernorm_op and "LayerNormalization" in kg.op_types:
        reasons.append(f"LayerNormalization has no kernel in TensorRT {profile.tensorrt}; export at opset "
                       f"{profile.export_opset()} so it is decomposed")
    if profile.runtime == "tensorrt" and profile.tensorrt:
        from edgevit.deploy.tensorrt_ops import ops_for, unsupported

        try:
            key, _ = ops_for(profile.tensorrt)
        except ValueError:
            key = None
        missing = [op for op in unsupported(kg.op_types, profile.tensorrt)
                   if op != "LayerNormalization" or profile.layernorm_op] if key else []
        if missing:
            reasons.append(f"TensorRT {key}'s ONNX parser has no importer for {', '.join(missing)}")
    return reasons


def predict_onnx(path: Path, profile: DeviceProfile, precision: str | None = None) -> dict[str, Any]:
    """Prediction for one ONNX file at batch 1. ``precision`` defaults to the file's own
    (INT8 QDQ, FP16) or, for a float32 file, the precision the device builds engines at."""
    probe = kernel_graph(path, 4)
    own = onnx_precision(probe, path)
    precision = precision or own or profile.deploy_precision()
    kg = probe if precision == "fp32" else kernel_graph(path, PRECISION_BYTES[precision])
    reasons: list[str] = []
    if not profile.supports(precision):
        reasons.append(_precision_reason(profile, precision))
    reasons += operator_problems(kg, profile)
    out: dict[str, Any] = {"profile": profile.name, "precision": precision, "kernels": len(kg.kernels),
                           "gflops": round(kg.flops / 1e9, 4)}
    fit = profile.roofline
    peak = profile.peak_gflops.get(precision) or profile.peak_gflops.get("fp16")
    if fit is not None and peak and profile.memory_bandwidth_gbps:
        lat = latency_ms(kg, peak, profile.memory_bandwidth_gbps, fit)
        out["latency_ms"] = round(lat.total_ms, 3)
        out["latency_breakdown_ms"] = {"compute": round(lat.compute_ms, 3), "memory": round(lat.memory_ms, 3),
                                       "overhead": round(lat.overhead_ms, 3), **lat.by_kind_ms}
        out["calibration"] = fit.fitted_on
        if fit.precision != precision:
            out["calibration"] += f" (fitted at {fit.precision}; this prediction is at {precision})"
    else:
        out["latency_ms"] = None
        out["calibration"] = f"{profile.name} has no fitted roofline; latency not predicted"
    if profile.runtime_memory_mb is not None:
        mem = memory_mb(kg, profile.workspace_mb, profile.runtime_memory_mb)
        out["memory_mb"] = round(mem.total_mb, 1)
        out["memory_breakdown_mb"] = {"weights": round(mem.weights_mb, 2), "activations": round(mem.activations_mb, 2),
                                      "workspace": mem.workspace_mb, "runtime": mem.runtime_mb}
        if profile.usable_memory_mb is not None and mem.total_mb > profile.usable_memory_mb:
            reasons.append(f"needs {mem.total_mb:.0f} MB, more than the {profile.usable_memory_mb} MB a process "
                           f"can use on {profile.name}")
    else:
        out["memory_mb"] = None
    out["verdict"] = "deployable" if not reasons else "not deployable"
    out["reasons"] = reasons
    return out


def predict_graph_latency(graph: Any, profile: DeviceProfile) -> float:
    """Predicted batch-1 latency (ms) of a ModelGraph on ``profile``: exported the way the
    export pass would for that profile, then predicted like any stage."""
    import tempfile

    from edgevit.onnx_io import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgevit-predict-") as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(graph, path, opset=profile.export_opset(), dynamic_batch=not profile.static_batch)
        out = predict_onnx(path, profile)
    if out["latency_ms"] is None:
        raise EdgeVitError(f"predict: {out['calibration']}")
    return float(out["latency_ms"])


def _precision_reason(profile: DeviceProfile, precision: str) -> str:
    hint = next((c for c in profile.caveats if precision.upper() in c or precision in c), None)
    return (f"{profile.name} has no {precision} kernels" + (f" ({hint})" if hint else "")
            + f"; use {profile.deploy_precision()}")
