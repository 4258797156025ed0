"""Segmentation end to end: recipes/camvid-nano.yaml on CamVid with the reference segmenter
(../shared/data), scored on the 233 test frames at the masks' 480x360, plus one-shot mIoU of
the teacher with 50 % of its MLP units pruned by osscar, taylor and magnitude.

    python bench/seg_e2e.py [--out runs/camvid-nano] [--quick] [--oneshot-only] [--set k=v ...]

``--quick``: 1 distill + 1 recovery epoch on 48 training / 24 validation frames, a short
benchmark: a smoke run of the whole chain, not a result. ``--stop-after prune``: the training
chain only. A pass that stops the run (one line) leaves the figures of the last finished stage.
``--oneshot-only``: the one-shot part alone (no pipeline run; the pipeline's figures print
as nan). The last line is:
seg: teacher_miou=<a> final_miou=<b> flops_ratio=<teacher/final> host_latency_ratio=<teacher/final>
nano_pred_ms=<final> nano_feasible=<bool> osscar_mlp50_miou=<f> taylor_mlp50_miou=<g>
magnitude_mlp50_miou=<h> minutes=<m>   (mIoU in percent, on the test split)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED  # noqa: E402

RECIPE = REPO / "recipes" / "camvid-nano.yaml"
QUICK = ["passes.distill.epochs=1", "passes.prune.recover.epochs=1", "data.limit_train=48", "data.limit_val=24",
         "calibration.num_samples=16", "passes.benchmark.runs=5"]
METHODS = ("osscar", "taylor", "magnitude")


def _unpacked() -> str | None:
    """Unpack CamVid and its teacher into the cache once; the reason it cannot, or None."""
    from edgevit.data.shared import unpack
    from edgevit.errors import EdgeVitError

    try:
        unpack("camvid", SHARED, log=lambda m: print(m, file=sys.stderr))
    except EdgeVitError as e:
        return str(e)
    return None


def _test_miou(graph: Any, data: Any) -> float:
    """mIoU (percent) of a graph on the data's test split, logits upsampled to each mask's size."""
    from edgevit.training.task import task_metric

    graph.module.eval()
    return task_metric(graph.module, data.test_loader(), "segmentation", data.num_classes, data.ignore_index,
                       "cpu", data.class_names)["miou"]


def _oneshot(rec: Any, teacher: Any, data: Any, registry: Any) -> dict[str, float]:
    """The teacher pruned to 50 % of its MLP units in one shot by each method, scored on test."""
    from rich.console import Console

    from edgevit.context import RunContext
    from edgevit.passes.prune import PruneConfig, PrunePass

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(recipe=rec, run_dir=Path(tmp), data=data, device=__import__("torch").device("cpu"),
                         console=Console(file=io.StringIO()), registry=registry, seed=rec.seed, stage_dir=Path(tmp))
        for method in METHODS:
            t0 = time.perf_counter()
            p = PrunePass(PruneConfig(method=method, mlp=0.5))
            pruned = p.run(teacher.clone(), ctx)
            out[method] = _test_miou(pruned, data)
            print(f"one-shot {method}: MLP units {p.metrics['mlp_units']}, {p.metrics['flops_kept']:.3f} of the "
                  f"FLOPs kept, test mIoU {out[method]:.2f} % ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def _stage_figures(report: dict[str, Any], why: list[str]) -> tuple[float, float, float, bool]:
    """(flops ratio, host latency ratio, predicted Nano ms, feasible) of teacher vs final stage from
    the run's report (the benchmark pass writes latency and prediction); nan where absent."""
    stages = report.get("stages") or []
    nan = math.nan
    if not stages:
        why.append("the run's report has no stages")
        return nan, nan, nan, False
    first = stages[0]
    # the last *measured* stage: a bundle holds the previous stage's file and is not timed again
    last = next((s for s in reversed(stages) if s.get("host_latency")), stages[-1])
    flops = first["flops"] / last["flops"] if first.get("flops") and last.get("flops") else nan
    lat = [(s.get("host_latency") or {}).get("median_ms") for s in (first, last)]
    host = lat[0] / lat[1] if all(lat) else nan
    if not all(lat):
        why.append("host latency: the report has no benchmark latency for the source and the final stage")
    pred = (last.get("predicted") or {}).get("latency_ms")
    if pred is None:
        why.append("nano_pred_ms: the report has no Nano prediction for the final stage (benchmark pass with "
                   "profile jetson-nano)")
    feasible = (last.get("predicted") or {}).get("verdict") == "deployable"
    return flops, host, pred if pred is not None else nan, feasible


def _finished(out: Path) -> dict[str, Any]:
    """The run's finished stages as report-like entries (flops from each stage's metrics.json),
    for a run that stopped before its report was written."""
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    stages = []
    for st in manifest.get("stages", []):
        m = out / st["dir"] / "metrics.json"
        flops = json.loads(m.read_text())["model"]["flops"] if m.is_file() else None
        stages.append({"stage": st["dir"], "flops": flops})
    return {"stages": stages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "camvid-nano")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per idle core)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few epochs on a subset")
    ap.add_argument("--oneshot-only", action="store_true", help="only the one-shot pruning comparison")
    ap.add_argument("--stop-after", default=None, help="run the recipe's passes up to this one (e.g. prune)")
    args = ap.parse_args()
    why = _unpacked()
    if why is not None:
        print(f"seg: skipped: {why}")
        return 0
    from edgevit.cli.console import stderr_console
    from edgevit.data import build_data
    from edgevit.errors import EdgeVitError
    from edgevit.graph import ModelGraph
    from edgevit.models.sources import load_model
    from edgevit.pipeline import Pipeline
    from edgevit.recipe import apply_overrides, parse_recipe
    from edgevit.registry import Registry
    from edgevit.threads import apply_threads, choose_threads

    data_cfg = yaml.safe_load(RECIPE.read_text())
    apply_overrides(data_cfg, (QUICK if args.quick else []) + args.overrides)
    reg = Registry()
    if args.stop_after:  # e.g. prune: the training chain without export/quantize/bundle/benchmark
        names = [next(iter(p)) for p in data_cfg["passes"]]
        if args.stop_after not in names:
            print(f"error: --stop-after: the recipe has no pass {args.stop_after!r} (it has {', '.join(names)})",
                  file=sys.stderr)
            return 2
        data_cfg["passes"] = data_cfg["passes"][: names.index(args.stop_after) + 1]
    rec, steps = parse_recipe(data_cfg, RECIPE.parent, reg)
    console = stderr_console()
    console.print(f"threads: {apply_threads(choose_threads(args.threads or rec.threads))}")
    t0 = time.perf_counter()
    teacher = load_model(rec.model, reg)
    full = rec.data.model_copy(update={"limit_train": None, "limit_val": None})  # test is always all 233 frames
    data = build_data(full, teacher.spec, rec.seed)
    teacher_miou = _test_miou(teacher, data)
    console.print(f"teacher: test mIoU {teacher_miou:.2f} % on {len(data.test)} frames (card: 34.41 %)")
    notes: list[str] = []
    final_miou = flops = host = pred = math.nan
    feasible = False
    if args.oneshot_only:
        notes.append("the pipeline did not run (--oneshot-only): final_miou, ratios and prediction are nan")
    else:
        try:
            report = Pipeline(rec, steps, args.out, reg, console).run()
        except EdgeVitError as e:  # e.g. a pass of another change not ready for segmenters yet
            notes.append(f"the pipeline stopped ({str(e).splitlines()[0]}); figures of its last finished stage")
            report = _finished(args.out)
        if report["stages"]:
            final = ModelGraph.load(args.out / report["stages"][-1]["stage"], reg)
            final_miou = _test_miou(final, data)
            console.print(f"final: {report['stages'][-1]['stage']}, test mIoU {final_miou:.2f} %")
        flops, host, pred, feasible = _stage_figures(report, notes)
    oneshot = _oneshot(rec, teacher, data, reg)
    minutes = (time.perf_counter() - t0) / 60
    for line in notes:
        print(f"nan: {line}")
    print(f"seg: teacher_miou={teacher_miou:.2f} final_miou={final_miou:.2f} flops_ratio={flops:.2f} "
          f"host_latency_ratio={host:.2f} nano_pred_ms={pred:.2f} nano_feasible={str(feasible).lower()} "
          f"osscar_mlp50_miou={oneshot['osscar']:.2f} taylor_mlp50_miou={oneshot['taylor']:.2f} "
          f"magnitude_mlp50_miou={oneshot['magnitude']:.2f} minutes={minutes:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
