"""Latency predictor vs published Jetson Nano measurements, validated family by family.

Rebuilds every architecture in edgevit/device_profiles/measurements/<profile>.yaml with random
weights, exports it as edgevit exports its own models for the profile (opset, static batch,
attention unfused), fits the roofline on every point not marked held out, then refits once
per family with that family left out and predicts it: the leave-one-family-out (LOFO) error
is the error on a family the fit never saw, and its 5-95 % spread is the prediction interval.
``--write`` stores the fit and interval in the profile (and in the profiles sharing the SoC).

    python bench/predict.py [--profile jetson-nano] [--write] [--no-cache]

Kernel graphs are cached in ~/.cache/edgevit/predict-kernels, keyed by the point, the export
settings, the predictor's source and the torch/timm versions.

Last line: predict: fit_mean_abs_err_pct=<a> lofo_mean_abs_err_pct=<b> families=<n> points=<m>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

from edgevit.predict.fit import evaluate, fit_roofline, interval_factors, leave_one_family_out, per_family
from edgevit.predict.kernels import COMPUTE_KINDS, Kernel, KernelGraph
from edgevit.predict.points import Point, load_measurements, point_kernels
from edgevit.profiles import PROFILES_DIR, DeviceProfile, load_profile

SAME_SOC = {"jetson-nano": ["jetson-nano-2gb"]}  # profiles that share the fitted roofline
CACHE = Path.home() / ".cache" / "edgevit" / "predict-kernels"
SOURCES = ("predict/kernels.py", "predict/points.py", "onnx_shapes.py", "onnx_io.py")


def cache_key(point: Point, profile: DeviceProfile) -> str:
    import timm
    import torch

    import edgevit

    root = Path(edgevit.__file__).parent
    h = hashlib.sha256(point.model_dump_json().encode())
    h.update(f"{profile.export_opset()} {profile.static_batch} {torch.__version__} {timm.__version__}".encode())
    for rel in SOURCES:
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:24]


def kernels_for(point: Point, profile: DeviceProfile, use_cache: bool) -> KernelGraph:
    path = CACHE / f"{cache_key(point, profile)}.json"
    if use_cache and path.is_file():
        d = json.loads(path.read_text())
        d.pop("flops", None)
        return KernelGraph(**{**d, "kernels": [Kernel(**k) for k in d["kernels"]]})
    kg = point_kernels(point, profile)
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(kg.to_dict()))
        tmp.replace(path)
    return kg


def roofline_yaml(fit) -> str:  # noqa: ANN001
    lines = ["roofline:"]
    for key, value in fit.model_dump().items():
        lines.append(f"  {key}: {value!r}" if isinstance(value, str) else f"  {key}: {value}")
    return "\n".join(lines) + "\n"


def write_roofline(profile: str, block: str) -> None:
    path = Path(str(PROFILES_DIR)) / f"{profile}.yaml"
    text = path.read_text()
    text = re.sub(r"^roofline:\n(?:[ \t]+.*\n)*", "", text, flags=re.M).rstrip("\n") + "\n"
    path.write_text(text + block)
    load_profile(profile)  # still valid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="jetson-nano")
    ap.add_argument("--write", action="store_true", help="store the fit and its interval in the profile YAML")
    ap.add_argument("--no-cache", action="store_true", help="rebuild every kernel graph")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    meas = load_measurements(args.profile)
    points = meas.points
    t0 = time.perf_counter()
    kernels = [kernels_for(p, profile, not args.no_cache) for p in points]
    build_s = time.perf_counter() - t0
    fitted = [p for p in points if not p.heldout]
    families = sorted({p.family for p in fitted})
    t0 = time.perf_counter()
    lofo = leave_one_family_out(profile, points, kernels)
    low, high = interval_factors(lofo)
    label = (f"edgevit/device_profiles/measurements/{args.profile}.yaml: {len(fitted)} points, "
             f"{len(families)} families ({', '.join(families)}); {len(points) - len(fitted)} held out")
    fit = fit_roofline(profile, points, kernels, fitted_on=label)
    fit = fit.model_copy(update={"interval_low": low, "interval_high": high, "interval_from": (
        f"5-95 % of measured/predicted over {len(lofo)} leave-one-family-out predictions ({len(families)} families)")})
    fit_s = time.perf_counter() - t0
    print(f"kernels built in {build_s:.1f} s, {len(families) + 1} fits in {fit_s:.1f} s")
    print("fit (fraction of peak; conv3x3 on the direct FLOP count): "
          + ", ".join(f"{k} {getattr(fit, k):.3g}" for k in (*COMPUTE_KINDS, "bandwidth"))
          + f", {fit.kernel_overhead_us:.1f} us/kernel")
    print(f"interval: measured/predicted in [{low:.3f}, {high:.3f}] (5-95 % of the LOFO predictions)")
    results = evaluate(profile, fit, points, kernels)
    by_point = {(r.point.model, r.point.img_size, r.point.source): r for r in lofo}
    print(f"{'model':28s} {'family':15s} {'px':>4s} {'prec':>5s} {'measured':>9s} {'fit':>8s} {'err %':>7s} "
          f"{'LOFO':>8s} {'err %':>7s}")
    for r in results:
        p = r.point
        lo = by_point.get((p.model, p.img_size, p.source))
        lofo_txt = f"{lo.predicted_ms:8.2f} {lo.error_pct:+7.1f}" if lo else f"{'held out of every fit':>16s}"
        print(f"{p.model:28s} {p.family:15s} {p.img_size:4d} {p.precision:>5s} {p.latency_ms:9.2f} "
              f"{r.predicted_ms:8.2f} {r.error_pct:+7.1f} {lofo_txt}")
    fit_err = per_family([r for r in results if not r.point.heldout])
    lofo_err = per_family(lofo)
    print(f"\n{'family (held out)':18s} {'points':>6s} {'fit mean |err| %':>17s} {'LOFO mean |err| %':>18s}")
    for fam in families:
        n = sum(p.family == fam for p in fitted)
        print(f"{fam:18s} {n:6d} {fit_err[fam]:17.1f} {lofo_err[fam]:18.1f}")
    if args.write:
        block = roofline_yaml(fit)
        for name in [args.profile, *SAME_SOC.get(args.profile, [])]:
            write_roofline(name, block)
            print(f"wrote the fit to edgevit/device_profiles/{name}.yaml")
    fit_abs = [abs(r.error_pct) for r in results if not r.point.heldout]
    lofo_abs = [abs(r.error_pct) for r in lofo]
    print(f"predict: fit_mean_abs_err_pct={sum(fit_abs) / len(fit_abs):.1f} "
          f"lofo_mean_abs_err_pct={sum(lofo_abs) / len(lofo_abs):.1f} families={len(families)} points={len(fitted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
