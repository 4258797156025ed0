"""Predict how an exported model runs on a device profile: latency, memory and a verdict.

The verdict lists every reason the model would not deploy as is: the engine does not fit
in what a process can use, the precision has no kernels there, the opset is newer than the
device's parser reads, an operator is missing from that TensorRT version, or the predicted
latency is over a limit the caller gives. Every latency comes with the interval the fit's
leave-one-family-out errors give, and the verdict says when that interval crosses a limit.
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


def predict_onnx(path: Path, profile: DeviceProfile, precision: str | None = None, kg: KernelGraph | None = None,
                 latency_limit_ms: float | None = None) -> dict[str, Any]:
    """Prediction for one ONNX file at batch 1. ``precision`` defaults to the file's own
    (INT8 QDQ, FP16) or, for a float32 file, the precision the device builds engines at.
    ``kg`` is the file's kernel graph if the caller built it already (any element size)."""
    kg = kg if kg is not None else kernel_graph(path, 4)
    own = onnx_precision(kg, path)
    precision = precision or own or profile.deploy_precision()
    kg = kg.at(PRECISION_BYTES[precision])
    reasons: list[str] = []
    notes: list[str] = []
    if not profile.supports(precision):
        reasons.append(_precision_reason(profile, precision))
    reasons += operator_problems(kg, profile)
    out: dict[str, Any] = {"profile": profile.name, "precision": precision, "kernels": len(kg.kernels),
                           "gflops": round(kg.flops / 1e9, 4)}
    out.update(_latency(kg, profile, precision))
    if out["latency_ms"] is not None and latency_limit_ms is not None:
        lo, hi = out["latency_interval_ms"]
        if out["latency_ms"] > latency_limit_ms:
            reasons.append(f"predicted {out['latency_ms']:.1f} ms (interval {lo:.1f}-{hi:.1f} ms) is over the "
                           f"{latency_limit_ms:g} ms limit")
        elif hi > latency_limit_ms:
            notes.append(f"the latency interval {lo:.1f}-{hi:.1f} ms crosses the {latency_limit_ms:g} ms limit: "
                         "measure on the board before relying on it")
    if profile.runtime_memory_mb is not None:
        mem = memory_mb(kg, profile.workspace_mb, profile.runtime_memory_mb)
        out["memory_mb"] = round(mem.total_mb, 1)
        out["memory_breakdown_mb"] = {"weights": round(mem.weights_mb, 2), "activations": round(mem.activations_mb, 2),
                                      "workspace": mem.workspace_mb, "runtime": mem.runtime_mb}
        usable = profile.usable_memory_mb
        if usable is not None and mem.total_mb > usable:
            reasons.append(f"needs {mem.total_mb:.0f} MB, more than the {usable} MB a process can use on "
                           f"{profile.name}")
    else:
        out["memory_mb"] = None
    out["verdict"] = "deployable" if not reasons else "not deployable"
    out["reasons"] = reasons
    out["notes"] = notes
    return out


def _latency(kg: KernelGraph, profile: DeviceProfile, precision: str) -> dict[str, Any]:
    fit = profile.roofline
    peak = profile.peak_gflops.get(precision) or profile.peak_gflops.get("fp16")
    if fit is None or not peak or not profile.memory_bandwidth_gbps:
        return {"latency_ms": None, "latency_interval_ms": None,
                "fit": f"{profile.name} has no fitted roofline; latency not predicted"}
    lat = latency_ms(kg, peak, profile.memory_bandwidth_gbps, fit)
    lo, hi = fit.interval(lat.total_ms)
    out: dict[str, Any] = {
        "latency_ms": round(lat.total_ms, 3), "latency_interval_ms": [round(lo, 3), round(hi, 3)],
        "latency_breakdown_ms": {"compute": round(lat.compute_ms, 3), "memory": round(lat.memory_ms, 3),
                                 "overhead": round(lat.overhead_ms, 3), **lat.by_kind_ms},
        "fit": fit.fitted_on, "interval_from": fit.interval_from,
    }
    if fit.precision != precision:
        out["fit"] += (f" (fitted at {fit.precision}; this {precision} prediction uses those efficiencies at the "
                       f"{precision} peak and is not validated)")
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
        raise EdgeVitError(f"predict: {out['fit']}")
    return float(out["latency_ms"])


def _precision_reason(profile: DeviceProfile, precision: str) -> str:
    hint = next((c for c in profile.caveats if precision.upper() in c or precision in c), None)
    return (f"{profile.name} has no {precision} kernels" + (f" ({hint})" if hint else "")
            + f"; use {profile.deploy_precision()}")
