"""Families benchmark (issue 17): Swin and MobileViT through edgevit's pruning, beside Torch-Pruning.

1. A Swin-shaped and a MobileViT-shaped model (timm's own classes, small, 32 px) trained
   briefly from scratch on CIFAR-10 (../shared/data; AdamW, warm-up + cosine, random crop +
   flip, label smoothing 0.1; ``--epochs`` over ``--train-limit`` images each), cached under
   ~/.cache/edgevit/families so a re-run reuses them. Top-1 on the 10,000 test images.
2. One-shot pruning (no fine-tuning) of 50 % of the MLP units, and separately of 50 % of the
   heads, in every block: edgevit OSSCAR (256 calibration images) and Torch-Pruning
   (MetaPruner, magnitude and Taylor importance). A Torch-Pruning failure is recorded with its
   error and prints ``nan``.
3. ``compress`` of each family at its 224/256 px size (random weights, no hub): prune osscar
   heads 0.5 + mlp 0.5 -> export for jetson-nano (opset 13, TensorRT 8.2 op check) -> benchmark,
   with host latency (ONNX Runtime CPU, batch 1, median) before and after.

Run with the bench venv (Torch-Pruning lives there), e.g.::

    PYTHONPATH=$PWD nice -n 5 /work/venv-bench/bin/python bench/families.py

Last line: ``families: swin_ev_mlp50_top1=... swin_tp_mlp50_top1=... mobilevit_ev_mlp50_top1=...
mobilevit_tp_mlp50_top1=... families_ok=<n> families_tried=<m>`` (tp = Torch-Pruning magnitude).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, SKIP, cifar_dirs, quiet_console  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SWIN = dict(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6), window_size=4,
            mlp_ratio=2.0, num_classes=10)
MOBILEVIT = dict(num_classes=10)  # mobilevit_xxs, run at 32 px
COMPRESS = {  # timm name, kwargs: the real architectures, random weights
    "swin": ("swin_tiny_patch4_window7_224", {}),
    "swinv2": ("swinv2_tiny_window8_256", {}),
    "beit": ("beit_base_patch16_224", {}),
    "eva02": ("eva02_tiny_patch14_224", {}),
    "mobilevit": ("mobilevit_s", {}),
}


def cifar_tensors(dirs: tuple[Path, Path]):  # noqa: ANN201
    """uint8 CIFAR-10 tensors (decoded once, cached as safetensors under the cache)."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    path = CACHE / "families" / "cifar10_u8.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["xtr"], t["ytr"], t["xte"], t["yte"]
    out = []
    for d in dirs:
        classes = sorted(p.name for p in d.iterdir() if p.is_dir())
        xs, ys = [], []
        for c, name in enumerate(classes):
            for f in sorted((d / name).iterdir()):
                xs.append(np.asarray(Image.open(f).convert("RGB")))
                ys.append(c)
        out += [torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"xtr": out[0], "ytr": out[1], "xte": out[2], "yte": out[3]}, str(path))
    return tuple(out)


def normalise(x):  # noqa: ANN001, ANN201
    import torch

    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def build(kind: str):  # noqa: ANN201
    import timm
    from timm.models.swin_transformer import SwinTransformer

    if kind == "swin":
        return SwinTransformer(**SWIN), {"architecture": "SwinTransformer", "kwargs": SWIN}
    kw = dict(MOBILEVIT, img_size=32)
    return timm.create_model("mobilevit_xxs", pretrained=False, **kw), {"name": "mobilevit_xxs", "kwargs": kw}


def train(kind: str, data, epochs: int, lr: float, limit: int) -> tuple[object, dict, float]:  # noqa: ANN001
    """The model trained ``epochs`` epochs on the first ``limit`` images of a fixed shuffle of
    the train split (cached), its build recipe, and training seconds."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    keep = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(1))[:limit]
    xtr, ytr = data[0][keep], data[1][keep]
    module, recipe = build(kind)
    path = CACHE / "families" / f"{kind}_e{epochs}_n{limit}_lr{lr:g}.safetensors"
    if path.is_file():
        module.load_state_dict(load_file(str(path)))
        meta = json.loads(path.with_suffix(".json").read_text())
        return module.eval(), recipe, meta["seconds"]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.05)
    bs = 128
    steps = epochs * (len(xtr) // bs)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warm if i < warm else
                                              0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    t0 = time.perf_counter()
    module.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xtr))
        for s in range(0, len(xtr) - bs + 1, bs):
            idx = perm[s:s + bs]
            x = F.pad(xtr[idx].float(), (4, 4, 4, 4))  # random crop of the zero-padded image, per batch
            i, j = torch.randint(0, 9, (2,)).tolist()
            x = x[:, :, i:i + 32, j:j + 32]
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(module(normalise(x)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  {kind} epoch {ep + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    seconds = time.perf_counter() - t0
    module.eval()
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "epochs": epochs, "lr": lr}))
    return module, recipe, seconds


def top1(module, data) -> float:  # noqa: ANN001
    import torch

    xte, yte = data[2], data[3]
    correct = 0
    module.eval()
    with torch.no_grad():
        for s in range(0, len(xte), 500):
            correct += (module(normalise(xte[s:s + 500])).argmax(-1) == yte[s:s + 500]).sum().item()
    return 100.0 * correct / len(xte)


def ev_prune(graph, what: str, images):  # noqa: ANN001, ANN201
    import torch

    from edgevit.prune.plan import PlanConfig, counts_for
    from edgevit.prune.reconstruct import osscar_model

    g = graph.clone()
    counts = counts_for(g, PlanConfig(), 0.5 if what == "heads" else 0.0, 0.5 if what == "mlp" else 0.0)
    t0 = time.perf_counter()
    osscar_model(g, counts, images, torch.device("cpu"))
    return g, time.perf_counter() - t0


def tp_prune(graph, what: str, importance: str, images, labels):  # noqa: ANN001, ANN201
    """Torch-Pruning's MetaPruner on a copy: only the blocks' fc1 (MLP) or qkv (heads) groups."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    m = copy.deepcopy(graph.module).eval()
    fc1 = {m.get_submodule(b.mlp.fc1) for b in graph.spec.blocks}
    qkv = {m.get_submodule(b.attn.qkv): b.attn.num_heads for b in graph.spec.blocks}
    target = fc1 if what == "mlp" else set(qkv)
    ignored = [x for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d)) and x not in target]
    if what == "heads":  # the qkv's group reaches proj; keep fc1/fc2 and everything else out
        ignored = [x for x in ignored if x not in {m.get_submodule(b.attn.proj) for b in graph.spec.blocks}]
    imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    kw = (dict(pruning_ratio=0.5) if what == "mlp" else
          dict(pruning_ratio=0.5, num_heads=qkv, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(m, images[:1], importance=imp, ignored_layers=ignored, **kw)
    if importance == "taylor":
        m.zero_grad(set_to_none=True)
        for s in range(0, len(images), 64):
            F.cross_entropy(m(images[s:s + 64]), labels[s:s + 64]).backward()
    with torch.no_grad():
        pruner.step()
    m.zero_grad(set_to_none=True)
    if what == "heads":  # the hand step TP leaves to the user (issue #101): heads into the modules
        for layer, n in pruner.num_heads.items():
            for mod in m.modules():
                if getattr(mod, "qkv", None) is layer:
                    mod.num_heads = n
                    if hasattr(mod, "attn_dim"):
                        mod.attn_dim = layer.out_features // 3
    return m.eval(), time.perf_counter() - t0


def one_shot(kind: str, data, epochs: int, lr: float, limit: int, calib: int) -> dict:  # noqa: ANN001
    import torch

    from edgevit.graph import ModelGraph

    module, recipe, secs = train(kind, data, epochs, lr, limit)
    graph = ModelGraph.from_module(module, recipe, mean=MEAN, std=STD)
    base = top1(module, data)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data[0]), generator=g)[:calib]
    images, labels = normalise(data[0][idx]), data[1][idx]
    rows = {"unpruned": {"top1": base, "params": graph.num_params(), "train_seconds": round(secs)}}
    print(f"{kind}: {graph.num_params()} params, {epochs} epochs on {limit} images in {secs:.0f} s, "
          f"top-1 {base:.2f} %", flush=True)
    for what in ("mlp", "heads"):
        pg, s = ev_prune(graph, what, images)
        rows[f"ev_osscar_{what}50"] = {"top1": top1(pg.module, data), "params": pg.num_params(), "seconds": round(s, 1)}
        for imp in ("magnitude", "taylor"):
            key = f"tp_{imp}_{what}50"
            try:
                m, s = tp_prune(graph, what, imp, images, labels)
                rows[key] = {"top1": top1(m, data), "params": sum(p.numel() for p in m.parameters()),
                             "seconds": round(s, 1)}
            except Exception as e:  # a Torch-Pruning failure is a result: recorded, never dropped
                rows[key] = {"top1": float("nan"), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    for key, r in rows.items():
        extra = f"  ERROR {r['error']}" if "error" in r else f"  {r.get('params', '')} params"
        print(f"  {kind} {key:24s} top-1 {r['top1']:6.2f}{extra}", flush=True)
    return rows


def compress(kind: str, name: str, kwargs: dict, dirs, work: Path) -> dict:  # noqa: ANN001
    """edgevit compress of ``name`` (random weights) to a jetson-nano export; no hand step."""
    from edgevit.pipeline import Pipeline
    from edgevit.recipe import parse_recipe
    from edgevit.registry import Registry

    recipe = {
        "name": f"families-{kind}", "seed": 0, "device": "cpu", "profile": "jetson-nano",
        "model": {"source": "timm", "name": name, "kwargs": {"num_classes": 10, **kwargs}},
        "data": {"source": "imagefolder", "train": str(dirs[0]), "val": str(dirs[1]), "batch_size": 16,
                 "eval_batch_size": 16, "limit_train": 64, "limit_val": 16},
        "calibration": {"num_samples": 16, "split": "train"},
        "passes": [{"prune": {"method": "osscar", "heads": 0.5, "mlp": 0.5, "batch_size": 8}},
                   {"export": {"parity_samples": 8}},
                   {"benchmark": {"runs": 10, "warmup": 2, "throughput_batch": 1}}],
    }
    out = work / kind
    t0 = time.perf_counter()
    try:
        reg = Registry()
        r, steps = parse_recipe(recipe, work, reg)
        Pipeline(r, steps, out, reg, quiet_console()).run()
    except BaseException as e:  # noqa: BLE001  (SystemExit from a refusal included: it is the result)
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "seconds": round(time.perf_counter() - t0)}
    ex = json.loads((out / "02-export" / "metrics.json").read_text())["metrics"]
    bench = json.loads((out / "03-benchmark" / "benchmark.json").read_text())["stages"]
    lat = {s["stage"]: s for s in bench}
    src, exp = lat.get("00-source"), lat.get("02-export")
    ok = (ex["parity"]["max_abs_diff"] <= 1e-3 and ex["parity"]["top1_agreement"] >= 0.99
          and src is not None and exp is not None and exp["onnx_bytes"] < src["onnx_bytes"])
    return {"ok": bool(ok), "seconds": round(time.perf_counter() - t0), "parity": ex["parity"]["max_abs_diff"],
            "onnx_mb": (round(src["onnx_bytes"] / 2**20, 1), round(exp["onnx_bytes"] / 2**20, 1)),
            "latency_ms": (src["host_latency"]["median_ms"], exp["host_latency"]["median_ms"]),
            "predicted": (exp.get("predicted") or {}).get("verdict")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=10000, help="training images (of 50,000)")
    ap.add_argument("--test-limit", type=int, default=10000, help="test images for top-1 (of 10,000)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--compress", default=",".join(COMPRESS), help="families for the 224 px compress runs")
    ap.add_argument("--part", choices=("all", "oneshot", "compress", "summary"), default="all",
                    help="run one part (results cached under ~/.cache/edgevit/families; summary reads them)")
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    dirs = cifar_dirs()
    if dirs is None:
        print(f"skip: {SKIP}")
        return
    saved = CACHE / "families"
    saved.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "oneshot"):
        data = cifar_tensors(dirs)
        pick = torch.randperm(len(data[2]), generator=torch.Generator().manual_seed(2))[:args.test_limit]
        data = (*data[:2], data[2][pick], data[3][pick])  # a fixed random subset (the files are class-ordered)
        results = {kind: one_shot(kind, data, args.epochs, args.lr, args.train_limit, args.calibration)
                   for kind in ("swin", "mobilevit")}
        (saved / "oneshot.json").write_text(json.dumps(results, indent=1))
    if args.part in ("all", "compress"):
        done = {}
        with tempfile.TemporaryDirectory() as tmp:
            for kind in [k for k in args.compress.split(",") if k]:
                name, kw = COMPRESS[kind]
                with contextlib.redirect_stdout(io.StringIO()):
                    try:
                        done[kind] = compress(kind, name, kw, dirs, Path(tmp))
                    except Exception:  # noqa: BLE001
                        done[kind] = {"ok": False, "error": traceback.format_exc().splitlines()[-1]}
                r = done[kind]
                if r["ok"]:
                    print(f"compress {kind} ({name}): ok in {r['seconds']} s; parity {r['parity']:.1e}; ONNX "
                          f"{r['onnx_mb'][0]} -> {r['onnx_mb'][1]} MB; host latency {r['latency_ms'][0]:.1f} -> "
                          f"{r['latency_ms'][1]:.1f} ms; jetson-nano: {r['predicted']}", flush=True)
                else:
                    print(f"compress {kind} ({name}): FAILED: {r.get('error')}", flush=True)
        (saved / "compress.json").write_text(json.dumps(done, indent=1))
    results = json.loads((saved / "oneshot.json").read_text()) if (saved / "oneshot.json").is_file() else {}
    done = json.loads((saved / "compress.json").read_text()) if (saved / "compress.json").is_file() else {}

    def fig(kind: str, key: str) -> str:
        v = results.get(kind, {}).get(key, {}).get("top1", float("nan"))
        return "nan" if v != v else f"{v:.2f}"

    print(f"families: swin_ev_mlp50_top1={fig('swin', 'ev_osscar_mlp50')} "
          f"swin_tp_mlp50_top1={fig('swin', 'tp_magnitude_mlp50')} "
          f"mobilevit_ev_mlp50_top1={fig('mobilevit', 'ev_osscar_mlp50')} "
          f"mobilevit_tp_mlp50_top1={fig('mobilevit', 'tp_magnitude_mlp50')} "
          f"families_ok={sum(r['ok'] for r in done.values())} families_tried={len(done)}")


if __name__ == "__main__":
    main()
