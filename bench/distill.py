"""Distillation benchmark: does each loss term earn its place?

A student with at most a quarter of the teacher's FLOPs (the teacher shrunk: fewer blocks,
heads and MLP units) is trained with the same budget under each loss set:

  scratch      CE only, random init
  +kd          CE + logit KD
  +feature     CE + logit KD + feature mimicking (shallow blocks)
  +mgd (full)  CE + logit KD + feature mimicking + masked generative distillation (deep block)
  full, teacher-init   the full loss, student initialised from the teacher's weights

on scikit-learn's digits (teacher trained here by `adapt`) and on CIFAR-10 from
../shared/data with the reference teacher there (skipped, saying why, when absent). Every
run goes through the real pipeline (`Pipeline` + the distill pass). Top-1 in percent on
the validation / test split. Not part of the test suite.

    python bench/distill.py                      # both data sets, CPU defaults
    python bench/distill.py --dataset cifar10 --epochs 30 --train-limit 50000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SKIP, cifar_data, cifar_dirs, cifar_teacher, quiet_console  # noqa: E402

VARIANTS = {  # name: (init, loss weights)
    "scratch": ("random", dict(ce=1.0, kd=0.0, feature=0.0, mgd=0.0)),
    "+kd": ("random", dict(ce=1.0, kd=1.0, feature=0.0, mgd=0.0)),
    "+feature": ("random", dict(ce=1.0, kd=1.0, feature=1.0, mgd=0.0)),
    "+mgd (full)": ("random", dict(ce=1.0, kd=1.0, feature=1.0)),  # mgd weight: the pass default
    "full, teacher-init": ("teacher", dict(ce=1.0, kd=1.0, feature=1.0)),
}


def run(recipe: dict, out: Path) -> dict:
    from edgevit.pipeline import Pipeline
    from edgevit.recipe import parse_recipe
    from edgevit.registry import Registry

    reg = Registry()
    rec, steps = parse_recipe(recipe, REPO, reg)
    Pipeline(rec, steps, out, reg, quiet_console()).run()
    last = sorted(p for p in out.iterdir() if p.is_dir() and p.name[:2].isdigit())[-1]
    return json.loads((last / "metrics.json").read_text())


def teacher_top1(model: dict, data: dict, device: str) -> float:
    from edgevit.context import resolve_device
    from edgevit.data import build_data
    from edgevit.data.config import DataConfig  # noqa: F401 - validates via Recipe below
    from edgevit.models.sources import load_model
    from edgevit.recipe import Recipe
    from edgevit.training import evaluate_top1

    rec = Recipe.model_validate({"name": "t", "model": model, "data": data})
    graph = load_model(rec.model)
    bundle = build_data(rec.data, graph.spec, 0)
    dev = resolve_device(device)
    return evaluate_top1(graph.module.to(dev), bundle.val_loader(), dev)


def bench(name: str, model: dict, data: dict, shrink: dict, train: dict, out: Path, device: str,
          teacher: float | None) -> dict:
    rows = {}
    for variant, (init, losses) in VARIANTS.items():
        t0 = time.perf_counter()
        cfg = {**train, **losses, "student": {"shrink": {**shrink, "init": init}}}
        recipe = {"name": f"{name}-distill", "seed": 0, "device": device, "model": model, "data": data,
                  "passes": [{"distill": cfg}]}
        m = run(recipe, out / name / variant.replace(" ", "").replace(",", "_").replace("+", "plus-"))
        rows[variant] = m
        print(f"  {name} {variant:<20} top1 {m['metrics']['val_top1']:6.2f}%  "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    first = rows["scratch"]["metrics"]
    print(f"\n{name}: teacher top-1 {teacher:.2f}%, {first['teacher_params'] / 1e6:.2f} M params, "
          f"{first['teacher_flops'] / 1e6:.1f} MFLOPs; student {first['student_params'] / 1e6:.3f} M params, "
          f"{first['student_flops'] / 1e6:.1f} MFLOPs (ratio {first['flops_ratio']:.3f}); {train['epochs']} epochs")
    print(f"{'variant':<22}{'top-1 %':>9}{'Δ vs scratch':>14}{'train s':>9}  final-epoch loss terms")
    base = first["val_top1"]
    for variant, m in rows.items():
        mm = m["metrics"]
        terms = ", ".join(f"{k}={v}" for k, v in mm["log"][-1].items() if k in ("ce", "kd", "feat", "mgd"))
        print(f"{variant:<22}{mm['val_top1']:>9.2f}{mm['val_top1'] - base:>+14.2f}{mm['train_seconds']:>9.0f}  {terms}")
    return {"teacher": teacher, "ratio": first["flops_ratio"],
            **{v: m["metrics"]["val_top1"] for v, m in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["digits", "cifar10", "both"], default="both")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="distillation epochs (default: 30 digits, 4 cifar10)")
    ap.add_argument("--train-limit", type=int, default=20000, help="CIFAR-10 training images used (random subset)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-distill")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    # the student: half the blocks, half the heads, half the MLP width of the teacher → ≤ 1/4 FLOPs
    if args.dataset in ("digits", "both"):
        data = {"source": "digits", "batch_size": 32}
        teacher_model = {"source": "timm", "architecture": "VisionTransformer", "mean": [0.5] * 3, "std": [0.5] * 3,
                         "kwargs": {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 64, "depth": 4,
                                    "num_heads": 4, "mlp_ratio": 2.0}}
        tdir = args.out / "digits" / "teacher"
        m = run({"name": "digits-teacher", "seed": 0, "device": args.device, "model": teacher_model, "data": data,
                 "passes": [{"adapt": {"epochs": 30, "lr": 1e-3}}]}, tdir)
        model = {"source": "edgevit", "path": str(tdir / "01-adapt")}
        train = {"epochs": args.epochs or 30, "lr": 1e-3}
        results["digits"] = bench("digits", model, data, {"depth": 2, "num_heads": 2, "mlp_ratio": 0.75}, train,
                                  args.out, args.device, m["metrics"]["val_top1"])
    if args.dataset in ("cifar10", "both"):
        dirs, model = cifar_dirs(), cifar_teacher()
        if dirs is None or model is None:
            print(f"cifar10: skipped: {SKIP}")
        else:
            data = cifar_data(dirs, augment="crop_flip", limit_train=args.train_limit)
            train = {"epochs": args.epochs or 4, "lr": 1e-3, "warmup_epochs": 0.5}
            t1 = teacher_top1(model, data, args.device)
            results["cifar10"] = bench("cifar10", model, data, {"depth": 3, "num_heads": 3, "mlp_ratio": 0.75},
                                       train, args.out, args.device, t1)
    for name, r in results.items():
        print(f"distill[{name}]: scratch_top1={r['scratch']:.2f} kd_top1={r['+kd']:.2f} "
              f"full_top1={r['+mgd (full)']:.2f} teacher_top1={r['teacher']:.2f} student_flops_ratio={r['ratio']:.3f}")
    main_set = results.get("cifar10") or results.get("digits")
    if main_set:
        print(f"distill: scratch_top1={main_set['scratch']:.2f} kd_top1={main_set['+kd']:.2f} "
              f"full_top1={main_set['+mgd (full)']:.2f} teacher_top1={main_set['teacher']:.2f} "
              f"student_flops_ratio={main_set['ratio']:.3f}")


if __name__ == "__main__":
    main()
