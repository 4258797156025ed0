"""The device predictor: kernels from ONNX (with TensorRT's fusions), the roofline fitted to
published Nano latencies and validated family by family, the interval, and the verdict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx
from edgevit.predict.device import predict_onnx
from edgevit.predict.fit import evaluate, fit_roofline, interval_factors, leave_one_family_out, per_family
from edgevit.predict.kernels import Kernel, KernelGraph, kernel_graph
from edgevit.predict.points import Point, load_measurements, point_kernels
from edgevit.predict.roofline import RooflineFit, latency_ms
from edgevit.profiles import load_profile
from tests.conftest import run_cli

FIT = dict(conv3x3=1.0, conv=0.5, gemm=0.5, dwconv=0.1, matmul=0.5, bandwidth=0.5, kernel_overhead_us=10.0)


def _save(path: Path, nodes: list, inits: list, shape_in: list[int], shape_out: list[int]) -> Path:
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape_out)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _tiny_onnx(path: Path) -> Path:
    """x → Conv(4→8, 3x3) → Relu → y1;  y1 → MatMul(W) → Add(b) → z;  out = z + y1 (y1 read twice)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), "m")
    b = numpy_helper.from_array(rng.standard_normal((6,)).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y1"], name="relu"),
        helper.make_node("MatMul", ["y1", "m"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b"], ["z"], name="bias"),
        helper.make_node("Add", ["z", "y1"], ["out"], name="residual"),
    ]
    return _save(path, nodes, [w, m, b], [1, 4, 6, 6], [1, 8, 6, 6])


def test_pointwise_nodes_fuse_into_their_producer_and_bytes_are_counted_once(tmp_path: Path) -> None:
    kg = kernel_graph(_tiny_onnx(tmp_path / "t.onnx"), elem_bytes=2)
    assert [k.ops for k in kg.kernels] == [["Conv", "Relu"], ["MatMul", "Add", "Add"]]
    conv, mm = kg.kernels
    act = 8 * 6 * 6  # elements of c, y1, mm, z, out
    # a 3x3 stride-1 dense conv is its own class (Winograd); a MatMul with a weight is a GEMM
    assert conv.kind == "conv3x3" and conv.flops == 2 * act * 4 * 9 + act  # MACs x2, then the Relu
    # conv reads x and w, writes y1 (read outside it); c stays inside the fused kernel
    assert conv.bytes == 2 * (4 * 6 * 6 + 8 * 4 * 9 + act)
    # matmul reads y1 (once, though the residual reads it too), m and b, writes out
    assert mm.kind == "gemm" and mm.bytes == 2 * (act + 36 + 6 + act)
    assert kg.weight_bytes == 2 * (8 * 4 * 9 + 36 + 6)
    assert kg.peak_activation_bytes >= 2 * 2 * act  # y1 stays live while z and out are made
    # one graph serves every precision: rescaled bytes equal a graph built at that element size
    assert kernel_graph(tmp_path / "t.onnx", elem_bytes=4).at(2) == kg


def _conv(name: str, x: str, out: str, w: str, stride: int = 1, group: int = 1) -> object:
    return helper.make_node("Conv", [x, w], [out], pads=[1, 1, 1, 1], strides=[stride, stride], group=group, name=name)


def test_conv_classes_and_tensorrt_fusions(tmp_path: Path) -> None:
    """x·sigmoid(x) and the exported GELU chain stay in their conv's kernel, a decomposed
    LayerNorm is one kernel, Concat runs none (its producers still write their outputs)."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    c = lambda v, n: numpy_helper.from_array(np.array(v, dtype=np.float32), n)  # noqa: E731
    nodes = [
        _conv("c1", "x", "a", "w1"),  # 3x3 s1 dense
        helper.make_node("Sigmoid", ["a"], ["sa"]), helper.make_node("Mul", ["a", "sa"], ["silu"]),  # x·σ(x)
        _conv("c2", "silu", "b", "w2", stride=2),  # 3x3 stride 2: conv
        helper.make_node("Div", ["b", "k"], ["g1"]), helper.make_node("Erf", ["g1"], ["g2"]),
        helper.make_node("Add", ["g2", "one"], ["g3"]), helper.make_node("Mul", ["b", "g3"], ["g4"]),
        helper.make_node("Mul", ["g4", "half"], ["gelu"]),  # x·(1+erf(x/√2))/2
        _conv("dw", "gelu", "d", "w3", group=8),  # depth-wise
        helper.make_node("Conv", ["d", "w4"], ["p"], name="pw"),  # 1x1: gemm
        helper.make_node("ReduceMean", ["p"], ["mu"], axes=[1]), helper.make_node("Sub", ["p", "mu"], ["xc"]),
        helper.make_node("Pow", ["xc", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["xc", "sd"], ["ln"]),  # LayerNorm over channels, decomposed
        helper.make_node("Concat", ["ln", "p"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["out"]),
    ]
    inits = [init("w1", 8, 4, 3, 3), init("w2", 8, 8, 3, 3), init("w3", 8, 1, 3, 3), init("w4", 8, 8, 1, 1),
             c(1.4142, "k"), c(1.0, "one"), c(0.5, "half"), c(2.0, "two"), c(1e-5, "eps")]
    kg = kernel_graph(_save(tmp_path / "f.onnx", nodes, inits, [1, 4, 8, 8], [1, 16, 4, 4]), elem_bytes=2)
    assert [k.kind for k in kg.kernels] == ["conv3x3", "conv", "dwconv", "gemm", "memory", "memory"]
    silu, gelu, _, pw, ln, relu = kg.kernels
    assert silu.ops == ["Conv", "Sigmoid", "Mul"] and gelu.ops == ["Conv", "Div", "Erf", "Add", "Mul", "Mul"]
    assert ln.ops == ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div"] and relu.ops == ["Relu"]
    assert "Concat" not in {op for k in kg.kernels for op in k.ops}
    elems = 8 * 4 * 4
    assert pw.bytes == 2 * (elems + 8 * 8 + elems)  # reads d, w4; writes p (read by LN and the concat)
    assert ln.bytes == 2 * (elems + elems + 2)  # reads p once and 2 scalars, writes ln (into the concat)
    assert relu.bytes == 2 * (2 * elems + 2 * elems)  # reads the joined buffer, writes out


def test_attention_matmuls_are_timed_on_whole_gemm_tiles(tmp_path: Path) -> None:
    """A MatMul of two activations runs whole tiles: a 16x16 product per head costs what a
    64x64 one does (so the attention efficiency transfers from EfficientViT's small products to
    a ViT's 197x197 ones); the counted FLOPs stay the real ones."""
    from edgevit.predict.kernels import GEMM_TILE

    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["xt", "x"], ["out"])]
    kg = kernel_graph(_save(tmp_path / "a.onnx", nodes, [], [1, 2, 100, 16], [1, 2, 16, 16]), elem_bytes=2)
    mm = kg.kernels[-1]
    assert mm.kind == "matmul" and mm.flops == 2 * 2 * 16 * 16 * 100
    assert mm.tile_flops == mm.work_flops == 2 * 2 * GEMM_TILE * GEMM_TILE * 100
    fit = RooflineFit(**FIT)
    lat = latency_ms(kg, peak_gflops=1.0, bandwidth_gbps=1e6, fit=fit)
    assert lat.by_kind_ms["matmul"] == pytest.approx(mm.tile_flops / 0.5e9 * 1e3, rel=1e-3)


def test_roofline_is_compute_or_memory_bound_per_kernel(tmp_path: Path) -> None:
    kg = kernel_graph(_tiny_onnx(tmp_path / "t.onnx"), elem_bytes=2)
    fit = RooflineFit(**FIT)
    lat = latency_ms(kg, peak_gflops=1.0, bandwidth_gbps=1000.0, fit=fit)  # slow compute, fast memory
    conv, mm = kg.kernels
    assert lat.memory_ms == 0
    assert lat.compute_ms == pytest.approx((conv.flops / 1.0e9 + mm.flops / 0.5e9) * 1e3)
    assert lat.overhead_ms == pytest.approx(0.02) and lat.kernels == 2
    lat = latency_ms(kg, peak_gflops=1e6, bandwidth_gbps=0.001, fit=fit)  # the other way round
    assert lat.compute_ms == 0 and lat.memory_ms == pytest.approx(sum(k.bytes for k in kg.kernels) / 0.5e6 * 1e3)


# --- fitting, on synthetic "models" whose true roofline is known --------------------------------
def _synthetic(seed: int = 0, noise: float = 0.0) -> tuple[list[Point], list[KernelGraph]]:
    """Four families of kernel graphs, each leaning on other kernel classes; latencies from a
    known roofline (times log-normal noise). No depth-wise or attention work anywhere."""
    rng = np.random.default_rng(seed)
    nano = load_profile("jetson-nano")
    truth = RooflineFit(**{**FIT, "conv3x3": 1.6, "conv": 0.4, "gemm": 0.6, "bandwidth": 0.4,
                           "kernel_overhead_us": 30.0})
    mix = {"dense": ("conv3x3", "conv3x3", "gemm"), "bottleneck": ("gemm", "gemm", "conv"),
           "plain": ("conv", "conv3x3", "memory"), "memoryish": ("memory", "memory", "gemm")}
    points, kernels = [], []
    for fam, kinds in mix.items():
        for size in (1, 2, 4):
            ks = [Kernel(kind, [], [], int(rng.uniform(1, 3) * size * 2e8) if kind != "memory" else 0,
                         int(rng.uniform(1, 3) * size * 4e5)) for _ in range(8) for kind in kinds]
            kg = KernelGraph(kernels=ks)
            ms = latency_ms(kg, nano.peak_gflops["fp16"], nano.memory_bandwidth_gbps, truth).total_ms
            points.append(Point(model=f"{fam}{size}", family=fam, img_size=224, source="synthetic",
                                latency_ms=ms * float(np.exp(rng.normal(0, noise)))))
            kernels.append(kg)
    return points, kernels


def test_the_fit_is_unique_and_recovers_a_known_roofline() -> None:
    """The pulls make the minimum unique: different starts give the same numbers, including the
    depth-wise and attention efficiencies no point tells anything about. Without them (the old
    fit) the undetermined numbers stay wherever their start put them."""
    nano = load_profile("jetson-nano")
    points, kernels = _synthetic()
    a = fit_roofline(nano, points, kernels, starts=(0.3,))
    b = fit_roofline(nano, points, kernels, starts=(0.08,))
    for key in ("conv3x3", "conv", "gemm", "dwconv", "matmul", "bandwidth", "kernel_overhead_us"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-3), key
    assert all(abs(r.error_pct) < 2 for r in evaluate(nano, a, points, kernels))
    assert a.conv3x3 == pytest.approx(1.6, rel=0.05) and a.gemm == pytest.approx(0.6, rel=0.05)
    free_a = fit_roofline(nano, points, kernels, starts=(0.3,), tie_weight=0, centre_weight=0)
    free_b = fit_roofline(nano, points, kernels, starts=(0.08,), tie_weight=0, centre_weight=0)
    assert free_a.dwconv != pytest.approx(free_b.dwconv, rel=0.1)


def test_leave_one_family_out_predicts_each_family_from_the_others_and_gives_the_interval() -> None:
    nano = load_profile("jetson-nano")
    points, kernels = _synthetic(noise=0.05)
    held = leave_one_family_out(nano, points, kernels)
    assert sorted(r.point.model for r in held) == sorted(p.model for p in points)
    # a family's points are predicted by a fit that never saw them: changing its latencies
    # moves the in-sample fit's error on it but not one of its own held-out predictions
    moved = [p.model_copy(update={"latency_ms": p.latency_ms * 2}) if p.family == "dense" else p for p in points]
    held_moved = leave_one_family_out(nano, moved, kernels)
    for r, m in zip(held, held_moved, strict=True):
        if r.point.family == "dense":
            assert m.predicted_ms == pytest.approx(r.predicted_ms, rel=1e-9)
    assert set(per_family(held)) == {"dense", "bottleneck", "plain", "memoryish"}
    low, high = interval_factors(held)
    ratios = [r.point.latency_ms / r.predicted_ms for r in held]
    assert low <= 1 <= high and low >= min(ratios) - 1e-3 and high <= max(ratios) + 1e-3
    assert sum(low <= x <= high for x in ratios) >= 0.8 * len(ratios)


def test_every_prediction_carries_its_interval_and_the_verdict_checks_a_limit(tmp_path: Path) -> None:
    nano = load_profile("jetson-nano")
    assert nano.roofline is not None and nano.roofline.interval_low < 1 < nano.roofline.interval_high
    path = _tiny_onnx(tmp_path / "t.onnx")
    p = predict_onnx(path, nano)
    lo, hi = p["latency_interval_ms"]
    assert lo < p["latency_ms"] < hi and "leave-one-family-out" in p["interval_from"]
    assert predict_onnx(path, nano, latency_limit_ms=hi * 2)["notes"] == []
    crossing = predict_onnx(path, nano, latency_limit_ms=(p["latency_ms"] + hi) / 2)
    assert crossing["verdict"] == "deployable" and "crosses the" in crossing["notes"][0]
    over = predict_onnx(path, nano, latency_limit_ms=p["latency_ms"] / 2)
    assert over["verdict"] == "not deployable" and "over the" in over["reasons"][0]
    fp32 = predict_onnx(path, nano, precision="fp32")
    assert "not validated" in fp32["fit"]


def test_edgevit_predict_cli_on_any_onnx_file_without_torch(tmp_path: Path) -> None:
    import subprocess

    path = _tiny_onnx(tmp_path / "cnn.onnx")
    res = run_cli("predict", str(path), "--profile", "jetson-nano", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["verdict"] == "deployable" and out["latency_ms"] > 0 and len(out["latency_interval_ms"]) == 2
    res = run_cli("predict", str(path), "--precision", "fp32")
    assert res.returncode == 0 and "interval" in res.stdout and "verdict: deployable" in res.stdout
    code = ("import sys; from pathlib import Path; from edgevit.cli.predict import predict; "
            f"predict(Path({str(path)!r}), 'jetson-nano', None, None, True); "
            "assert 'torch' not in sys.modules, 'edgevit predict imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    for args in (["predict", str(tmp_path / "bad.onnx")], ["predict", str(tmp_path / "none.onnx")],
                 ["predict", str(path), "--precision", "fp8"], ["predict", str(path), "--profile", "jetson-nan"]):
        res = run_cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# --- the published Nano points (slow: every architecture is exported) ----------------------------
@pytest.fixture(scope="module")
def nano_points():
    nano = load_profile("jetson-nano")
    meas = load_measurements("jetson-nano")
    return nano, meas.points, [point_kernels(p, nano) for p in meas.points]


def test_the_measurements_span_families_and_name_their_sources() -> None:
    points = load_measurements("jetson-nano").points
    fitted = [p for p in points if not p.heldout]
    assert len(fitted) >= 25 and len({p.family for p in fitted}) >= 5
    assert {p.precision for p in fitted} == {"fp16"} and all(p.source for p in points)


@pytest.mark.slow
def test_the_stored_fit_is_what_the_fit_gives_and_holds_out_of_family(nano_points) -> None:
    """The stored fit predicts every fitted point as a fresh fit does (values, not each
    parameter, are compared: a fresh fit on another CPU may differ in its last digits), the
    held-out points never move it, and leaving one family out keeps the mean error ≤ 25 %."""
    nano, points, kernels = nano_points
    refit = fit_roofline(nano, points, kernels)
    fitted = [(p, k) for p, k in zip(points, kernels, strict=True) if not p.heldout]
    stored = evaluate(nano, nano.roofline, *map(list, zip(*fitted, strict=True)))
    fresh = evaluate(nano, refit, *map(list, zip(*fitted, strict=True)))
    for s, f in zip(stored, fresh, strict=True):
        assert s.predicted_ms == pytest.approx(f.predicted_ms, rel=0.02), (s.point.model, s.point.img_size)
    shifted = [p.model_copy(update={"latency_ms": p.latency_ms * 3}) if p.heldout else p for p in points]
    assert fit_roofline(nano, shifted, kernels).model_dump() == refit.model_dump()
    held = leave_one_family_out(nano, points, kernels)
    assert sum(abs(r.error_pct) for r in held) / len(held) <= 25


@pytest.fixture(scope="module")
def vit_graph() -> ModelGraph:
    from timm.models.vision_transformer import VisionTransformer

    build = {"architecture": "VisionTransformer", "kwargs": dict(img_size=32, patch_size=4, num_classes=10,
                                                                  embed_dim=64, depth=2, num_heads=2)}
    return ModelGraph.from_module(VisionTransformer(**build["kwargs"]).eval(), build)


def test_nano_verdict_names_every_reason_a_stage_would_not_deploy(vit_graph: ModelGraph, tmp_path: Path) -> None:
    nano = load_profile("jetson-nano")
    export_onnx(vit_graph, tmp_path / "o17.onnx", opset=17)
    p = predict_onnx(tmp_path / "o17.onnx", nano)
    assert p["verdict"] == "not deployable" and p["precision"] == "fp16"
    assert any("opset 17 > 13" in r for r in p["reasons"])
    assert any("LayerNormalization has no kernel in TensorRT 8.2" in r for r in p["reasons"])
    export_onnx(vit_graph, tmp_path / "o13.onnx", opset=nano.export_opset())
    ok = predict_onnx(tmp_path / "o13.onnx", nano)
    assert ok["verdict"] == "deployable" and ok["reasons"] == [], ok["reasons"]
    assert 0 < ok["latency_ms"] < 100 and ok["memory_mb"] > nano.runtime_memory_mb
    assert set(ok["memory_breakdown_mb"]) == {"weights", "activations", "workspace", "runtime"}
    int8 = predict_onnx(tmp_path / "o13.onnx", nano, precision="int8")
    assert int8["verdict"] == "not deployable" and "no int8 kernels" in int8["reasons"][0]
    assert "INT8" in int8["reasons"][0] and "use fp16" in int8["reasons"][0]
    small = nano.model_copy(update={"usable_memory_mb": 500})
    assert any("more than the 500 MB" in r for r in predict_onnx(tmp_path / "o13.onnx", small)["reasons"])


def test_smaller_models_are_predicted_faster(vit_graph: ModelGraph, tmp_path: Path) -> None:
    nano = load_profile("jetson-nano")
    export_onnx(vit_graph, tmp_path / "big.onnx", opset=13)
    small = vit_graph.clone()
    small.keep_mlp_units(0, range(32))
    small.keep_mlp_units(1, range(32))
    export_onnx(small, tmp_path / "small.onnx", opset=13)
    assert predict_onnx(tmp_path / "small.onnx", nano)["latency_ms"] < predict_onnx(tmp_path / "big.onnx",
                                                                                      nano)["latency_ms"]


def test_a_profile_without_a_fit_says_so(vit_graph: ModelGraph, tmp_path: Path) -> None:
    export_onnx(vit_graph, tmp_path / "m.onnx", opset=17)
    p = predict_onnx(tmp_path / "m.onnx", load_profile("xavier-nx"))
    assert p["latency_ms"] is None and p["latency_interval_ms"] is None and "no fitted roofline" in p["fit"]


def _prune_recipe(keep: float, profile: str | None = "jetson-nano") -> dict:
    from tests.conftest import tiny_recipe_data

    data = tiny_recipe_data(model={"source": "timm", "architecture": "VisionTransformer",
                                   "kwargs": dict(img_size=64, patch_size=4, num_classes=10, embed_dim=128, depth=2,
                                                  num_heads=4, mlp_ratio=4.0)})
    if profile:
        data["profile"] = profile
    data["passes"] = [{"prune": {"method": "magnitude", "target": {"metric": "latency", "keep": keep}}}]
    return data


def test_prune_to_a_predicted_nano_latency(tmp_path: Path) -> None:
    import json

    from tests.conftest import run_pipeline

    run_pipeline(_prune_recipe(0.9), tmp_path / "run")
    m = json.loads((tmp_path / "run" / "01-prune" / "metrics.json").read_text())["metrics"]
    aim = m["aim"]
    assert aim["target_metric"] == "latency" and aim["profile"] == "jetson-nano"
    assert aim["predicted_ms_after"] <= 0.9 * aim["predicted_ms_before"] and 0 < aim["uniform_ratio"] < 1
    lo, hi = aim["predicted_interval_ms_after"]  # the plan aims at the estimate and states its interval
    assert lo < aim["predicted_ms_after"] < hi
    assert m["flops_kept"] < 1


def test_latency_target_needs_a_profile_and_says_when_it_is_out_of_reach(tmp_path: Path) -> None:
    from edgevit.errors import EdgeVitError
    from tests.conftest import run_pipeline

    with pytest.raises(EdgeVitError, match="metric latency needs a recipe profile"):
        run_pipeline(_prune_recipe(0.9, profile=None), tmp_path / "a")
    with pytest.raises(EdgeVitError, match="out of reach on jetson-nano"):
        run_pipeline(_prune_recipe(0.1), tmp_path / "b")
