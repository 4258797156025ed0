"""Tuners compared: trainable and added parameters, peak training memory, seconds per step,
and, on the reference CIFAR-10 teacher, top-1 after the same number of steps.

Part 1, ViT-Small-shaped timm model (224 px, patch 16, 384 wide, 12 blocks, 6 heads; random
weights): each tuner trains a few steps in its own process. Training memory is the peak RSS
growth from just before the first step (activations kept for backward, gradients, optimizer
state), sampled every 2 ms, measured the same way for every tuner; on a GPU it is
torch.cuda.max_memory_allocated minus the memory allocated before the first step.

Part 2, the reference teacher (../shared/data): the `adapt` pass with each tuner, the same
steps on the same CIFAR-10 training images, a fresh classifier head, top-1 on the test set.

    python bench/tuners.py [--device cpu|cuda] [--steps 200] [--batch 16]

Last line: tuners: full_mem_mb=<a> slicefine_mem_mb=<b> losa_mem_mb=<c> disentangled_mem_mb=<d>
slicefine_added_params=<n>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SKIP, cifar_data, cifar_dirs, cifar_teacher  # noqa: E402

TUNERS = {
    "full": {"name": "full"},
    "slicefine": {"name": "slicefine", "rank": 4, "switch_every": 20},
    "losa": {"name": "losa", "rank": 16, "token_rank": 8},
    "disentangled": {"name": "disentangled", "num_queries": 4, "adapter_dim": 48},
}
LR = {"full": 3e-4, "slicefine": 1e-3, "losa": 1e-3, "disentangled": 1e-3}
VIT_S = dict(img_size=224, patch_size=16, num_classes=10, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def worker(name: str, device: str, batch: int, steps: int) -> dict:
    """One tuner on the ViT-S-shaped model, in this process only."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.graph import ModelGraph
    from edgevit.tuners import make_tuner, tuner_class
    from edgevit.tuners.base import count

    torch.manual_seed(0)
    dev = torch.device(device)
    g = ModelGraph.from_module(VisionTransformer(**VIT_S), {"architecture": "VisionTransformer", "kwargs": VIT_S})
    base_params = g.num_params()
    cfg = tuner_class(name).Config.model_validate(TUNERS[name])
    tuner = make_tuner(cfg)
    params = tuner.setup(g)
    g.module.to(dev).train()
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    tuner.start(0)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
        t = threading.Thread(target=sample, daemon=True)
        t.start()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(g.module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tuner.after_step(step, opt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        stop.set()
        t.join()
        mem = peak[0] - base
    tuner.finish(g)
    return {"tuner": name, "trainable_params": count(params), "added_params": g.num_params() - base_params,
            "train_mem_mb": round(mem, 1), "sec_per_step": round(sorted(times[1:])[len(times[1:]) // 2], 3)}


def part1(device: str, batch: int) -> dict[str, dict]:
    out = {}
    for name in TUNERS:
        res = subprocess.run([sys.executable, __file__, "--worker", name, "--device", device, "--batch", str(batch)],
                             capture_output=True, text=True, check=False, cwd=REPO)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed: {res.stderr.strip().splitlines()[-1]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def part2(device: str, steps: int) -> dict[str, dict] | None:
    dirs, model = cifar_dirs(), cifar_teacher()
    if dirs is None or model is None:
        print(f"part 2 skipped: {SKIP}")
        return None
    from common import quiet_console

    from edgevit.pipeline import Pipeline
    from edgevit.recipe import parse_recipe
    from edgevit.registry import Registry

    batch = 64
    out = {}
    for name, tuner in TUNERS.items():
        recipe = {"name": f"tuners-{name}", "seed": 0, "device": device, "model": model,
                  "data": cifar_data(dirs, batch_size=batch, limit_train=steps * batch),
                  "passes": [{"adapt": {"epochs": 1, "lr": LR[name], "warmup_epochs": 0.1, "reset_head": True,
                                        "tuner": tuner}}]}
        reg = Registry()
        rec, plan = parse_recipe(recipe, REPO, reg)
        with tempfile.TemporaryDirectory() as tmp:
            Pipeline(rec, plan, Path(tmp) / "run", reg, quiet_console()).run()
            m = json.loads((Path(tmp) / "run" / "01-adapt" / "metrics.json").read_text())["metrics"]
        out[name] = {"top1": m["val_top1"], "seconds": m["train_seconds"], "steps": steps}
        print(f"  teacher + {name}: top-1 {m['val_top1']:.2f} % after {steps} steps ({m['train_seconds']:.1f} s "
              "incl. the test-set evaluation)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="part 1 batch size")
    ap.add_argument("--steps", type=int, default=200, help="part 2 training steps (batch 64)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, args.batch, 4)))
        return 0
    print(f"part 1: ViT-S-shaped model, batch {args.batch} at 224 px, {args.device}")
    p1 = part1(args.device, args.batch)
    print(f"{'tuner':14s} {'trainable':>12s} {'added':>10s} {'train mem MB':>13s} {'s/step':>8s}")
    for r in p1.values():
        print(f"{r['tuner']:14s} {r['trainable_params']:12,d} {r['added_params']:10,d} {r['train_mem_mb']:13.1f} "
              f"{r['sec_per_step']:8.3f}")
    print(f"part 2: reference CIFAR-10 teacher, adapt with a fresh head, {args.steps} steps of 64 images")
    part2(args.device, args.steps)
    print(f"tuners: full_mem_mb={p1['full']['train_mem_mb']} slicefine_mem_mb={p1['slicefine']['train_mem_mb']} "
          f"losa_mem_mb={p1['losa']['train_mem_mb']} disentangled_mem_mb={p1['disentangled']['train_mem_mb']} "
          f"slicefine_added_params={p1['slicefine']['added_params']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
