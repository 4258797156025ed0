"""The full pipeline on real data for the Jetson Nano: recipes/cifar10-nano.yaml on CIFAR-10
with the reference teacher (../shared/data), end to end, then its summary.

    python bench/e2e.py [--out runs/cifar10-nano] [--set passes.distill.epochs=2 ...]

Resumes a crashed run from its last finished stage (same --out). Prints the report table and
last: e2e: teacher_top1=<a> final_top1=<b> flops_ratio=<teacher/final>
host_latency_ratio=<teacher/final> nano_pred_latency_ratio=<teacher/final> nano_feasible=<bool>
minutes=<m>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SKIP, cifar_dirs, cifar_teacher  # noqa: E402

RECIPE = REPO / "recipes" / "cifar10-nano.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "cifar10-nano")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per idle core)")
    args = ap.parse_args()
    dirs, teacher = cifar_dirs(), cifar_teacher()
    if dirs is None or teacher is None:
        print(f"e2e: skipped: {SKIP}")
        return 0
    from edgevit.cli.console import stderr_console
    from edgevit.cli.report import print_report
    from edgevit.pipeline import Pipeline
    from edgevit.recipe import apply_overrides, parse_recipe
    from edgevit.registry import Registry

    data = yaml.safe_load(RECIPE.read_text())
    data["model"]["checkpoint"] = teacher["checkpoint"]  # the same cache layout, also under $EDGEVIT_CACHE
    data["data"]["train"], data["data"]["val"] = str(dirs[0]), str(dirs[1])
    apply_overrides(data, args.overrides)
    reg = Registry()
    rec, steps = parse_recipe(data, RECIPE.parent, reg)
    from edgevit.threads import apply_threads, choose_threads

    console = stderr_console()
    console.print(f"threads: {apply_threads(choose_threads(args.threads or rec.threads))}")  # why, too
    t0 = time.perf_counter()
    report = Pipeline(rec, steps, args.out, reg, console).run()
    minutes = (time.perf_counter() - t0) / 60
    print_report(report, args.out)
    rows = [s for s in report["stages"] if s.get("top1") is not None]
    first, last = rows[0], rows[-1]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "nan"

    lat = (first.get("host_latency") or {}).get("median_ms"), (last.get("host_latency") or {}).get("median_ms")
    pred = (first.get("predicted") or {}).get("latency_ms"), (last.get("predicted") or {}).get("latency_ms")
    feasible = (last.get("predicted") or {}).get("verdict") == "deployable"
    print(f"final stage: {last['stage']}; teacher: {first['stage']}; flops {first['flops']} → {last['flops']}")
    print(f"e2e: teacher_top1={first['top1']:.2f} final_top1={last['top1']:.2f} "
          f"flops_ratio={ratio(first['flops'], last['flops'])} host_latency_ratio={ratio(*lat)} "
          f"nano_pred_latency_ratio={ratio(*pred)} nano_feasible={str(feasible).lower()} minutes={minutes:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
