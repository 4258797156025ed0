"""benchmark: accuracy, host latency, throughput, memory and size of every stage's model.

Latency is timed in interleaved rounds (``edgevit.latency.time_interleaved``): every model
once per round, in a fresh process each time. Timed one after another, load on the machine
that comes and goes can flip a comparison; interleaved, it hits every model alike, and the
round-to-round spread is recorded so the report can say when a difference is within it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from edgevit.context import RunContext
from edgevit.errors import EdgeVitError
from edgevit.fileio import write_json
from edgevit.graph import ModelGraph
from edgevit.latency import time_interleaved
from edgevit.onnx_io import export_onnx, session, top1
from edgevit.passes.base import Pass, PassConfig
from edgevit.predict.device import predict_onnx
from edgevit.seg import bench as seg_bench
from edgevit.training.evaluate import evaluate_top1


class BenchmarkConfig(PassConfig):
    runs: int = Field(50, ge=1, description="timed runs per model in each round, after warm-up")
    rounds: int = Field(3, ge=1, description="interleaved rounds: every model is timed once per round")
    warmup: int = Field(10, ge=0)
    throughput_batch: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: the run's threads)")
    opset: int = Field(17, ge=11, le=21, description="opset for stages that have no ONNX of their own")
    overlays: int = Field(3, ge=0, description="segmentation: validation frames drawn with the truth and the first "
                                               "and last stages' predictions (plots/overlay_*.png)")


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Stage ``b`` against ``a`` at batch 1: the speed-up, its range over the rounds (the rounds
    are interleaved, so round r of both was timed under the same load), and whether the
    difference is within the run-to-run spread."""
    la, lb = a["host_latency"], b["host_latency"]
    ratios = [x / y for x, y in zip(la["round_medians_ms"], lb["round_medians_ms"], strict=True) if y > 0]
    diff = abs(la["median_ms"] - lb["median_ms"])
    spread = max(la["spread_ms"], lb["spread_ms"])
    return {"from": a["stage"], "to": b["stage"], "speedup": round(la["median_ms"] / lb["median_ms"], 3),
            "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)], "difference_ms": round(diff, 4),
            "spread_ms": round(spread, 4), "within_spread": spread >= diff}


class BenchmarkPass(Pass):
    name = "benchmark"
    Config = BenchmarkConfig
    summary = ("top-1 (segmentation: mIoU, pixel accuracy, per-class IoU), host latency (median/p90/p99 over "
               "interleaved rounds, with their spread), throughput, memory, size for every stage; predicted latency, "
               "memory and a verdict on the recipe's profile")
    modifies_weights = False

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: BenchmarkConfig = self.config  # type: ignore[assignment]
        results, paths = [], []
        val = ctx.data.val_loader()
        seg = ctx.data.task == "segmentation"
        frames = ctx.data.sample_indices(min(cfg.overlays, len(ctx.data.val)), ctx.seed) if seg else []
        labels: list[list] = []  # per measured stage: its predicted label maps of ``frames``
        seen: set[Path] = set()
        with ctx.progress() as progress:
            task = progress.add_task(f"benchmark: {'mIoU' if seg else 'top-1'}", total=len(ctx.stages), info="")
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
                    sess, runtime = session(onnx_path, cfg.threads), "onnxruntime"
                    acc = seg_bench.onnx_scores(sess, val, ctx.data) if seg else top1(sess, val)
                    predict = seg_bench.onnx_predict(sess)
                else:
                    onnx_path = ctx.stage_dir / "onnx" / f"{stage.dir.name}.onnx"
                    opset = ctx.profile.export_opset(cfg.opset) if ctx.profile is not None else cfg.opset
                    export_onnx(g, onnx_path, opset=opset, dynamic_batch=True)
                    acc = (seg_bench.torch_scores(g.module, val, ctx.data, ctx.device) if seg
                           else evaluate_top1(g.module, val, ctx.device))
                    runtime, predict = "torch", seg_bench.torch_predict(g.module, ctx.device)
                if seg:
                    labels.append(seg_bench.frame_labels(predict, ctx.data, frames))
                    scores = {**seg_bench.rounded(acc), "miou_runtime": runtime}
                else:
                    scores = {"top1": round(acc, 2), "top1_runtime": runtime}
                cost = g.cost()
                paths.append(onnx_path)
                results.append({
                    "stage": stage.dir.name, **scores,
                    "params": g.num_params(), "macs": cost.macs, "flops": cost.flops,
                    "onnx_bytes": onnx_path.stat().st_size,
                    "predicted": predict_onnx(onnx_path, ctx.profile) if ctx.profile is not None else None,
                })
                progress.update(task, advance=1)
            threads = cfg.threads or _run_threads()
            ctx.console.print(f"  timing {len(paths)} models in {cfg.rounds} interleaved rounds of {cfg.runs} runs, "
                              f"{threads} ONNX Runtime thread{'s' if threads != 1 else ''}")
            try:
                timed = time_interleaved(paths, [1, cfg.throughput_batch], cfg.rounds, cfg.runs, cfg.warmup, threads)
            except RuntimeError as e:
                raise EdgeVitError(f"benchmark: latency measurement failed: {e}") from e
        for r, t in zip(results, timed, strict=True):
            lat, thr = t["timings"][0], t["timings"][-1]
            r["host_latency"] = lat.summary()
            r["throughput_ips"] = round(thr.batch / (thr.median_ms / 1000), 1)
            r["throughput_batch"] = thr.batch
            r["peak_rss_mb"] = round(t["peak_rss_mb"], 1)
            r["model_mem_mb"] = round(t["model_mem_mb"], 1)
            r["providers"] = t["providers"]
            pred = r["predicted"]
            on = (f"; {pred['profile']} {pred['precision']}: {pred['latency_ms']} ms predicted, {pred['verdict']}"
                  if pred and pred.get("latency_ms") is not None else "")
            acc_text = f"mIoU {r['miou']:.2f}%" if seg else f"top-1 {r['top1']:.2f}%"
            ctx.console.print(f"  {r['stage']}: {acc_text}  median {lat.median_ms:.3f} ms "
                              f"(spread {lat.spread_ms:.3f} ms over {cfg.rounds} rounds){on}")
        pairs = list(zip(results, results[1:], strict=False))
        if len(results) > 2:
            pairs.append((results[0], results[-1]))
        comparisons = [compare(a, b) for a, b in pairs]
        out: dict[str, Any] = {"host": host_info(threads), "rounds": cfg.rounds, "task": ctx.data.task,
                               "stages": results, "comparisons": comparisons}
        if seg:
            out["class_names"] = list(ctx.data.class_names)
            if frames and results:  # the first and the last measured stage, as the report compares them
                ends = [0, len(results) - 1] if len(results) > 1 else [0]
                drawn = [(results[j]["stage"], labels[j]) for j in ends]
                out["overlays"] = seg_bench.write_overlays(ctx.data, frames, drawn, ctx.stage_dir / "overlays")
        write_json(ctx.stage_dir / "benchmark.json", out)
        self.metrics = {"stages_measured": len(results),
                        "within_spread": [f"{c['from']}→{c['to']}" for c in comparisons if c["within_spread"]]}
        return graph


def _run_threads() -> int:
    from edgevit.threads import current_threads

    return current_threads()


def host_info(threads: int) -> dict[str, Any]:
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
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch_threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
