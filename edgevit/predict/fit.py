"""Fit a profile's roofline to published latencies of real models on that device
(:mod:`edgevit.predict.points`), and measure how well it holds on families it was not fitted on.

The roofline's numbers are fitted by least squares on the log of predicted/measured.

The fit is made well-posed: a weak pull of the five compute efficiencies toward their common
mean and of every number toward the middle of its range gives the numbers the points cannot
tell apart one defined value, instead of whatever a CPU's BLAS lands on. Validation leaves
one family out at a time; the spread of those held-out errors is the prediction interval.
Points marked ``heldout`` never enter any fit (their setup is uncertain); they are reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.predict.kernels import COMPUTE_KINDS, KINDS, KernelGraph
from edgevit.predict.points import Point
from edgevit.predict.roofline import RooflineFit
from edgevit.profiles import DeviceProfile

PARAMS = (*COMPUTE_KINDS, "bandwidth", "kernel_overhead_us")
BOUNDS = {"conv3x3": (0.01, 4.0), "conv": (0.01, 1.0), "gemm": (0.01, 1.0), "dwconv": (0.002, 1.0),
          "matmul": (0.01, 1.0), "bandwidth": (0.05, 1.0), "kernel_overhead_us": (1.0, 500.0)}
TIE_WEIGHT = 0.1  # pull of each compute efficiency (log) toward their common mean
CENTRE_WEIGHT = 0.01  # pull of every number (log) toward the middle of its bounds
INTERVAL_QUANTILES = (0.05, 0.95)


# --- fitting -----------------------------------------------------------------------------------
@dataclass
class _Work:
    """One point's kernels as arrays, so a fit evaluates every point in a few numpy calls."""

    kind: np.ndarray  # index into KINDS
    flops: np.ndarray  # the FLOPs the roofline times (Kernel.work_flops)
    bytes: np.ndarray
    n: int

    @classmethod
    def of(cls, kg: KernelGraph) -> _Work:
        return cls(np.array([KINDS.index(k.kind) for k in kg.kernels], dtype=int),
                   np.array([k.work_flops for k in kg.kernels], dtype=float),
                   np.array([k.bytes for k in kg.kernels], dtype=float), len(kg.kernels))

    def latency_ms(self, eff: np.ndarray, peak: float, bw: float, overhead_us: float) -> float:
        """``eff`` holds one efficiency per KINDS entry (memory's unused)."""
        t_flop = np.where(self.kind == KINDS.index("memory"), 0.0, self.flops / (eff[self.kind] * peak))
        return float(np.maximum(t_flop, self.bytes / bw).sum() * 1e3 + self.n * overhead_us * 1e-3)


def _fit_from(x: np.ndarray, precision: str, fitted_on: str, digits: int | None = None) -> RooflineFit:
    vals = {k: float(math.exp(v)) for k, v in zip(PARAMS, x, strict=True)}
    if digits is not None:
        vals = {k: float(f"{v:.{digits}g}") for k, v in vals.items()}
    return RooflineFit(precision=precision, fitted_on=fitted_on, **vals)


def _predict(work: _Work, fit_x: np.ndarray, peak_gflops: float, bandwidth_gbps: float) -> float:
    vals = np.exp(fit_x)
    eff = np.append(vals[: len(COMPUTE_KINDS)], 1.0)
    return work.latency_ms(eff, peak_gflops * 1e9, bandwidth_gbps * 1e9 * vals[-2], vals[-1])


def fit_roofline(profile: DeviceProfile, points: list[Point], kernels: list[KernelGraph], fitted_on: str = "",
                 starts: tuple[float, ...] = (0.3, 0.1, 0.6), tie_weight: float = TIE_WEIGHT,
                 centre_weight: float = CENTRE_WEIGHT) -> RooflineFit:
    """Least squares on log(predicted / measured) over the points not held out, with the
    weak pulls that make the solution unique (module docstring); ``starts`` are the initial
    efficiencies tried (the best minimum is kept)."""
    from scipy.optimize import least_squares

    train = [(p, _Work.of(k)) for p, k in zip(points, kernels, strict=True) if not p.heldout]
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
    centre = (lo + hi) / 2
    n_eff = len(COMPUTE_KINDS)

    def residuals(x: np.ndarray) -> np.ndarray:
        data = [math.log(_predict(w, x, peak, bw) / p.latency_ms) for p, w in train]
        tie = tie_weight * (x[:n_eff] - x[:n_eff].mean())
        return np.concatenate([data, tie, centre_weight * (x - centre)])

    best = None
    for start in starts:
        x0 = np.log([min(max(start if k != "kernel_overhead_us" else 20.0, BOUNDS[k][0]), BOUNDS[k][1])
                     for k in PARAMS])
        res = least_squares(residuals, x0, bounds=(lo, hi))
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None
    return _fit_from(best.x, precision, fitted_on, digits=4)


@dataclass
class PointResult:
    point: Point
    predicted_ms: float

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_ms - self.point.latency_ms) / self.point.latency_ms


def evaluate(profile: DeviceProfile, fit: RooflineFit, points: list[Point],
             kernels: list[KernelGraph]) -> list[PointResult]:
    """Each point predicted at its own precision (peak FLOPs and bytes per element)."""
    x = np.log([getattr(fit, k) for k in PARAMS])
    bw = profile.memory_bandwidth_gbps or 0.0
    return [PointResult(p, _predict(_Work.of(k), x, profile.peak_gflops[p.precision], bw))
            for p, k in zip(points, kernels, strict=True)]


def leave_one_family_out(profile: DeviceProfile, points: list[Point],
                         kernels: list[KernelGraph]) -> list[PointResult]:
    """Every fitted point predicted by a fit that saw none of its family."""
    out: list[PointResult] = []
    families = sorted({p.family for p in points if not p.heldout})
    for fam in families:
        rest = [p.model_copy(update={"heldout": p.heldout or p.family == fam}) for p in points]
        fit = fit_roofline(profile, rest, kernels)
        mine = [(p, k) for p, k in zip(points, kernels, strict=True) if p.family == fam and not p.heldout]
        out += evaluate(profile, fit, [p for p, _ in mine], [k for _, k in mine])
    return out


def interval_factors(results: list[PointResult]) -> tuple[float, float]:
    """Measured/predicted ratios at the interval's quantiles (held-out results)."""
    ratios = np.array([r.point.latency_ms / r.predicted_ms for r in results])
    low, high = np.quantile(ratios, INTERVAL_QUANTILES)
    return float(f"{min(low, 1.0):.3g}"), float(f"{max(high, 1.0):.3g}")


def per_family(results: list[PointResult]) -> dict[str, float]:
    """Mean absolute error (%) of each family's results."""
    fams: dict[str, list[float]] = {}
    for r in results:
        fams.setdefault(r.point.family, []).append(abs(r.error_pct))
    return {f: sum(v) / len(v) for f, v in sorted(fams.items())}
