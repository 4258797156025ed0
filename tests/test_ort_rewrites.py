"""The ONNX Runtime CPU form's rewrites (edgevit.ort_rewrites): each one matches what it
claims, keeps the function (exactly, or within the stated approximation), and leaves
look-alikes alone."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgevit import ort_rewrites
from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx, op_counts, run_batches, session, simplify_onnx
from edgevit.ort_fusion import _shapes, fuse_attention, fuse_for_cpu
from tests.conftest import MODEL_FACTORIES, randomised_graph


def _export(graph: ModelGraph, path) -> None:  # noqa: ANN001
    export_onnx(graph, path, opset=17)
    simplify_onnx(path)  # what the export pass hands on


def _torch_out(graph: ModelGraph, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return graph.module.eval()(x).numpy()


@pytest.mark.parametrize("approximate", [False, True])
def test_cpu_form_of_every_family_keeps_its_function(tiny_graph: ModelGraph, tmp_path, approximate: bool) -> None:
    plain, cpu = tmp_path / "m.onnx", tmp_path / "m.cpu.onnx"
    _export(tiny_graph, plain)
    x = torch.randn(5, 3, 32, 32)
    result = fuse_for_cpu(plain, cpu, x.numpy()[:2], approximate_gelu=approximate)
    ops = op_counts(cpu)
    depth = len(tiny_graph.spec.blocks)
    # every family here embeds patches with a stride-equals-kernel Conv and uses erf GELU
    assert result.rewrites["patch_embedding_matmul"] == 1 and "Conv" not in ops and ops["SpaceToDepth"] == 1
    assert result.rewrites["fast_gelu"] == (depth if approximate else 0)
    assert ("Erf" in ops) != approximate and ops.get("FastGelu", 0) == (depth if approximate else 0)
    diff = np.abs(run_batches(session(cpu), x.numpy()) - _torch_out(tiny_graph, x)).max()
    assert diff < (2e-3 if approximate else 1e-4)


def test_patch_embedding_matmul_is_exact_and_dynamic_in_batch(tmp_path) -> None:
    graph = randomised_graph(*MODEL_FACTORIES["timm"]())
    _export(graph, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert ort_rewrites.patch_embedding_matmul(model, _shapes(model)) == 1
    onnx.save(model, str(tmp_path / "p.onnx"))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        assert np.abs(run_batches(session(tmp_path / "p.onnx"), x.numpy()) - _torch_out(graph, x)).max() < 1e-5


def test_overlapping_patch_embedding_is_left_as_a_conv(tmp_path) -> None:
    """A Conv whose stride is smaller than its kernel (overlapping patches) is no patchify."""
    graph = randomised_graph(*MODEL_FACTORIES["timm"]())
    conv = graph.module.patch_embed.proj
    conv.stride = (4, 4)
    conv.padding = (2, 2)  # 8x8 kernel, stride 4, padded: 8x8 grid of overlapping patches
    graph.module.patch_embed.grid_size = (8, 8)
    graph.module.patch_embed.num_patches = 64
    graph.module.pos_embed = torch.nn.Parameter(torch.randn(1, 65, graph.module.pos_embed.shape[-1]) * 0.02)
    _export(graph, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert ort_rewrites.patch_embedding_matmul(model, _shapes(model)) == 0
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 1


def _gelu_graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2001])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2001])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _c(name: str, v: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(v, np.float32), name)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("half_first", [False, True])
def test_approximate_gelu_is_the_tanh_form_within_its_bound(half_first: bool) -> None:
    erf = [helper.make_node("Div", ["x", "r2"], ["a"]), helper.make_node("Erf", ["a"], ["b"]),
           helper.make_node("Add", ["b", "one"], ["c"])]
    exact = erf + ([helper.make_node("Mul", ["x", "half"], ["d"]), helper.make_node("Mul", ["d", "c"], ["y"])]
                   if half_first else  # (x * 0.5) * (1 + erf) or (x * (1 + erf)) * 0.5
                   [helper.make_node("Mul", ["x", "c"], ["d"]), helper.make_node("Mul", ["d", "half"], ["y"])])
    model = _gelu_graph(exact, [_c("r2", math.sqrt(2)), _c("one", 1.0), _c("half", 0.5)])
    x = np.linspace(-8, 8, 2001, dtype=np.float32)[None]
    ref = _run(model, x)
    assert ort_rewrites.approximate_gelu(model) == 1
    assert [n.op_type for n in model.graph.node] == ["FastGelu"] and not model.graph.initializer
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    got = _run(model, x)
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert np.abs(got - tanh).max() < 5e-5  # the tanh approximation itself (margin for other CPUs' tanh kernels) ...
    assert 1e-5 < np.abs(got - ref).max() < 5e-4  # ... not exact GELU, and within the stated bound


def test_approximate_gelu_leaves_other_erf_uses_alone() -> None:
    """erf(x / sqrt 2) + 1 times something other than x is no GELU."""
    nodes = [helper.make_node("Div", ["x", "r2"], ["a"]), helper.make_node("Erf", ["a"], ["b"]),
             helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Mul", ["c", "half"], ["y"])]
    model = _gelu_graph(nodes, [_c("r2", math.sqrt(2)), _c("one", 1.0), _c("half", 0.5)])
    assert ort_rewrites.approximate_gelu(model) == 0
    scaled = [helper.make_node("Div", ["x", "three"], ["a"]), *nodes[1:3], helper.make_node("Mul", ["x", "c"], ["d"]),
              helper.make_node("Mul", ["d", "half"], ["y"])]
    model = _gelu_graph(scaled, [_c("three", 3.0), _c("one", 1.0), _c("half", 0.5)])
    assert ort_rewrites.approximate_gelu(model) == 0


def test_repeated_constants_do_not_hide_attention_from_the_fusion(tmp_path) -> None:
    """Zero qkv biases (a fresh model's) are one initializer plus Identity nodes in the export;
    the fusion must still see constants and fuse every block."""
    module, build = MODEL_FACTORIES["timm"]()
    graph = randomised_graph(module, build)
    with torch.no_grad():
        for blk in graph.module.blocks:
            blk.attn.qkv.bias.zero_()
    export_onnx(graph, tmp_path / "m.onnx", opset=17)  # not simplified: the Identities stay
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.op_type == "Identity" for n in model.graph.node) >= len(graph.spec.blocks) - 1
    x = torch.randn(2, 3, 32, 32)
    fused, result = fuse_attention(model, x.numpy())
    assert result.attention_fused == result.attention_regions == len(graph.spec.blocks)
    onnx.save(fused, str(tmp_path / "f.onnx"))
    assert np.abs(run_batches(session(tmp_path / "f.onnx"), x.numpy()) - _torch_out(graph, x)).max() < 1e-4


@pytest.mark.parametrize("family", ["swin", "beit", "eva02", "mobilevit"])
def test_cpu_form_keeps_the_hierarchical_and_hybrid_families_function(family: str, tmp_path) -> None:
    """The host profile hands every family's export this form: whatever each rewrite does or
    leaves alone (Swin's NHWC patch embedding, EVA's SwiGLU, relative-position attention), the
    result must compute what torch does."""
    from tests.test_families_deploy import _graph

    graph = _graph(family)
    x = torch.randn(2, 3, *graph.spec.img_size)
    _export(graph, tmp_path / "m.onnx")
    result = fuse_for_cpu(tmp_path / "m.onnx", tmp_path / "m.cpu.onnx", x.numpy(), approximate_gelu=False)
    assert not result.unfused_regions
    assert np.abs(run_batches(session(tmp_path / "m.cpu.onnx"), x.numpy()) - _torch_out(graph, x)).max() < 1e-4
