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


def test_export_keeps_module_state(tiny_graph: ModelGraph, tmp_path) -> None:
    def fused() -> list[bool]:
        return [m.fused_attn for m in tiny_graph.module.modules() if hasattr(m, "fused_attn")]

    tiny_graph.module.train()
    before = fused()
    export_onnx(tiny_graph, tmp_path / "m.onnx", opset=13)
    assert tiny_graph.module.training and fused() == before


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
