"""Latency predictor vs published Jetson Nano measurements.

Rebuilds every architecture in profiles/measurements/<profile>.yaml with random weights,
exports it at the profile's opset, fits the roofline on the points not marked held out and
prints the error of every point. ``--write`` stores the fit in profiles/<profile>.yaml (and
in every profile that names it in ``roofline_from``... here: the Nano 2GB shares the SoC).

    python bench/predict.py [--profile jetson-nano] [--write]

Last line: predict: mean_abs_err_pct=<a> max_abs_err_pct=<b> heldout_mean_abs_err_pct=<c> points=<n>
(<a>, <b> over the fitted points; <c> over the held-out ones).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from edgevit.predict.calibrate import evaluate, fit_roofline, load_measurements, point_kernels
from edgevit.profiles import PROFILES_DIR, load_profile

SAME_SOC = {"jetson-nano": ["jetson-nano-2gb"]}  # profiles that share the fitted roofline


def roofline_yaml(fit) -> str:  # noqa: ANN001
    lines = ["roofline:"]
    for key, value in fit.model_dump().items():
        lines.append(f"  {key}: {value!r}" if isinstance(value, str) else f"  {key}: {value}")
    return "\n".join(lines) + "\n"


def write_roofline(profile: str, block: str) -> None:
    path = PROFILES_DIR / f"{profile}.yaml"
    text = path.read_text()
    text = re.sub(r"^roofline:\n(?:[ \t]+.*\n)*", "", text, flags=re.M).rstrip("\n") + "\n"
    path.write_text(text + block)
    load_profile(profile)  # still valid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="jetson-nano")
    ap.add_argument("--write", action="store_true", help="store the fit in the profile YAML")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    meas = load_measurements(args.profile)
    t0 = time.perf_counter()
    kernels = [point_kernels(p, profile.export_opset()) for p in meas.points]
    build_s = time.perf_counter() - t0
    fitted = [p for p in meas.points if not p.heldout]
    label = (f"profiles/measurements/{args.profile}.yaml: fitted on {len(fitted)} points "
             f"({', '.join(sorted({p.model.split('.')[0] for p in fitted}))}); "
             f"{len(meas.points) - len(fitted)} held out")
    fit = fit_roofline(profile, meas.points, kernels, fitted_on=label)
    print(f"fit ({build_s:.1f} s to build kernels): conv {fit.conv:.3f} dwconv {fit.dwconv:.3f} matmul "
          f"{fit.matmul:.3f} of peak, bandwidth {fit.bandwidth:.3f} of peak, {fit.kernel_overhead_us:.1f} us/kernel")
    print(f"{'model':28s} {'px':>4s} {'prec':>5s} {'measured ms':>12s} {'predicted ms':>13s} {'error %':>8s}")
    results = evaluate(profile, fit, meas.points, kernels)
    for r in results:
        tag = "  held out" if r.point.heldout else ""
        print(f"{r.point.model:28s} {r.point.img_size:4d} {r.point.precision:>5s} {r.point.latency_ms:12.2f} "
              f"{r.predicted_ms:13.2f} {r.error_pct:+8.1f}{tag}")
    fit_err = [abs(r.error_pct) for r in results if not r.point.heldout]
    held = [abs(r.error_pct) for r in results if r.point.heldout]
    if args.write:
        block = roofline_yaml(fit)
        for name in [args.profile, *SAME_SOC.get(args.profile, [])]:
            write_roofline(name, block)
            print(f"wrote the fit to {Path('profiles') / (name + '.yaml')}")
    held_mean = sum(held) / len(held) if held else float("nan")
    print(f"predict: mean_abs_err_pct={sum(fit_err) / len(fit_err):.1f} max_abs_err_pct={max(fit_err):.1f} "
          f"heldout_mean_abs_err_pct={held_mean:.1f} points={len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
