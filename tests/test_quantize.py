"""The quantize pass and calibration manifests (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from edgevit.calib.manifest import build_manifest, verify
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx
from edgevit.quantize.cpu_features import int8_weights_need_reduced_range
from edgevit.quantize.fp16 import convert_fp16
from edgevit.quantize.int8 import (
    activation_matmuls,
    activation_scales,
    preprocess,
    quantizable_nodes,
    quantize_int8,
    quantized_nodes,
    zero_points,
)
from edgevit.quantize.sensitivity import logits
from tests.conftest import run_cli, run_pipeline, tiny_recipe_data

ALL = ["MatMul", "Gemm", "Conv"]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgevit.models.simple_vit import SimpleViT

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    g = ModelGraph.from_module(SimpleViT(**kw).eval(), {"kwargs": kw})
    d = tmp_path_factory.mktemp("q")
    export_onnx(g, d / "model.onnx", opset=13)
    preprocess(d / "model.onnx", d / "pre.onnx")
    return d / "pre.onnx"


def _images(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_qdq_nodes_sit_exactly_where_configured(onnx_model: Path, tmp_path: Path) -> None:
    matmuls = quantizable_nodes(onnx_model, ["MatMul"])
    skip = [n for n in matmuls if "fc1" in n][:1]
    assert skip
    out = tmp_path / "q.onnx"
    quantize_int8(onnx_model, out, _images(), calibration_method="minmax", op_types=["MatMul"], nodes_to_exclude=skip)
    assert set(quantized_nodes(out, ALL)) == set(matmuls) - set(skip)  # no Conv, not the excluded one
    quantize_int8(onnx_model, out, _images(), calibration_method="minmax", op_types=ALL)
    assert set(quantized_nodes(out, ALL)) == set(quantizable_nodes(onnx_model, ALL))
    model = onnx.load(str(out))
    inits = {i.name for i in model.graph.initializer}
    weight_dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    takes_int8_weights = {n.op_type for n in model.graph.node if any(i in weight_dq for i in n.input)}
    assert takes_int8_weights <= set(ALL)  # LayerNorm, Softmax, GELU, Add keep float parameters


def test_calibration_methods_give_different_scales_on_skewed_input(onnx_model: Path, tmp_path: Path) -> None:
    x = _images(64)
    x.reshape(-1)[:: 997] *= 40.0  # rare, large outliers
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        out = tmp_path / f"{method}.onnx"
        # the patch-embedding Conv alone: its input gets the same scale as with every op type
        # quantized (each tensor's histogram is its own), without entropy's threshold search
        # over the ~35 other tensors (34 s of the suite)
        quantize_int8(onnx_model, out, x, calibration_method=method, percentile=99.9, layout="tensorrt",
                      op_types=["Conv"])
        scales[method] = activation_scales(out)
    tensor = next(iter(scales["minmax"]))  # the input of the first quantized op (the image)
    assert tensor == "input"
    s = {m: v[tensor] for m, v in scales.items()}
    assert s["minmax"] > 2 * s["percentile"]  # the outliers set the min/max range, not the percentile one
    assert s["entropy"] != pytest.approx(s["minmax"]) and s["entropy"] != pytest.approx(s["percentile"])


def _reference_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits by the ONNX QDQ semantics (no graph optimisation: each DequantizeLinear→MatMul
    runs in float), i.e. what a back end with 32-bit integer accumulation computes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: images})[0]


def _assert_int8_parity(ref: np.ndarray, q: np.ndarray) -> None:
    """INT8 with per-channel weights costs this random tiny ViT ~2 % RMS of its logit scale
    (measured 1.6-2.1 % over 3 image seeds, each layout); kernels that saturate (u8×s8 with
    8-bit weights on an AVX2 CPU) cost 13-33 %, so 6 % separates them on any CPU. Top-1:
    the model's median top-two margin is 0.28 logit std, so ~2-5 % of images flip at 2 %
    error (measured 95.3-98.8 % agreement on 256); >= 90 % leaves twice that many flips."""
    rel = float(np.sqrt(np.mean((q - ref) ** 2)) / ref.std())
    assert rel < 0.06, f"INT8 logits off by {rel:.1%} RMS of the logit scale"
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_layouts(onnx_model: Path, tmp_path: Path) -> None:
    trt, cpu = tmp_path / "trt.onnx", tmp_path / "cpu.onnx"
    quantize_int8(onnx_model, trt, _images(), layout="tensorrt")
    quantize_int8(onnx_model, cpu, _images(), layout="ort_cpu")
    zps = zero_points(trt)
    assert zps and all(z.dtype == np.int8 and not np.any(z) for z in zps)  # what TensorRT accepts
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in onnx.load(str(trt)).graph.initializer
               if i.name.endswith("bias"))  # biases stay float for TensorRT
    assert any(z.dtype == np.uint8 for z in zero_points(cpu))
    x = _images(256, 1)
    ref = logits(onnx_model, x)
    _assert_int8_parity(ref, _reference_logits(trt, x))  # TensorRT's arithmetic, not ORT's x86 kernels
    _assert_int8_parity(ref, logits(cpu, x))  # ONNX Runtime's kernels on this CPU


def _max_int8_weight(path: Path) -> int:
    from onnx import numpy_helper

    return max(int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max())
               for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims)


def test_reduced_range_weights_are_7_bit_and_chosen_by_the_cpu(onnx_model: Path, tmp_path: Path) -> None:
    full, reduced = tmp_path / "full.onnx", tmp_path / "reduced.onnx"
    quantize_int8(onnx_model, full, _images(), layout="ort_cpu", reduce_range=False)
    quantize_int8(onnx_model, reduced, _images(), layout="ort_cpu", reduce_range=True)
    assert _max_int8_weight(full) == 127 and _max_int8_weight(reduced) <= 64
    assert int8_weights_need_reduced_range("x86_64", frozenset({"avx2", "fma"}))  # AMD Zen 3, Intel Haswell
    assert not int8_weights_need_reduced_range("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not int8_weights_need_reduced_range("x86_64", frozenset({"avx2", "avx_vnni"}))  # Alder Lake
    assert not int8_weights_need_reduced_range("aarch64", frozenset())


def _ort_optimized_ops(path: Path, tmp_path: Path) -> set[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


def test_matmul_outputs_stay_float_and_ort_fuses_matmul_integer_to_float(onnx_model: Path, tmp_path: Path) -> None:
    """Only MatMul inputs are quantized, in both layouts, so ONNX Runtime runs each
    DQ→MatMul as one MatMulIntegerToFloat, never QLinearMatMul + DequantizeLinear."""
    cpu, trt = tmp_path / "cpu.onnx", tmp_path / "trt.onnx"
    linear = dict(op_types=["MatMul"], nodes_to_exclude=activation_matmuls(onnx_model))  # as the pass does
    quantize_int8(onnx_model, cpu, _images(), layout="ort_cpu", **linear)
    quantize_int8(onnx_model, trt, _images(), layout="tensorrt", **linear)
    for path in (cpu, trt):
        nodes = onnx.load(str(path)).graph.node
        matmul_outputs = {o for n in nodes if n.op_type == "MatMul" for o in n.output}
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] in matmul_outputs for n in nodes)
    cpu_ops = _ort_optimized_ops(cpu, tmp_path)
    assert "MatMulIntegerToFloat" in cpu_ops and "QLinearMatMul" not in cpu_ops


def test_fp16_parity_and_float32_islands(onnx_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    convert_fp16(onnx_model, out)
    x = _images(32, 2)
    ref, half = logits(onnx_model, x), logits(out, x)
    assert half.dtype == np.float32  # float32 in and out
    assert np.abs(ref - half).max() < 2e-2 * np.abs(ref).max() and (ref.argmax(1) == half.argmax(1)).mean() >= 0.95
    model = onnx.load(str(out))
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    casts_to_f32 = {o for n in model.graph.node if n.op_type == "Cast"
                    and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute) for o in n.output}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and all(n.input[0] in casts_to_f32 for n in softmax)  # kept in FP32



def _quant_recipe(**quantize) -> dict:
    return tiny_recipe_data(passes=[
        {"adapt": {"epochs": 3, "lr": 0.003, "warmup_epochs": 0}},
        {"export": {"opset": 13, "parity_samples": 16}},
        {"quantize": {"eval_samples": 96, **quantize}},
        {"benchmark": {"runs": 3, "warmup": 1, "throughput_batch": 4}},
    ])


def test_int8_pass_feeds_the_benchmark(tmp_path: Path) -> None:
    report, _ = run_pipeline(_quant_recipe(), tmp_path / "run")
    rows = {r["stage"]: r for r in report["stages"]}
    q = rows["03-quantize"]
    assert q["artifact"].endswith("model.int8.onnx") and q["size_bytes"] < rows["02-export"]["size_bytes"]
    assert abs(q["top1"] - rows["02-export"]["top1"]) <= 5.0
    m = q["metrics"]
    assert m["precision"] == "int8" and m["layout"] == "ort_cpu" and m["quantized_nodes"] == 14  # attention float
    assert len(m["kept_float"]) == 4


def test_accuracy_budget_ranks_every_layer_and_meets_the_budget(tmp_path: Path) -> None:
    run_pipeline(_quant_recipe(accuracy_budget=0.0, calibration_method="minmax", quantize_attention=True),
                 tmp_path / "run")
    m = json.loads((tmp_path / "run" / "03-quantize" / "metrics.json").read_text())["metrics"]
    assert len(m["sensitivity"]) == 18 and all(v >= 0 for v in m["sensitivity"].values())
    ranked = list(m["sensitivity"])
    assert m["kept_float"] == ranked[: len(m["kept_float"])]  # the worst first
    assert m["quantized_top1"] >= m["float_top1"] or len(m["kept_float"]) == 18
    # include_nodes limits what the budget's search may quantize, and what is quantized in the end
    only = ranked[-2:]  # the two least sensitive: within any budget
    run_pipeline(_quant_recipe(accuracy_budget=100.0, calibration_method="minmax", quantize_attention=True,
                               include_nodes=only), tmp_path / "run")
    m = json.loads((tmp_path / "run" / "03-quantize" / "metrics.json").read_text())["metrics"]
    assert sorted(m["sensitivity"]) == sorted(only) and m["quantized_nodes"] == 2


def test_nano_profile_turns_int8_into_fp16_with_a_warning(tmp_path: Path) -> None:
    data = _quant_recipe()
    data["profile"] = "jetson-nano"
    data["passes"] = data["passes"][:3]
    _, log = run_pipeline(data, tmp_path / "run")
    assert "warning: jetson-nano has no INT8 support" in log
    m = json.loads((tmp_path / "run" / "03-quantize" / "metrics.json").read_text())["metrics"]
    assert m["precision"] == "fp16" and m["requested"] == "int8" and m["parity"]["top1_agreement"] >= 0.95
    graph = json.loads((tmp_path / "run" / "03-quantize" / "graph.json").read_text())
    assert graph["artifacts"]["onnx"] == "model.fp16.onnx"
    data["passes"][2]["quantize"]["strict"] = True
    with pytest.raises(EdgeVitError, match="jetson-nano does not support int8"):
        run_pipeline(data, tmp_path / "strict")


def _folder(root: Path) -> Path:
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(5):
            arr = np.full((8, 8, 3), 40 * c + i, dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def test_manifest_is_deterministic_and_detects_a_changed_image(tmp_path: Path) -> None:
    from edgevit.data import build_data
    from edgevit.data.config import ImageFolderData

    root = _folder(tmp_path / "imgs")
    spec = ModelGraph.from_module(*_builtin_pair()).spec
    data = build_data(ImageFolderData(source="imagefolder", train=root, val=root), spec, 0)
    a = build_manifest(data, 6, 0, "train", tmp_path / "a.json")
    b = build_manifest(data, 6, 0, "train", tmp_path / "b.json")
    assert a == b and (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert sorted(i.label for i in a.images) == [0, 0, 1, 1, 2, 2]  # class-stratified
    assert build_manifest(data, 6, 1, "train", tmp_path / "c.json").images != a.images  # seed matters
    verify(tmp_path / "a.json")
    changed = root / a.images[0].path
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(changed)
    with pytest.raises(EdgeVitError, match="changed since"):
        verify(tmp_path / "a.json")


def _builtin_pair():  # noqa: ANN202
    from tests.conftest import _builtin

    return _builtin()


def test_calib_cli_builds_from_a_recipe_and_the_pipeline_uses_it(tmp_path: Path, write_recipe) -> None:
    recipe = write_recipe(tiny_recipe_data())
    manifest = tmp_path / "calib" / "digits-16.json"
    res = run_cli("calib", "build", str(recipe), "--out", str(manifest), "--num", "16")
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "calib" / "digits-16-images").rglob("*.png"))) == 16
    assert run_cli("calib", "check", str(manifest)).returncode == 0
    data = _quant_recipe()
    data["calibration"] = {"manifest": str(manifest)}
    data["passes"] = data["passes"][:3]
    run_pipeline(data, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "03-quantize" / "metrics.json").read_text())["metrics"]
    assert m["calibration_images"] == 16
    next((tmp_path / "calib" / "digits-16-images").rglob("*.png")).write_bytes(b"not a png any more")
    res = run_cli("calib", "check", str(manifest))
    assert res.returncode == 2 and "changed since" in res.stderr and "Traceback" not in res.stderr


def test_unknown_profile_is_a_one_line_error(tmp_path: Path, write_recipe) -> None:
    data = tiny_recipe_data()
    data["profile"] = "jetson-nanoo"
    res = run_cli("compress", str(write_recipe(data)), "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "unknown device profile 'jetson-nanoo'" in res.stderr
    assert "did you mean 'jetson-nano'" in res.stderr and not (tmp_path / "run").exists()


def test_tensorrt_calibration_without_tensorrt_is_one_clear_error(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the gpu-marked test covers it")
    from edgevit.deploy.tensorrt_calib import write_calibration_cache

    with pytest.raises(EdgeVitError, match="tensorrt is not installed"):
        write_calibration_cache(tmp_path / "m.onnx", _images(8), tmp_path / "cache")


@pytest.mark.gpu
def test_tensorrt_entropy_calibrator_writes_a_cache(onnx_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="needs NVIDIA TensorRT")
    pytest.importorskip("pycuda", reason="needs pycuda")
    from edgevit.deploy.tensorrt_calib import write_calibration_cache

    cache = write_calibration_cache(onnx_model, _images(32), tmp_path / "calib.cache", batch_size=8)
    assert cache.stat().st_size > 0 and b"TRT" in cache.read_bytes()[:64]


def test_attention_matmuls_can_stay_float_and_dynamic_layout(onnx_model: Path, tmp_path: Path) -> None:
    from edgevit.quantize.int8 import quantize_dynamic_int8

    attn = activation_matmuls(onnx_model)
    assert len(attn) == 4  # q·kᵀ and attn·v in each of the 2 blocks
    out = tmp_path / "lin.onnx"
    quantize_int8(onnx_model, out, _images(), nodes_to_exclude=attn)
    assert set(quantized_nodes(out, ALL)) == set(quantizable_nodes(onnx_model, ALL)) - set(attn)
    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic_int8(onnx_model, dyn)
    kinds = {n.op_type for n in onnx.load(str(dyn)).graph.node}
    assert "DynamicQuantizeLinear" in kinds or "MatMulInteger" in kinds
    x = _images(256, 1)
    _assert_int8_parity(logits(onnx_model, x), logits(dyn, x))


def test_dynamic_layout_through_the_pass(tmp_path: Path) -> None:
    data = _quant_recipe(layout="ort_cpu_dynamic", quantize_attention=False)
    data["passes"] = data["passes"][:3]
    run_pipeline(data, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "03-quantize" / "metrics.json").read_text())["metrics"]
    assert m["layout"] == "ort_cpu_dynamic" and m["calibration_method"] is None and len(m["kept_float"]) == 4
    assert m["reduce_range"] == int8_weights_need_reduced_range()
    assert m["parity"]["top1_agreement"] >= 0.9  # 1.0 measured; 0.90 with saturating 8-bit weights on AVX2
