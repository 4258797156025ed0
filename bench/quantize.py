"""Quantization benchmark: accuracy of FP16 / INT8 (each calibration method) on the reference
CIFAR-10 teacher, and ONNX Runtime CPU latency at batch 1 on a DeiT-Tiny-shaped model at
224 px (random weights: speed only), all measured in one run. Not part of the test suite.

    python bench/quantize.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SKIP, cifar_data, cifar_dirs, cifar_teacher  # noqa: E402

METHODS = ("minmax", "percentile", "entropy")


def top1(path: Path, loader) -> float:  # noqa: ANN001
    from edgevit.onnx_io import session, top1

    return top1(session(path), loader)


def latency(path: Path, runs: int) -> float:
    from edgevit.passes.benchmark import BenchmarkConfig, measure_latency

    return measure_latency(path, 1, BenchmarkConfig(runs=runs, warmup=20))["median_ms"]


def op_profile(path: Path, runs: int = 20) -> list[tuple[str, float]]:
    """Total time per op type from ONNX Runtime's own profiler (batch 1)."""
    import json

    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.zeros([1, *inp.shape[1:]], dtype=np.float32)
    for _ in range(runs):
        sess.run(None, {inp.name: x})
    prof = sess.end_profiling()
    totals: dict[str, float] = {}
    for e in json.loads(Path(prof).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1000 / runs
    Path(prof).unlink()
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved latency rounds")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.data import build_data
    from edgevit.graph import ModelGraph
    from edgevit.models.sources import load_model
    from edgevit.onnx_io import export_onnx
    from edgevit.quantize.fp16 import convert_fp16
    from edgevit.quantize.int8 import activation_matmuls, preprocess, quantize_dynamic_int8, quantize_int8
    from edgevit.recipe import Recipe

    tmp = Path(tempfile.mkdtemp(prefix="edgevit-bench-quantize-"))
    results: dict[str, float] = {}
    dirs, model = cifar_dirs(), cifar_teacher()
    if dirs is None or model is None:
        print(f"cifar10: skipped: {SKIP}")
    else:
        rec = Recipe.model_validate({"name": "q", "model": model, "data": cifar_data(dirs)})
        g = load_model(rec.model)
        data = build_data(rec.data, g.spec, 0)
        calib = data.sample(args.calibration, 0, "train")[0].numpy()
        export_onnx(g, tmp / "cifar.onnx", opset=17)
        preprocess(tmp / "cifar.onnx", tmp / "cifar.pre.onnx")
        results["fp32"] = top1(tmp / "cifar.onnx", data.val_loader())
        convert_fp16(tmp / "cifar.onnx", tmp / "cifar.fp16.onnx")
        results["fp16"] = top1(tmp / "cifar.fp16.onnx", data.val_loader())
        for layout in ("ort_cpu", "tensorrt"):
            for m in METHODS:
                out = tmp / f"cifar.{layout}.{m}.onnx"
                quantize_int8(tmp / "cifar.pre.onnx", out, calib, calibration_method=m, layout=layout)
                results[f"int8 {layout} {m}"] = top1(out, data.val_loader())
                print(f"  int8 {layout:<8} {m:<10} top-1 {results[f'int8 {layout} {m}']:.2f}%", file=sys.stderr)
        attn = activation_matmuls(tmp / "cifar.pre.onnx")
        for m in METHODS:
            out = tmp / f"cifar.linears.{m}.onnx"
            quantize_int8(tmp / "cifar.pre.onnx", out, calib, calibration_method=m, layout="ort_cpu",
                          nodes_to_exclude=attn)
            results[f"int8 ort_cpu linears {m}"] = top1(out, data.val_loader())
        quantize_dynamic_int8(tmp / "cifar.pre.onnx", tmp / "cifar.dynamic.onnx")
        results["int8 ort_cpu_dynamic"] = top1(tmp / "cifar.dynamic.onnx", data.val_loader())
        print(f"\nCIFAR-10 reference teacher, top-1 % on 10,000 test images (ONNX Runtime CPU), "
              f"{args.calibration} calibration images from train:")
        for k, v in results.items():
            print(f"  {k:<28} {v:6.2f}  ({v - results['fp32']:+.2f})")

    # speed: DeiT-Tiny shape at 224 px
    torch.manual_seed(0)
    kw = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=1000)
    deit = ModelGraph.from_module(VisionTransformer(**kw).eval(), {"architecture": "VisionTransformer", "kwargs": kw})
    export_onnx(deit, tmp / "deit.onnx", opset=17)
    preprocess(tmp / "deit.onnx", tmp / "deit.pre.onnx")
    dcal = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    models = {"fp32": tmp / "deit.onnx", "fp16": tmp / "deit.fp16.onnx"}
    convert_fp16(tmp / "deit.onnx", models["fp16"])
    for layout in ("ort_cpu", "tensorrt"):
        models[f"int8 {layout}"] = tmp / f"deit.{layout}.onnx"
        quantize_int8(tmp / "deit.pre.onnx", models[f"int8 {layout}"], dcal, calibration_method="minmax", layout=layout)
    models["int8 ort_cpu linears"] = tmp / "deit.linears.onnx"
    quantize_int8(tmp / "deit.pre.onnx", models["int8 ort_cpu linears"], dcal, calibration_method="minmax",
                  layout="ort_cpu", nodes_to_exclude=activation_matmuls(tmp / "deit.pre.onnx"))
    models["int8 ort_cpu_dynamic"] = tmp / "deit.dynamic.onnx"
    quantize_dynamic_int8(tmp / "deit.pre.onnx", models["int8 ort_cpu_dynamic"])
    # Interleaved rounds: a slow spell on the machine hits every model alike; the median over
    # rounds picks the fastest form, not one lucky run.
    rounds: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeat):
        for k, path in models.items():
            rounds[k].append(latency(path, args.runs))
        print(f"  latency round {r + 1}/{args.repeat}: " + " ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items()),
              file=sys.stderr)
    lat = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"\nDeiT-Tiny shape (12×192, 224 px), ONNX Runtime CPU, batch 1, median of {args.runs} runs, median of "
          f"{args.repeat} interleaved rounds ({os.cpu_count()} cores); 'linears' = attention's activation×activation "
          "MatMuls left in float:")
    for k, v in lat.items():
        print(f"  {k:<22} {v:8.2f} ms   speed-up ×{lat['fp32'] / v:.2f}")
    fastest = min((k for k in lat if k.startswith("int8")), key=lat.__getitem__)
    speedup = lat["fp32"] / lat[fastest]
    if speedup < 1.5:
        print("\nper-op time (ms per inference) from ONNX Runtime's profiler:")
        for name in ("deit.onnx", "deit.ort_cpu.onnx", "deit.linears.onnx", "deit.dynamic.onnx"):
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in op_profile(tmp / name)[:7])
            print(f"  {name:<20} {top}")
    if results:
        if fastest == "int8 ort_cpu_dynamic":
            key, calib_name = "int8 ort_cpu_dynamic", "dynamic"
        else:
            prefix = fastest + " "
            calib_name = max(METHODS, key=lambda m: results[prefix + m])
            key = prefix + calib_name
        print(f"fastest INT8 form on this CPU: {fastest}")
        print(f"quantize: fp32_top1={results['fp32']:.2f} int8_top1={results[key]:.2f} "
              f"int8_speedup={speedup:.2f} calib={calib_name}")


if __name__ == "__main__":
    main()
