"""Swin (v1, v2), BEiT, EVA-02 and MobileViT v1 through the deploy passes: export at opset 13
for the Jetson Nano (parity-gated), FP16 and calibrated INT8 (accuracy budget) run in ONNX
Runtime close to the float model, the TensorRT operator tables accept each graph, and the
Nano bundle ships the quantized model. One test per family, the real passes on digits."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from rich.console import Console

from edgevit.context import RunContext, StageRecord
from edgevit.deploy.tensorrt_ops import MAX_OPSET, ops_for, standard_op_types, unsupported
from edgevit.graph import ModelGraph
from edgevit.profiles import load_profile
from edgevit.quantize.sensitivity import logits
from tests.test_families import FAMILIES

BUDGET = 5.0  # INT8 top-1 points the quantize pass may lose against the float model
# The budget's sensitivity search quantizes the model once per node: on the staged models (27 nodes for
# the Swins, 90 for MobileViT) that alone takes 5-25 s here, so they are quantized in one go.
SEARCHED = ("beit", "eva02", "eva_swiglu")
# INT8 logit error, RMS over the logits' std, by the Q/DQ arithmetic: measured 0.7-2.6 % on the
# transformers, 12 % on MobileViT (its 35 convs with random weights and batch norms quantized too).
INT8_REL = {"mobilevit": 0.2}


@pytest.fixture(scope="module")
def digits() -> dict[tuple[int, int], object]:
    """Digits prepared per input size (the families read 32 or 64 pixels): loaded once."""
    return {}


def _data(cache: dict, spec: object) -> object:
    from edgevit.data import build_data
    from edgevit.data.config import DigitsData

    key = tuple(spec.img_size)  # type: ignore[attr-defined]
    if key not in cache:
        cache[key] = build_data(DigitsData(source="digits", batch_size=16), spec, 0)
    return cache[key]


def _ctx(tmp: Path, data: object, stage: str, profile: str, stages: list[StageRecord] | None = None) -> RunContext:
    stage_dir = tmp / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    recipe = SimpleNamespace(calibration=SimpleNamespace(manifest=None, num_samples=8, split="train"))
    return RunContext(recipe=recipe, run_dir=tmp, data=data, device=torch.device("cpu"),  # type: ignore[arg-type]
                      console=Console(file=io.StringIO(), width=200), registry=None, seed=0, stage_dir=stage_dir,
                      stages=stages or [], profile=load_profile(profile))


def _graph(family: str) -> ModelGraph:
    module, build = FAMILIES[family]()
    g = ModelGraph.from_module(module.eval(), build)
    g.reset_classifier(10)  # digits' classes
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised biases and tables too)
        for p in g.module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return g


def _qdq_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits by the ONNX Q/DQ semantics (ONNX Runtime without graph optimisation), what TensorRT
    computes: ONNX Runtime's fused x86 kernels saturate on CPUs without VNNI (tests/test_quantize.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[None]})[0] for x in images])


def _trt_ok(path: Path, tensorrt: str) -> None:
    model = onnx.load(str(path))
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = standard_op_types(model)
    assert unsupported(ops, tensorrt) == [] and opset <= MAX_OPSET[ops_for(tensorrt)[0]], (path.name, opset)
    assert "LayerNormalization" not in ops


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_quantize_and_bundle_for_the_jetson(family: str, digits, tmp_path: Path) -> None:
    from edgevit.deploy.bundle import verify_bundle
    from edgevit.deploy.jetson import edgevit_jetson_bench as jb
    from edgevit.passes.bundle import BundleConfig, BundlePass
    from edgevit.passes.export import ExportConfig, ExportPass
    from edgevit.passes.quantize import QuantizeConfig, QuantizePass

    g = _graph(family)
    data = _data(digits, g.spec)
    nano = load_profile("jetson-nano")

    export = ExportPass(ExportConfig(parity_samples=8))  # raises past its parity gate
    exported = export.run(g, _ctx(tmp_path, data, "01-export", "jetson-nano"))
    src = exported.artifacts["onnx"]
    assert export.metrics["opset"] == 13 and export.metrics["dynamic_batch"] is False
    _trt_ok(src, nano.tensorrt)

    eval_x = data.sample(32, 1, "val")[0].numpy()
    ref = logits(src, eval_x)
    scale = float(np.abs(ref).max())

    fp16 = QuantizePass(QuantizeConfig(precision="int8", eval_samples=16))  # the Nano has no INT8: FP16
    half = fp16.run(exported.clone(), _ctx(tmp_path, data, "02-quantize", "jetson-nano"))
    out16 = half.artifacts["onnx"]
    assert fp16.metrics["precision"] == "fp16" and out16.name == "model.fp16.onnx"
    got16 = logits(out16, eval_x)
    assert np.abs(got16 - ref).max() < 2e-2 * scale and (got16.argmax(1) == ref.argmax(1)).mean() >= 0.9
    _trt_ok(out16, nano.tensorrt)

    budget = BUDGET if family in SEARCHED else None  # INT8 on a TensorRT board with INT8 kernels
    int8 = QuantizePass(QuantizeConfig(precision="int8", eval_samples=16, accuracy_budget=budget))
    q = int8.run(exported.clone(), _ctx(tmp_path, data, "02-quantize-int8", "orin-nano"))
    m = int8.metrics
    assert m["layout"] == "tensorrt" and m["quantized_nodes"] > 0 and m["calibration_images"] == 8
    if budget is not None:  # the pass's gate, after ranking every node
        assert m["quantized_top1"] >= m["float_top1"] - budget and len(m["sensitivity"]) >= m["quantized_nodes"]
    got8 = _qdq_logits(q.artifacts["onnx"], eval_x)
    rel = float(np.sqrt(np.mean((got8 - ref) ** 2)) / ref.std())
    assert rel < INT8_REL.get(family, 0.05) and (got8.argmax(1) == ref.argmax(1)).mean() >= 0.8, rel
    _trt_ok(q.artifacts["onnx"], nano.tensorrt)  # Q/DQ at opset 13: even TensorRT 8.2 parses it

    stages = [StageRecord(2, "quantize", tmp_path / "02-quantize", 0.0)]
    bundle = BundlePass(BundleConfig(validation_samples=8))
    bundle.run(half, _ctx(tmp_path, data, "03-bundle", "jetson-nano", stages))
    b = tmp_path / "03-bundle" / "bundle"
    meta = jb.load_bundle(str(b))  # what the board's script accepts
    assert meta["stage"] == "02-quantize" and meta["model"] == "model.onnx" and meta["profile"] == "jetson-nano"
    assert meta["onnx_precision"] == meta["engine_precision"] == "fp16"
    assert meta["input"]["shape"] == [1, 3, *g.spec.img_size] and meta["predicted"]["latency_ms"] > 0
    assert (b / "model.onnx").read_bytes() == out16.read_bytes() and verify_bundle(b) == []
    for name in ("val.npz", "labels.txt", "edgevit_jetson_bench.py", "README.txt", "SHA256SUMS"):
        assert (b / name).is_file(), name
    assert np.load(b / "val.npz")["x"].shape == (8, 3, *g.spec.img_size)
