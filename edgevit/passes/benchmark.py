"""benchmark: accuracy, host latency, throughput, memory and size of every stage's model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from edgevit.context import RunContext
from edgevit.errors import EdgeVitError
from edgevit.fileio import write_json
from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx, session, top1
from edgevit.passes.base import Pass, PassConfig
from edgevit.predict.device import predict_onnx
from edgevit.training.evaluate import evaluate_top1


class BenchmarkConfig(PassConfig):
    runs: int = Field(50, ge=1, description="timed runs per measurement, after warm-up")
    warmup: int = Field(10, ge=0)
    throughput_batch: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: all cores)")
    opset: int = Field(17, ge=11, le=21, description="opset for stages that have no ONNX of their own")


def measure_latency(path: Path, batch: int, cfg: BenchmarkConfig) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgevit.latency", str(path), "--batch", str(batch),
           "--runs", str(cfg.runs), "--warmup", str(cfg.warmup), "--threads", str(cfg.threads or 0)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeVitError(f"benchmark: latency measurement of {path} failed: {last}")
    return json.loads(res.stdout)


class BenchmarkPass(Pass):
    name = "benchmark"
    Config = BenchmarkConfig
    summary = ("top-1, host latency (median/p90/p99), throughput, memory, size for every stage; predicted "
               "latency, memory and a verdict on the recipe's device profile")
    modifies_weights = False

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: BenchmarkConfig = self.config  # type: ignore[assignment]
        results = []
        val = ctx.data.val_loader()
        seen: set[Path] = set()
        with ctx.progress() as progress:
            task = progress.add_task("benchmark", total=len(ctx.stages), info="")
            for stage in ctx.stages:
                progress.update(task, info=stage.dir.name)
                g = ModelGraph.load(stage.dir, ctx.registry)
                onnx_path = g.artifacts.get("onnx")
                if onnx_path is not None and onnx_path in seen:  # e.g. a bundle of the stage before
                    progress.update(task, advance=1)
                    continue
                if onnx_path is not None:
                    seen.add(onnx_path)
                if onnx_path is not None and onnx_path.is_file():
                    acc, runtime = top1(session(onnx_path), val), "onnxruntime"
                else:
                    onnx_path = ctx.stage_dir / "onnx" / f"{stage.dir.name}.onnx"
                    opset = ctx.profile.export_opset(cfg.opset) if ctx.profile is not None else cfg.opset
                    export_onnx(g, onnx_path, opset=opset, dynamic_batch=True)
                    acc, runtime = evaluate_top1(g.module, val, ctx.device), "torch"
                lat = measure_latency(onnx_path, 1, cfg)
                thr = measure_latency(onnx_path, cfg.throughput_batch, cfg)
                cost = g.cost()
                results.append({
                    "stage": stage.dir.name,
                    "top1": round(acc, 2),
                    "top1_runtime": runtime,
                    "params": g.num_params(),
                    "macs": cost.macs,
                    "flops": cost.flops,
                    "onnx_bytes": onnx_path.stat().st_size,
                    "latency_ms": {k: round(lat[f"{k}_ms"], 4) for k in ("median", "p90", "p99")},
                    "throughput_ips": round(thr["batch"] / (thr["median_ms"] / 1000), 1),
                    "throughput_batch": thr["batch"],
                    "peak_rss_mb": round(lat["peak_rss_mb"], 1),
                    "model_mem_mb": round(lat["model_mem_mb"], 1),
                    "providers": lat["providers"],
                    "predicted": predict_onnx(onnx_path, ctx.profile) if ctx.profile is not None else None,
                })
                progress.update(task, advance=1)
                pred = results[-1]["predicted"]
                on = (f"; {pred['profile']} {pred['precision']}: {pred['latency_ms']} ms predicted, {pred['verdict']}"
                      if pred and pred.get("latency_ms") is not None else "")
                ctx.console.print(f"  {stage.dir.name}: top-1 {acc:.2f}%  median {lat['median_ms']:.3f} ms{on}")
        write_json(ctx.stage_dir / "benchmark.json", {"host": host_info(), "stages": results})
        self.metrics = {"stages_measured": len(results)}
        return graph


def host_info() -> dict[str, Any]:
    import os
    import platform

    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
