"""Fit a profile's roofline to published latencies of real models on that device.

Each point names a timm architecture, an input size and a measured batch-1 latency with its
source (``profiles/measurements/<profile>.yaml``). The architectures are rebuilt with random
weights (latency does not depend on their values), exported to ONNX at the profile's opset,
turned into kernels, and the roofline's five numbers are fitted by least squares on the log
of predicted/measured. Points marked ``heldout`` stay out of the fit so its error on unseen
models can be reported honestly.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from edgevit.errors import EdgeVitError
from edgevit.predict.kernels import KernelGraph, kernel_graph
from edgevit.predict.roofline import PRECISION_BYTES, RooflineFit, latency_ms
from edgevit.profiles import PROFILES_DIR, DeviceProfile

MEASUREMENTS_DIR = PROFILES_DIR / "measurements"
PARAMS = ("conv", "dwconv", "matmul", "bandwidth", "kernel_overhead_us")
BOUNDS = {"conv": (0.01, 1.0), "dwconv": (0.002, 1.0), "matmul": (0.01, 1.0), "bandwidth": (0.05, 1.0),
          "kernel_overhead_us": (1.0, 500.0)}


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="timm architecture name")
    img_size: int = Field(ge=16)
    latency_ms: float = Field(gt=0)
    precision: str = "fp16"
    runtime: str = "tensorrt"
    batch: int = Field(1, ge=1)
    heldout: bool = Field(False, description="kept out of the fit; its error is reported separately")
    source: str


class Measurements(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: str
    points: list[Point]

    @property
    def label(self) -> str:
        return f"{self.profile}: {len(self.points)} points"


def load_measurements(profile: str, path: Path | None = None) -> Measurements:
    path = path or MEASUREMENTS_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise EdgeVitError(f"predict: no published measurements for {profile} (looked for {path})")
    return Measurements.model_validate(yaml.safe_load(path.read_text()))


def point_kernels(point: Point, opset: int) -> KernelGraph:
    """Kernels of the point's architecture with random weights, at the engine's precision."""
    import onnx
    import timm
    import torch

    try:
        model = timm.create_model(point.model, pretrained=False).eval()
    except RuntimeError as e:
        raise EdgeVitError(f"predict: timm has no architecture {point.model!r}: {e}") from e
    x = torch.zeros(point.batch, 3, point.img_size, point.img_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, opset_version=opset, dynamo=False, do_constant_folding=True)
    return kernel_graph(None, PRECISION_BYTES[point.precision], model=onnx.load_from_string(buf.getvalue()))


@dataclass
class PointResult:
    point: Point
    predicted_ms: float

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_ms - self.point.latency_ms) / self.point.latency_ms


def _fit_from(x: np.ndarray, precision: str, fitted_on: str, digits: int | None = None) -> RooflineFit:
    vals = {k: float(math.exp(v)) for k, v in zip(PARAMS, x, strict=True)}
    if digits is not None:
        vals = {k: float(f"{v:.{digits}g}") for k, v in vals.items()}
    return RooflineFit(precision=precision, fitted_on=fitted_on, **vals)


def fit_roofline(profile: DeviceProfile, points: list[Point], kernels: list[KernelGraph],
                 fitted_on: str = "") -> RooflineFit:
    """Least squares on log(predicted / measured) over the non-held-out points."""
    from scipy.optimize import least_squares

    train = [(p, k) for p, k in zip(points, kernels, strict=True) if not p.heldout]
    if len({p.precision for p, _ in train}) > 1:
        raise EdgeVitError("predict: the fitting points mix precisions; fit on one (hold the others out)")
    if len(train) < len(PARAMS):
        raise EdgeVitError(f"predict: {len(train)} fitting points cannot fix {len(PARAMS)} roofline numbers")
    precision = train[0][0].precision
    peak, bw = profile.peak_gflops.get(precision), profile.memory_bandwidth_gbps
    if peak is None or bw is None:
        raise EdgeVitError(f"predict: profile {profile.name} has no {precision} peak or bandwidth to fit against")
    lo = np.log([BOUNDS[k][0] for k in PARAMS])
    hi = np.log([BOUNDS[k][1] for k in PARAMS])

    def residuals(x: np.ndarray) -> np.ndarray:
        fit = _fit_from(x, precision, fitted_on)
        return np.array([math.log(latency_ms(k, peak, bw, fit).total_ms / p.latency_ms) for p, k in train])

    best = None
    for start in ((0.3, 0.05, 0.3, 0.5, 20.0), (0.6, 0.2, 0.6, 0.8, 5.0), (0.1, 0.02, 0.1, 0.3, 60.0)):
        res = least_squares(residuals, np.log(start), bounds=(lo, hi))
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None
    return _fit_from(best.x, precision, fitted_on, digits=4)


def evaluate(profile: DeviceProfile, fit: RooflineFit, points: list[Point],
             kernels: list[KernelGraph]) -> list[PointResult]:
    """Each point predicted at its own precision (peak FLOPs and bytes per element)."""
    bw = profile.memory_bandwidth_gbps or 0.0
    return [PointResult(p, latency_ms(k, profile.peak_gflops[p.precision], bw, fit).total_ms)
            for p, k in zip(points, kernels, strict=True)]
