"""The benchmark pass's latency: interleaved rounds, their spread, and comparisons that hold
(or are flagged) while other work loads the cores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevit import latency
from edgevit.passes.benchmark import compare


def matmul_chain(path: Path, layers: int, tokens: int = 64, width: int = 256) -> Path:
    """An ONNX model of ``layers`` chained MatMuls: its cost grows with ``layers``, nothing else."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, tokens, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, tokens, width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_rounds_interleave_models_and_rotate_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake(path, batches, runs, warmup, threads):  # noqa: ANN001
        calls.append(Path(path).name)
        return {"batches": [{"batch": b, "times_ms": [1.0] * runs} for b in batches], "peak_rss_mb": 1.0,
                "model_mem_mb": 0.5, "providers": ["CPUExecutionProvider"]}

    monkeypatch.setattr(latency, "measure_in_process", fake)
    out = latency.time_interleaved([Path("a"), Path("b"), Path("c")], [1, 4], rounds=3, runs=2, warmup=0, threads=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # never all of one model's runs in a row
    assert [len(t.rounds) for t in out[0]["timings"]] == [3, 3] and out[0]["timings"][1].batch == 4


def test_compare_flags_a_difference_within_the_spread() -> None:
    def stage(name: str, rounds: list[float]) -> dict:
        t = latency.Timing(1, [[x] for x in rounds])
        return {"stage": name, "host_latency": t.summary()}

    clear = compare(stage("a", [2.0, 2.1, 2.05]), stage("b", [1.0, 1.05, 1.02]))
    assert not clear["within_spread"] and clear["speedup"] == pytest.approx(2.05 / 1.02, abs=1e-3)
    assert clear["speedup_range"][0] > 1.9
    noisy = compare(stage("a", [1.0, 1.6, 1.1]), stage("b", [1.05, 1.0, 1.5]))
    assert noisy["within_spread"] and noisy["speedup_range"][0] < 1 < noisy["speedup_range"][1]


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_comparison_holds_or_is_flagged_under_load(tmp_path: Path) -> None:
    small, big = matmul_chain(tmp_path / "small.onnx", 2), matmul_chain(tmp_path / "big.onnx", 8)
    loaders = [_busy(), _busy()]  # keep both cores busy for the whole measurement
    try:
        out = latency.time_interleaved([big, small], [1], rounds=3, runs=15, warmup=3, threads=1)
    finally:
        for p in loaders:
            p.kill()
            p.wait()
    rows = [{"stage": name, "host_latency": o["timings"][0].summary()} for name, o in zip(("big", "small"), out,
                                                                                           strict=True)]
    c = compare(rows[0], rows[1])
    # 4x the MatMuls: the small model must come out faster, unless the report says the figures are noise
    assert c["speedup"] > 1 or c["within_spread"], c
    assert all(r["host_latency"]["spread_ms"] >= 0 for r in rows)
