"""ONNX export of every model family: valid ONNX, parity with torch, opsets down to 13."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgevit.graph import ModelGraph
from edgevit.onnx_cost import onnx_summary
from edgevit.onnx_io import export_onnx, op_counts, run_batches, session


@pytest.mark.parametrize("opset", [13, 17])
def test_export_parity(tiny_graph: ModelGraph, tmp_path, opset: int) -> None:
    g = tiny_graph
    g.keep_heads(0, [0, 2, 3])  # a pruned block must export too
    g.keep_mlp_units(1, range(24))
    path = tmp_path / "m.onnx"
    export_onnx(g, path, opset=opset)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == opset
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = g.module.eval()(x).numpy()
    got = run_batches(session(path), x.numpy())
    assert np.abs(ref - got).max() < 1e-4
    ops = op_counts(path)
    if opset < 17:
        assert "LayerNormalization" not in ops  # not in the opset: decomposed
    assert "Softmax" in ops  # attention is explicit, not a fused SDPA node


def _attention_switches(module: torch.nn.Module) -> list[tuple[str, object]]:
    """What an adapter's export_mode flips: timm's fused_attn flags, HF's attention implementation."""
    out: list[tuple[str, object]] = [("fused_attn", m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    out += [("attn_implementation", m.config._attn_implementation) for m in module.modules()
            if hasattr(getattr(m, "config", None), "_attn_implementation")]
    return out


def test_export_keeps_module_state(tiny_graph: ModelGraph, tmp_path) -> None:
    module = tiny_graph.module
    module.train()
    for name, _ in _attention_switches(module):  # the fast-attention state a user's model may be in
        for m in module.modules():
            if name == "fused_attn" and hasattr(m, "fused_attn"):
                m.fused_attn = True
            if name == "attn_implementation" and hasattr(getattr(m, "config", None), "_attn_implementation"):
                m.config._attn_implementation = "sdpa"
    before = _attention_switches(module)
    with tiny_graph.export_mode():
        during = _attention_switches(module)
        assert not any(m.training for m in module.modules())
    if tiny_graph.spec.family != "builtin":  # SimpleViT always writes its attention out
        assert before and during != before  # the switch is really flipped for export...
    export_onnx(tiny_graph, tmp_path / "m.onnx", opset=13)
    assert all(m.training for m in module.modules()) and _attention_switches(module) == before  # ...and back


def test_static_batch_export_runs_any_batch(tiny_graph: ModelGraph, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(tiny_graph, path, opset=17, dynamic_batch=False)
    sess = session(path)
    assert sess.get_inputs()[0].shape[0] == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_graph.module(x).numpy()
    assert np.abs(run_batches(sess, x.numpy()) - ref).max() < 1e-4


def test_onnx_cost_agrees_with_graph_cost(tiny_graph: ModelGraph, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(tiny_graph, path, opset=17)
    s = onnx_summary(path)
    assert s["macs"] == tiny_graph.cost().macs
    assert s["params"] >= tiny_graph.num_params() - 64  # the exporter may fold a few constants


def _simplified_export(graph: ModelGraph, path) -> None:  # noqa: ANN001
    from edgevit.onnx_io import simplify_onnx

    export_onnx(graph, path, opset=17)
    simplify_onnx(path)  # what the export pass hands on


def test_cpu_form_fuses_every_attention_with_parity(tiny_graph: ModelGraph, tmp_path) -> None:
    from edgevit.ort_fusion import fuse_for_cpu

    plain, cpu = tmp_path / "m.onnx", tmp_path / "m.cpu.onnx"
    _simplified_export(tiny_graph, plain)
    x = torch.randn(6, 3, 32, 32)
    # unread_tokens off: the last block's class-token-only attention is no Attention (test_unread_tokens.py)
    result = fuse_for_cpu(plain, cpu, x.numpy()[:2], attention=True, approximate_gelu=False, unread_tokens=False)
    depth = len(tiny_graph.spec.blocks)  # packed qkv (timm) and separate q, k, v (HF, SimpleViT) alike
    assert result.attention_fused == result.attention_regions == depth and not result.unfused_regions
    ops = op_counts(cpu)
    assert ops.get("Attention") == depth and "Softmax" not in ops
    with torch.no_grad():
        ref = tiny_graph.module(x).numpy()
    assert np.abs(run_batches(session(cpu), x.numpy()) - ref).max() < 1e-4


def test_attention_fusion_leaves_a_region_it_got_wrong_unfused(tmp_path, monkeypatch) -> None:
    """A rewrite on pattern alone would ship a wrong head count; the region check must not."""
    from edgevit import ort_fusion
    from tests.conftest import MODEL_FACTORIES

    graph = ModelGraph.from_module(*MODEL_FACTORIES["timm"]())
    graph.module.eval()
    _simplified_export(graph, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    real = ort_fusion._find_regions

    def wrong_heads(m, shapes):  # noqa: ANN001, ANN202
        regions = real(m, shapes)
        regions[0].heads = 1  # same weights, another function
        return regions

    monkeypatch.setattr(ort_fusion, "_find_regions", wrong_heads)
    x = torch.randn(4, 3, 32, 32)
    fused, result = ort_fusion.fuse_attention(model, x.numpy())
    assert len(result.unfused_regions) == 1 and result.attention_fused == 1
    out = tmp_path / "f.onnx"
    onnx.save(fused, str(out))
    with torch.no_grad():
        ref = graph.module(x).numpy()
    assert np.abs(run_batches(session(out), x.numpy()) - ref).max() < 1e-4


def _export_recipe(profile: str, layout: str = "ort_cpu_dynamic", export: dict | None = None) -> dict:
    from tests.conftest import tiny_recipe_data

    return tiny_recipe_data(profile=profile, passes=[
        {"adapt": {"epochs": 1, "lr": 0.003, "warmup_epochs": 0}},
        {"export": {"parity_samples": 16, **(export or {})}},
        {"quantize": {"eval_samples": 32, "layout": layout}},
    ])


@pytest.mark.parametrize(("layout", "attention"), [("ort_cpu_dynamic", False), ("ort_cpu_dynamic", True),
                                                   ("ort_cpu", True)])
def test_host_profile_gets_the_cpu_form_and_int8_on_it(tmp_path, layout: str, attention: bool) -> None:
    import json

    from tests.conftest import run_pipeline

    # no cpu_fusion in the recipe: the host profile's cpu_form decides; attention fused unless turned off
    run_pipeline(_export_recipe("host", layout, None if attention else {"cpu_attention": False}), tmp_path / "run")
    stage = tmp_path / "run" / "02-export"
    m = json.loads((stage / "metrics.json").read_text())["metrics"]
    assert m["cpu_form"]["rewrites"]["patch_embedding_matmul"] == 1 and m["cpu_form"]["rewrites"]["fast_gelu"] == 2
    # the head reads the class token: the last block computes it alone, its attention one query row (unfused)
    assert m["cpu_form"]["rewrites"]["unread_tokens"] > 0
    assert m["cpu_form"]["attention_fused"] == (1 if attention else 0)
    assert m["cpu_form"]["parity"]["max_abs_diff"] < 1e-3
    artifacts = json.loads((stage / "graph.json").read_text())["artifacts"]
    assert artifacts["onnx"] == "model.cpu.onnx" and artifacts["onnx_portable"] == "model.onnx"
    q = tmp_path / "run" / "03-quantize" / "model.int8.onnx"
    ops = op_counts(q)
    assert "Conv" not in ops and ops.get("FastGelu") == 2  # the patch embedding is a (quantized) MatMul
    if layout == "ort_cpu_dynamic" and attention:  # attention's projection in INT8 too
        assert ops.get("QAttention") == 1 and "Attention" not in ops and ops.get("Softmax") == 1
    elif layout == "ort_cpu_dynamic":  # every linear in INT8, the patch embedding's MatMul included
        cpu = onnx.load(str(stage / "model.cpu.onnx"))
        weights = {i.name for i in cpu.graph.initializer}
        linears = [n for n in cpu.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert any("patchify" in n.name for n in linears)
        assert ops.get("MatMulInteger") == len(linears) and ops.get("Softmax") == 2
    else:  # static QDQ on the linears around the float Attention kernel
        assert ops.get("Attention") == 1 and ops.get("DequantizeLinear", 0) > 0 and ops.get("Softmax") == 1
    assert json.loads((tmp_path / "run" / "03-quantize" / "metrics.json").read_text())["metrics"]["parity"][
        "top1_agreement"] >= 0.9


def test_cpu_form_falls_back_to_exact_gelu_where_the_tanh_one_fails_parity(tmp_path) -> None:
    import json

    from tests.conftest import run_pipeline

    data = _export_recipe("host", export={"atol": 3e-5})  # the plain export passes, tanh GELU's error does not
    data["passes"] = data["passes"][:2]
    run_pipeline(data, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "02-export" / "metrics.json").read_text())["metrics"]
    assert m["parity"]["max_abs_diff"] < 3e-5 and m["cpu_form"]["rewrites"]["fast_gelu"] == 0
    assert m["cpu_form"]["parity"]["max_abs_diff"] < 3e-5 and "FastGelu" not in m["cpu_form"]["fused_ops"]


def test_jetson_path_stays_plain_opset_13_without_contrib_ops(tmp_path) -> None:
    from edgevit.errors import EdgeVitError
    from tests.conftest import run_pipeline

    data = _export_recipe("jetson-nano")  # the profile decides: no CPU form
    data["passes"] = data["passes"][:2]
    run_pipeline(data, tmp_path / "run")
    stage = tmp_path / "run" / "02-export"
    model = onnx.load(str(stage / "model.onnx"))
    assert model.opset_import[0].version == 13 and {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"} and not (stage / "model.cpu.onnx").exists()
    data["passes"][1]["export"]["cpu_fusion"] = True
    with pytest.raises(EdgeVitError, match="runs TensorRT"):
        run_pipeline(data, tmp_path / "forced")
