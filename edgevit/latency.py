"""Host latency and memory of ONNX models, each measured in a fresh process, in interleaved rounds.

Run as ``python -m edgevit.latency MODEL.onnx --batch 1 --batch 32 --runs 50 --warmup 10``; it
prints one JSON object with a measurement per batch size. A separate process gives each model
its own peak-RSS figure; it imports only numpy and onnxruntime (no torch), so the baseline is
small and the same for every model.

``time_interleaved`` times several models in rounds (every model once per round, the order
rotated between rounds), so load on the machine that comes and goes hits every model alike
instead of flipping a comparison, and the round-to-round spread says how far to trust it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process. VmHWM (peak RSS) belongs to the address space and starts
    afresh at exec, unlike ru_maxrss, which Linux carries over from the parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def providers() -> list[str]:
    """ONNX Runtime execution providers to use, fastest first, among those installed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in PREFERRED_PROVIDERS if p in available]


def _time_session(sess: Any, batch: int, runs: int, warmup: int) -> dict[str, Any]:
    import numpy as np

    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)  # synchronous: returns once outputs are on the host
        times.append((time.perf_counter() - t0) * 1000)
    return {"batch": shape[0], "times_ms": times}


def measure(path: str, batches: list[int], runs: int, warmup: int, threads: int | None) -> dict[str, Any]:
    """Timings of one model at each batch size. Peak memory is read after the first batch size
    (batch 1 in the benchmark), so it is what one batch-1 inference process needs."""
    import onnxruntime as ort

    base_rss = _status_mb("VmRSS")
    out: dict[str, Any] = {"runs": runs, "warmup": warmup, "onnxruntime": ort.__version__, "batches": []}
    for i, batch in enumerate(batches):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=providers())
        out["batches"].append(_time_session(sess, batch, runs, warmup))
        out["providers"] = sess.get_providers()
        if i == 0:
            out["peak_rss_mb"] = _status_mb("VmHWM")
            out["model_mem_mb"] = out["peak_rss_mb"] - base_rss
        del sess
    first = out["batches"][0]["times_ms"]  # the first batch size at the top level, for a quick look
    out.update(batch=out["batches"][0]["batch"], median_ms=statistics.median(first),
               p90_ms=Timing(0, [first]).percentile_ms(90), p99_ms=Timing(0, [first]).percentile_ms(99),
               mean_ms=statistics.fmean(first))
    return out


def measure_in_process(path: Path, batches: list[int], runs: int, warmup: int, threads: int | None) -> dict:
    """``measure`` in a fresh ``python -m edgevit.latency`` process; RuntimeError with its last line."""
    cmd = [sys.executable, "-m", "edgevit.latency", str(path), "--runs", str(runs), "--warmup", str(warmup),
           "--threads", str(threads or 0), *(a for b in batches for a in ("--batch", str(b)))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError((res.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(res.stdout)


@dataclass
class Timing:
    """One model's timings at one batch size over every round."""

    batch: int
    rounds: list[list[float]]  # per round, every timed run (ms)

    @property
    def round_medians_ms(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.round_medians_ms)

    @property
    def spread_ms(self) -> float:
        """Largest minus smallest round median: how much this figure moved while it was measured."""
        m = self.round_medians_ms
        return max(m) - min(m)

    def percentile_ms(self, q: float) -> float:
        pooled = sorted(t for r in self.rounds for t in r)
        return pooled[min(len(pooled) - 1, int(round(q / 100 * (len(pooled) - 1))))]

    def summary(self) -> dict[str, Any]:
        return {"batch": self.batch, "median_ms": round(self.median_ms, 4), "p90_ms": round(self.percentile_ms(90), 4),
                "p99_ms": round(self.percentile_ms(99), 4), "spread_ms": round(self.spread_ms, 4),
                "round_medians_ms": [round(x, 4) for x in self.round_medians_ms], "runs_per_round": len(self.rounds[0])}


def time_interleaved(paths: list[Path], batches: list[int], rounds: int, runs: int, warmup: int,
                     threads: int | None) -> list[dict[str, Any]]:
    """Per model: a Timing per batch size over ``rounds`` interleaved rounds, plus memory and providers."""
    timings: list[list[Timing] | None] = [None] * len(paths)
    extra: list[dict[str, Any]] = [{} for _ in paths]
    for r in range(rounds):
        order = list(range(len(paths)))
        order = order[r % len(order):] + order[:r % len(order)] if order else order  # rotate the start
        for i in order:
            got = measure_in_process(paths[i], batches, runs, warmup, threads)
            if timings[i] is None:
                timings[i] = [Timing(b["batch"], []) for b in got["batches"]]
            for t, b in zip(timings[i], got["batches"], strict=True):
                t.rounds.append(b["times_ms"])
            mem = extra[i].setdefault("peak_rss_mb", [])
            mem.append(got["peak_rss_mb"])
            extra[i].setdefault("model_mem_mb", []).append(got["model_mem_mb"])
            extra[i]["providers"] = got["providers"]
    return [{"timings": t, "peak_rss_mb": max(e["peak_rss_mb"]), "model_mem_mb": max(e["model_mem_mb"]),
             "providers": e["providers"]} for t, e in zip(timings, extra, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, action="append", help="batch size; repeat for several (default 1)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.model, a.batch or [1], a.runs, a.warmup, a.threads or None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
