"""Latency and memory of a kernel graph on a device profile.

Latency is a roofline per kernel, ``max(FLOPs / (eff_kind * peak), bytes / (eff_bw * bw))``,
plus a fixed launch/scheduling overhead per kernel. The efficiencies and the overhead are
not guessed: they are fitted to published measurements (:mod:`edgevit.predict.fit`) and
stored in the profile with what they were fitted on, together with the interval that the
leave-one-family-out errors of that fit give.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from edgevit.predict.kernels import KernelGraph

MB = 1024 * 1024


class RooflineFit(BaseModel):
    """Achieved fractions of the profile's peaks per kernel class, the per-kernel overhead, and
    the interval the fit's held-out errors give."""

    model_config = ConfigDict(extra="forbid")
    precision: str = Field("fp16", description="the precision the measurements were taken at")
    conv3x3: float = Field(gt=0, le=4, description="3x3 stride-1 dense convolutions, on the direct FLOP count "
                           "(Winograd-style algorithms do fewer multiplies, so this can exceed 1)")
    conv: float = Field(gt=0, le=1, description="other dense/grouped convolutions (strided, 5x5, 7x7, stems)")
    gemm: float = Field(gt=0, le=1, description="1x1 convolutions and Linear layers (GEMM with a weight operand)")
    dwconv: float = Field(gt=0, le=1, description="depth-wise convolutions")
    matmul: float = Field(gt=0, le=1, description="MatMul of two activations (attention)")
    bandwidth: float = Field(gt=0, le=1, description="achieved fraction of peak memory bandwidth")
    kernel_overhead_us: float = Field(ge=0, description="launch and scheduling cost per kernel")
    interval_low: float = Field(1.0, gt=0, le=1, description="measured/predicted ratio below which 5 % of "
                                "the leave-one-family-out predictions fell")
    interval_high: float = Field(1.0, ge=1, description="measured/predicted ratio above which 5 % fell")
    interval_from: str = Field("", description="the held-out errors the interval comes from")
    fitted_on: str = Field("", description="the measurements file and points the fit used")

    def interval(self, predicted_ms: float) -> tuple[float, float]:
        """The range the measured latency is expected in (a 90 % interval from held-out families)."""
        return predicted_ms * self.interval_low, predicted_ms * self.interval_high


PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class LatencyBreakdown:
    total_ms: float
    compute_ms: float  # kernels limited by FLOPs
    memory_ms: float  # kernels limited by bytes
    overhead_ms: float
    kernels: int
    by_kind_ms: dict[str, float]


def latency_ms(kg: KernelGraph, peak_gflops: float, bandwidth_gbps: float, fit: RooflineFit) -> LatencyBreakdown:
    """Predicted batch-1 latency of ``kg``; peaks are the profile's for the engine precision."""
    peak = peak_gflops * 1e9
    bw = bandwidth_gbps * 1e9 * fit.bandwidth
    compute = memory = 0.0
    by_kind: dict[str, float] = {}
    for k in kg.kernels:
        t_mem = k.bytes / bw
        t_flop = k.work_flops / (getattr(fit, k.kind) * peak) if k.kind != "memory" else 0.0
        t = max(t_mem, t_flop)
        if t_flop > t_mem:
            compute += t
        else:
            memory += t
        by_kind[k.kind] = by_kind.get(k.kind, 0.0) + t * 1e3
    overhead = len(kg.kernels) * fit.kernel_overhead_us * 1e-6
    return LatencyBreakdown(total_ms=(compute + memory + overhead) * 1e3, compute_ms=compute * 1e3,
                            memory_ms=memory * 1e3, overhead_ms=overhead * 1e3, kernels=len(kg.kernels),
                            by_kind_ms={k: round(v, 4) for k, v in sorted(by_kind.items())})


@dataclass
class MemoryEstimate:
    total_mb: float
    weights_mb: float
    activations_mb: float
    workspace_mb: float
    runtime_mb: float


def memory_mb(kg: KernelGraph, workspace_mb: float, runtime_mb: float) -> MemoryEstimate:
    """Peak memory of one inference process: weights and live activations at the engine's
    precision, the builder workspace, and the runtime's own footprint (CUDA context, libraries)."""
    w = kg.weight_bytes / MB
    a = kg.peak_activation_bytes / MB
    return MemoryEstimate(total_mb=w + a + workspace_mb + runtime_mb, weights_mb=w, activations_mb=a,
                          workspace_mb=workspace_mb, runtime_mb=runtime_mb)
