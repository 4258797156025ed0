"""The TensorRT ONNX-parser operator tables (edgevit.deploy.tensorrt_ops) against real timm ViT exports."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from edgevit.deploy.tensorrt_ops import (
    MAX_OPSET,
    RESTRICTIONS,
    SOURCES,
    SUPPORTED_OPS,
    ops_for,
    standard_op_types,
    unsupported,
)


def _vit_onnx(opset: int):
    import onnx
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    model.eval()
    for m in model.modules():  # SDPA has no ONNX form below opset 14: use explicit MatMul + Softmax
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), buf, opset_version=opset, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def vit13():
    return _vit_onnx(13)


@pytest.fixture(scope="module")
def vit17():
    return _vit_onnx(17)


def test_tables_share_keys_and_sources():
    assert set(SUPPORTED_OPS) == set(MAX_OPSET) == set(RESTRICTIONS) == set(SOURCES)
    assert {"8.2", "8.5", "8.6"} <= set(SUPPORTED_OPS)
    assert any(k.startswith("10.") for k in SUPPORTED_OPS)
    for repo, path, commit in SOURCES.values():
        assert (repo, path) == ("onnx/onnx-tensorrt", "docs/operators.md")
        assert len(commit) == 40
    assert MAX_OPSET["8.2"] == 13 and MAX_OPSET["8.5"] == 17 and MAX_OPSET["8.6"] == 17


def test_layernorm_only_from_8_6():
    assert "LayerNormalization" not in SUPPORTED_OPS["8.2"]
    assert "LayerNormalization" not in SUPPORTED_OPS["8.5"]
    for version, ops in SUPPORTED_OPS.items():
        if tuple(map(int, version.split("."))) >= (8, 6):
            assert "LayerNormalization" in ops, version
    assert unsupported(["LayerNormalization"], "8.2") == ["LayerNormalization"]
    assert unsupported(["LayerNormalization"], "8.6") == []
    assert unsupported(["LayerNormalization"], "10.x") == []


def test_vit_core_ops_in_8_2():
    for op in ("MatMul", "Softmax", "Conv", "Gemm", "Erf"):
        assert op in SUPPORTED_OPS["8.2"], op


def test_later_versions_never_drop_ops():
    keys = sorted(SUPPORTED_OPS, key=lambda k: tuple(map(int, k.split("."))))
    for older, newer in zip(keys, keys[1:], strict=False):
        assert SUPPORTED_OPS[older] <= SUPPORTED_OPS[newer], (older, newer)


def test_ops_for_picks_nearest_at_or_below():
    assert ops_for("8.2.1")[0] == "8.2"
    assert ops_for("8.2")[0] == "8.2"
    assert ops_for("8.2.1.8") == ("8.2", SUPPORTED_OPS["8.2"])
    assert ops_for("8.6.1.6")[0] == "8.6"
    assert ops_for("10.3")[0] == "9.1"  # no 10.0-10.7 doc: fall back, conservatively, to the one below
    assert ops_for("10.12.0")[0] == "10.12"
    assert ops_for("11.0")[0] == max(SUPPORTED_OPS, key=lambda k: tuple(map(int, k.split("."))))
    assert ops_for("10.x")[0] == max((k for k in SUPPORTED_OPS if k.startswith("10.")), key=lambda k: int(k[3:]))
    for bad in ("8.0", "7.1.3", "8", "", "tensorrt", "7.x"):
        with pytest.raises(ValueError):
            ops_for(bad)


def test_unsupported_sorted_and_deduplicated():
    assert unsupported(["Xor", "Mod", "Add", "Mod"], "8.2") == ["Mod", "Xor"]
    assert unsupported(["Xor", "Mod"], "8.4") == ["Mod"]
    assert unsupported([], "10.15") == []


def test_restrictions_cover_vit_cnn_ops():
    for version in ("8.2", "8.6"):
        r = RESTRICTIONS[version]
        for op in ("Resize", "Slice", "Einsum", "Cast", "DequantizeLinear", "QuantizeLinear", "LayerNormalization"):
            assert op in r, (version, op)
        assert "INT64" in r["*"]
    assert "cubic" in RESTRICTIONS["8.2"]["Resize"]
    assert "initializer" in RESTRICTIONS["8.2"]["Slice"]


def test_vit_opset13_parses_on_8_2(vit13):
    ops = standard_op_types(vit13)
    assert {"MatMul", "Softmax", "Conv", "Erf"} <= ops
    assert "LayerNormalization" not in ops  # below opset 17 the exporter decomposes it
    assert max(o.version for o in vit13.opset_import if o.domain in ("", "ai.onnx")) <= MAX_OPSET["8.2"]
    assert unsupported(ops, "8.2") == []


def test_vit_opset17_needs_8_6(vit17):
    ops = standard_op_types(vit17)
    assert "LayerNormalization" in unsupported(ops, "8.2")
    assert "LayerNormalization" in unsupported(ops, "8.5")
    assert unsupported(ops, "8.6") == []
    assert unsupported(ops, "10.x") == []
    assert max(o.version for o in vit17.opset_import if o.domain in ("", "ai.onnx")) > MAX_OPSET["8.2"]
