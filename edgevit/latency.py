"""Host latency and memory of one ONNX model, measured in a fresh process.

Run as ``python -m edgevit.latency MODEL.onnx --batch 1 --runs 50 --warmup 10``; prints one
JSON object. A separate process gives each model its own peak-RSS figure; it imports only
numpy and onnxruntime (no torch), so the baseline is small and the same for every model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


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


def measure(path: str, batch: int, runs: int, warmup: int, threads: int | None) -> dict:
    import numpy as np
    import onnxruntime as ort

    base_rss = _status_mb("VmRSS")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=providers())
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feed = {inp.name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)  # synchronous: returns once outputs are on the host
        times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    peak_mb = _status_mb("VmHWM")
    return {
        "batch": shape[0],
        "runs": runs,
        "warmup": warmup,
        "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "peak_rss_mb": peak_mb,
        "model_mem_mb": peak_mb - base_rss,
        "providers": sess.get_providers(),
        "onnxruntime": ort.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.model, a.batch, a.runs, a.warmup, a.threads or None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
