"""Pruning benchmark: one-shot accuracy of magnitude / taylor / osscar, pruning time, and the
real speed-up of the physically smaller model.

On the reference CIFAR-10 teacher (../shared/data): prune 25 / 50 / 75 % of the MLP units,
and separately of the attention heads, in every block, with each method and no fine-tuning;
top-1 on the 10,000 test images right after. Then the ONNX Runtime CPU latency (batch 1,
median after warm-up, each model in its own process) of the unpruned model and of the
50 %-pruned ones, and OSSCAR's time on a ViT-Small-shaped timm model (random weights, 256
calibration images at 224 px). Not part of the test suite.

    python bench/prune.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SKIP, cifar_data, cifar_dirs, cifar_teacher, quiet_console  # noqa: E402

METHODS = ("magnitude", "taylor", "osscar")
RATIOS = (0.25, 0.5, 0.75)


def context(recipe_data: dict, graph, device: str, run_dir: Path):  # noqa: ANN001, ANN201
    from edgevit.context import RunContext, resolve_device
    from edgevit.data import build_data
    from edgevit.recipe import Recipe
    from edgevit.registry import Registry

    rec = Recipe.model_validate(recipe_data)
    data = build_data(rec.data, graph.spec, rec.seed)
    return RunContext(recipe=rec, run_dir=run_dir, data=data, device=resolve_device(device), console=quiet_console(),
                      registry=Registry(), seed=rec.seed, stage_dir=run_dir)


def prune(graph, ctx, **cfg):  # noqa: ANN001, ANN201
    from edgevit.passes.prune import PrunePass

    p = PrunePass(PrunePass.Config(**cfg))
    g = graph.clone()
    t0 = time.perf_counter()
    out = p.run(g, ctx)
    return out, time.perf_counter() - t0, p.metrics


def latency(graph, tmp: Path, name: str, runs: int) -> float:  # noqa: ANN001
    from edgevit.onnx_io import export_onnx
    from edgevit.passes.benchmark import BenchmarkConfig, measure_latency

    path = tmp / f"{name}.onnx"
    export_onnx(graph, path, opset=17)
    return measure_latency(path, 1, BenchmarkConfig(runs=runs, warmup=20))["median_ms"]


def vit_small_seconds(device: str) -> tuple[float, list]:
    """OSSCAR on a ViT-Small-shaped model: 12 blocks, 384 wide, 6 heads, 1536 MLP units."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.graph import ModelGraph
    from edgevit.prune.plan import PlanConfig, plan
    from edgevit.prune.reconstruct import osscar_model

    kw = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, num_classes=1000)
    torch.manual_seed(0)
    g = ModelGraph.from_module(VisionTransformer(**kw).eval(), {"architecture": "VisionTransformer", "kwargs": kw})
    images = torch.randn(256, 3, 224, 224)
    counts, _ = plan(g, PlanConfig(heads=0.5, mlp=0.5))
    t0 = time.perf_counter()
    log = osscar_model(g, counts, images, torch.device("cpu" if device == "auto" else device), batch=32)
    return time.perf_counter() - t0, log


def vit_b_layer_seconds(device: str, tokens: int, sizes: str) -> list[str]:
    """OSSCAR on ViT-B-sized layers with synthetic inputs (a few outlier channels, as ViT fc2
    inputs have): fc2 (3072 units → 768) and the output projection (12 heads × 64 → 768),
    half of each kept. Gram accumulation and selection + re-fit timed apart, float64 on
    ``device``; ``sizes``: official (10 units / 2 heads per greedy step, 10 / 5 per swap) or
    old (the pre-issue-20 defaults: (n − keep)//32 per step, n//16 per swap)."""
    import torch

    from edgevit.prune.osscar import GramAccumulator, osscar_prune

    dev = torch.device("cpu" if device == "auto" else device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    lines = []
    for name, d_in, n, width in (("fc2 3072→768", 3072, 3072, 1), ("proj 12×64→768", 768, 12, 64)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d_in, generator=g)
        x[:, :8] *= 30  # outlier channels
        w = torch.randn(d_in + 1, 768, generator=g, dtype=torch.float64) / d_in ** 0.5
        groups = torch.arange(d_in).reshape(n, width)
        keep = n // 2
        if sizes == "official":
            step, swap = (10, 10) if width == 1 else (2, 5)
        else:
            step, swap = max(1, (n - keep) // 32), max(1, n // 16)
        sync()
        t0 = time.perf_counter()
        acc = GramAccumulator(d_in, dev)
        for start in range(0, tokens, 4096):
            acc.add(x[start:start + 4096].to(dev))
        h = acc.gram(1e-2)
        sync()
        t1 = time.perf_counter()
        res = osscar_prune(h, w.to(dev), groups, keep, torch.tensor([d_in]), greedy_step=step, swap_size=swap)
        sync()
        t2 = time.perf_counter()
        lines.append(f"osscar {name}, keep {keep} of {n}, {tokens} tokens, {sizes} sizes (greedy {step}, swap "
                     f"{swap}) on {dev}: gram {t1 - t0:.2f} s, select + re-fit {t2 - t1:.2f} s, "
                     f"objective {res.objective:.6g} (greedy {res.greedy_objective:.6g}, {res.swaps} swaps)")
    return lines


def compare_sizes(teacher, ctx, rounds: int) -> list[str]:  # noqa: ANN001
    """OSSCAR on the reference teacher with the official step sizes and with the old ones
    ((n − keep)//32 per greedy step, n//16 per swap), rounds interleaved: seconds and the
    summed layer objectives (lower is better)."""
    import torch

    from edgevit.prune.plan import PlanConfig, plan
    from edgevit.prune.reconstruct import HEAD_SIZES, UNIT_SIZES, SearchSizes, osscar_model

    images, _ = ctx.calibration()
    lines = []
    for what in ("heads", "mlp"):
        counts, _ = plan(teacher, PlanConfig(**{what: 0.5}))
        b0 = teacher.spec.block(0)
        n, keep = (b0.attn.num_heads, counts[0][0]) if what == "heads" else (b0.mlp.hidden, counts[0][1])
        old = SearchSizes(max(1, (n - keep) // 32), max(1, n // 16))
        sizes = {"official": (HEAD_SIZES, UNIT_SIZES), "old": (old, old)}
        seconds: dict[str, list[float]] = {k: [] for k in sizes}
        objective: dict[str, float] = {}
        for _ in range(rounds):
            for name, (hs, us) in sizes.items():
                g = teacher.clone()
                t0 = time.perf_counter()
                log = osscar_model(g, counts, images, torch.device("cpu"), head_sizes=hs, unit_sizes=us)
                seconds[name].append(time.perf_counter() - t0)
                key = "heads_objective" if what == "heads" else "units_objective"
                objective[name] = sum(e[key] for e in log)
        for name, (hs, us) in sizes.items():
            s = hs if what == "heads" else us
            lines.append(f"osscar {what} 50% on the teacher, {name} sizes (greedy {s.greedy_step}, swap "
                         f"{s.swap_size}): median {sorted(seconds[name])[len(seconds[name]) // 2]:.2f} s over "
                         f"{rounds} interleaved rounds, summed objective {objective[name]:.6g}")
    return lines


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def plot(results: dict, teacher: float, out: Path) -> Path | None:
    """Top-1 against the pruned fraction, one panel for MLP units and one for heads."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is not installed; pip install 'edgevit[bench]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, what in zip(axes, ("mlp", "heads"), strict=True):
        for method in METHODS:
            ax.plot([int(r * 100) for r in RATIOS], [results[(what, method, r)][0] for r in RATIOS], marker="o",
                    label=method)
        ax.axhline(teacher, color="grey", linestyle="--", label="unpruned")
        ax.set_title(f"{'MLP units' if what == 'mlp' else 'attention heads'} removed, one-shot")
        ax.set_xlabel("% removed in every block")
        ax.set_xticks([int(r * 100) for r in RATIOS])
    axes[0].set_ylabel("CIFAR-10 test top-1 %")
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calibration", type=int, default=512, help="calibration images (train split, class-stratified)")
    ap.add_argument("--runs", type=int, default=200, help="latency runs per model")
    ap.add_argument("--skip-vit-small", action="store_true")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="which methods to run (the others print as nan)")
    ap.add_argument("--skip-latency", action="store_true", help="no ONNX Runtime latency of the pruned models")
    ap.add_argument("--plot", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "bench-prune"
                    / "prune_top1.png", help="where to save the top-1 vs ratio plot")
    ap.add_argument("--vit-small-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vit-b-layer-only", action="store_true",
                    help="only time OSSCAR on ViT-B-sized fc2 and output-projection layers (synthetic inputs)")
    ap.add_argument("--compare-sizes", type=int, default=0, metavar="ROUNDS",
                    help="only time OSSCAR on the teacher with the official and the old step sizes")
    ap.add_argument("--tokens", type=int, default=16384, help="--vit-b-layer-only: calibration tokens")
    ap.add_argument("--sizes", choices=("official", "old"), default="official",
                    help="--vit-b-layer-only: OSSCAR step sizes")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.vit_b_layer_only:
        print("\n".join(vit_b_layer_seconds(args.device, args.tokens, args.sizes)))
        return
    if args.vit_small_only:  # in its own process, so its peak memory is its own
        secs, log = vit_small_seconds(args.device)
        per_block = ", ".join(f"{e['seconds']:.1f}" for e in log)
        print(f"osscar on ViT-Small shape (12×384, 6 heads, 1536 units), 256 images at 224 px, heads+mlp 50%: "
              f"{secs:.1f} s (per block: {per_block}); peak RSS {peak_rss_mb():.0f} MB")
        return
    from edgevit.models.sources import load_model
    from edgevit.recipe import Recipe
    from edgevit.training import evaluate_top1

    dirs, model = cifar_dirs(), cifar_teacher()
    if dirs is None or model is None:
        print(f"prune: skipped: {SKIP}")
        return
    recipe = {"name": "bench-prune", "seed": 0, "device": args.device, "model": model,
              "data": cifar_data(dirs), "calibration": {"num_samples": args.calibration, "split": "train"}}
    teacher = load_model(Recipe.model_validate(recipe).model)
    tmp = Path(tempfile.mkdtemp(prefix="edgevit-bench-prune-"))
    ctx = context(recipe, teacher, args.device, tmp)
    if args.compare_sizes:
        print("\n".join(compare_sizes(teacher, ctx, args.compare_sizes)))
        return
    t_top1 = evaluate_top1(teacher.module.to(ctx.device), ctx.data.val_loader(), ctx.device)
    teacher.module.cpu()
    print(f"teacher: top-1 {t_top1:.2f}%, {teacher.num_params() / 1e6:.2f} M params, "
          f"{teacher.cost().flops / 1e6:.1f} MFLOPs; calibration {args.calibration} train images", file=sys.stderr)
    ctx.calibration()  # draw once, outside the timings
    results: dict[tuple[str, str, float], tuple[float, float]] = {}
    pruned50: dict[str, object] = {}
    for what in ("mlp", "heads"):
        for ratio in RATIOS:
            for method in METHODS:
                if method not in args.methods:
                    results[(what, method, ratio)] = (float("nan"), float("nan"))
                    continue
                g, seconds, m = prune(teacher, ctx, method=method, **{what: ratio})
                top1 = evaluate_top1(g.module.to(ctx.device), ctx.data.val_loader(), ctx.device)
                g.module.cpu()
                results[(what, method, ratio)] = (top1, seconds)
                if ratio == 0.5 and method == "osscar":
                    pruned50[what] = g
                print(f"  {what} {int(ratio * 100)}% {method:<9} top-1 {top1:6.2f}%  {seconds:6.2f} s  "
                      f"(flops kept {m['flops_kept']:.3f})", file=sys.stderr)
    both, both_s, both_m = prune(teacher, ctx, method="osscar", heads=0.5, mlp=0.5)
    both_top1 = evaluate_top1(both.module.to(ctx.device), ctx.data.val_loader(), ctx.device)
    both.module.cpu()

    print(f"\none-shot top-1 % on CIFAR-10 test (teacher {t_top1:.2f}%), no fine-tuning; pruning seconds")
    print(f"{'pruned':<12}" + "".join(f"{m:>12}" for m in METHODS) + "".join(f"{m[:6] + ' s':>10}" for m in METHODS))
    for what in ("mlp", "heads"):
        for ratio in RATIOS:
            row = [results[(what, m, ratio)] for m in METHODS]
            print(f"{what + ' ' + str(int(ratio * 100)) + '%':<12}" + "".join(f"{t:>12.2f}" for t, _ in row)
                  + "".join(f"{s:>10.2f}" for _, s in row))
    print(f"heads+mlp 50% osscar: top-1 {both_top1:.2f}%, flops kept {both_m['flops_kept']:.3f}, {both_s:.2f} s")
    saved = plot(results, t_top1, args.plot)
    if saved:
        print(f"plot: {saved}")

    lat = {"unpruned": float("nan"), "heads+mlp50": float("nan")}
    if not args.skip_latency and "osscar" in args.methods:
        lat = {"unpruned": latency(teacher, tmp, "unpruned", args.runs)}
        lat["mlp50"] = latency(pruned50["mlp"], tmp, "mlp50", args.runs)
        lat["heads50"] = latency(pruned50["heads"], tmp, "heads50", args.runs)
        lat["heads+mlp50"] = latency(both, tmp, "both50", args.runs)
        print("\nONNX Runtime CPU latency, batch 1, median of "
              f"{args.runs} runs after warm-up ({os.cpu_count()} cores):")
        for name, ms in lat.items():
            print(f"  {name:<12} {ms:7.3f} ms   speed-up ×{lat['unpruned'] / ms:.2f}")

    if not args.skip_vit_small:
        res = subprocess.run([sys.executable, __file__, "--vit-small-only", "--device", args.device],
                             capture_output=True, text=True, check=True)
        print("\n" + res.stdout.strip())
    print(f"prune: mlp50_magnitude_top1={results[('mlp', 'magnitude', 0.5)][0]:.2f} "
          f"mlp50_taylor_top1={results[('mlp', 'taylor', 0.5)][0]:.2f} "
          f"mlp50_osscar_top1={results[('mlp', 'osscar', 0.5)][0]:.2f} teacher_top1={t_top1:.2f} "
          f"latency_ratio_50={lat['unpruned'] / lat['heads+mlp50']:.2f} "
          f"osscar_seconds={results[('mlp', 'osscar', 0.5)][1]:.2f}")


if __name__ == "__main__":
    main()
