"""The CPU form's tail rewrite (edgevit/unread_tokens.py): a head that reads the class token
alone gets a last block that computes that token alone, with the same logits; tokens some
consumer reads whole, and ops that mix tokens, are left whole."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgevit.onnx_cost import onnx_summary
from edgevit.onnx_io import export_onnx, run_batches, session, simplify_onnx
from edgevit.ort_fusion import _shapes
from edgevit.ort_rewrites import fold_identities
from edgevit.unread_tokens import slice_unread_tokens
from tests.conftest import MODEL_FACTORIES, randomised_graph

KEYS_VALUES = re.compile(r"qkv|/k/|/v/|k_proj|v_proj|/key/|/value/")


def _rewritten(family: str, tmp: Path) -> tuple[object, Path, Path, int]:
    graph = randomised_graph(*MODEL_FACTORIES[family]())
    plain, out = tmp / "m.onnx", tmp / "m.rows.onnx"
    export_onnx(graph, plain, opset=17)
    simplify_onnx(plain)  # what the export pass hands on
    model = onnx.load(str(plain))
    fold_identities(model)
    count = slice_unread_tokens(model, _shapes(model))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return graph, plain, out, count


@pytest.mark.parametrize("family", ["timm", "builtin", "hf"])
def test_the_last_block_computes_the_class_token_alone_with_the_same_logits(family: str, tmp_path: Path) -> None:
    graph, plain, out, count = _rewritten(family, tmp_path)
    assert count > 0
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = graph.module(x).numpy()
        assert np.abs(run_batches(session(out), x.numpy()) - ref).max() < 1e-5
    before = {la["name"]: la["macs"] for la in onnx_summary(plain)["layers"]}
    after = {la["name"]: la["macs"] for la in onnx_summary(out)["layers"]}
    tokens = graph.spec.blocks[-1].tokens  # patches and the class token
    last = f".{len(graph.spec.blocks) - 1}/"
    changed = {k for k in before if after.get(k) != before[k]}
    # every product of the last block at one token, but its keys and values: all tokens attend to
    assert changed == {k for k in before if last in k and not KEYS_VALUES.search(k)} and len(changed) >= 5
    assert all(after[k] * tokens == before[k] for k in changed)


@pytest.mark.parametrize("family", ["timm_no_cls_token", "timm_deit_distilled"])
def test_heads_reading_every_token_or_two_are_left_whole(family: str, tmp_path: Path) -> None:
    """Average pooling reads every token; DeiT's two heads read two: nothing to leave out."""
    _, plain, out, count = _rewritten(family, tmp_path)
    assert count == 0
    assert onnx_summary(out)["macs"] == onnx_summary(plain)["macs"]


def _tokens_model(softmax_axis: int, feature_output: bool) -> onnx.ModelProto:
    """x [B, 5, 8] → y = x @ w → s = softmax(y, axis) → z = s + y → z[:, 0] (and y as an output)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Softmax", ["y"], ["s"], axis=softmax_axis),
             helper.make_node("Add", ["s", "y"], ["z"]),
             helper.make_node("Gather", ["z", "zero"], ["cls"], axis=1)]
    outputs = [helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["B", 8])]
    if feature_output:
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5, 8]))
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 8])],
                              outputs, [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
                                        numpy_helper.from_array(np.array(0, np.int64), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize(("softmax_axis", "feature_output", "sliced"), [
    (-1, False, {"y", "s", "z"}),  # softmax within each token: all of it at one token
    (1, False, {"z"}),  # softmax across tokens mixes them: y and s whole, z at one token
    (-1, True, {"s", "z"}),  # y is an output too: whole
])
def test_token_mixing_ops_and_graph_outputs_stay_whole(softmax_axis: int, feature_output: bool, sliced: set,
                                                        tmp_path: Path) -> None:
    model = _tokens_model(softmax_axis, feature_output)
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    ref = _run(model, x)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert slice_unread_tokens(rewritten, _shapes(rewritten)) == len(sliced)
    got = _run(rewritten, x)
    assert all(np.abs(a - b).max() < 1e-6 for a, b in zip(ref, got, strict=True))
    producers = {n.output[0]: n for n in rewritten.graph.node}
    for t in ("y", "s", "z"):  # a tensor computed at one row reads a Slice (or a sliced tensor) upstream
        assert (t in sliced) == any(producers[i].op_type == "Slice" or i in sliced
                                    for i in producers[t].input if i in producers), t
