"""Segmenters in the graph: spec, structural edits, cost, save/load, ONNX, the segmenter source.

The generic graph tests (keep-everything identity, zeroed heads and units removed, save and
load in a fresh process, recorded edits, ...) run on segmenters as families of
``tests/test_graph.py``'s ``tiny_graph``; here are the segmenter's own: its spec, the decode
head's taps when blocks go, its cost and ONNX."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.graph.adapters.segmenter import SegmenterAdapter
from edgevit.models.sources import SegmenterSource, load_model
from tests.conftest import randomised_graph

BACKBONE = dict(img_size=(32, 48), patch_size=8, num_classes=0, global_pool="", class_token=False, embed_dim=32,
                depth=4, num_heads=4, mlp_ratio=2.0)
DECODERS = {"linear": {"kind": "linear"}, "mla": {"kind": "mla", "width": 16}}
X = torch.randn(2, 3, 32, 48)


def build(decoder: dict, num_classes: int = 5, **backbone) -> dict:
    kw = {**BACKBONE, **backbone}
    return {"backbone": {"family": "timm", "architecture": "VisionTransformer", "kwargs": kw},
            "decoder": dict(decoder), "num_classes": num_classes}


def segmenter(decoder: dict, **backbone) -> ModelGraph:
    """A tiny segmenter graph with non-trivial weights, in eval mode."""
    recipe = build(decoder, **backbone)
    return randomised_graph(SegmenterAdapter().build(recipe), recipe)


@pytest.fixture(params=list(DECODERS))
def seg(request: pytest.FixtureRequest) -> ModelGraph:
    return segmenter(DECODERS[request.param])


def logits(graph: ModelGraph, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return graph.module.eval()(x)


class SegViT(nn.Module):
    """The reference teacher's layout (train_seg_teacher.py), at a tiny size."""

    def __init__(self, n_classes: int = 5) -> None:
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        self.backbone = VisionTransformer(**BACKBONE)
        self.head = nn.Linear(BACKBONE["embed_dim"], n_classes)
        self.grid = (BACKBONE["img_size"][0] // 8, BACKBONE["img_size"][1] // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.backbone.forward_features(x)
        out = self.head(t).transpose(1, 2).reshape(x.shape[0], -1, *self.grid)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_spec_matches_modules(seg: ModelGraph) -> None:
    s = seg.spec
    assert (s.family, s.task, s.num_classes, s.depth, s.grid, s.embed_dim) == ("segmenter", "segmentation", 5, 4,
                                                                               (4, 6), 32)
    assert s.patch_embed == "backbone.patch_embed.proj" and s.plain and s.num_prefix_tokens == 0
    for b in s.blocks:
        assert b.path == f"backbone.blocks.{b.index}" and b.tokens == 24
        for path in [*b.attn.input_projections(), b.attn.proj, b.mlp.fc1, b.mlp.fc2]:
            assert path.startswith("backbone.") and isinstance(seg.module.get_submodule(path), nn.Linear)
    d = s.decoder
    assert s.classifiers == [d.classifier]
    assert seg.module.get_submodule(d.classifier).out_features == 5
    if d.kind == "linear":
        assert d.taps == [3] and d.classifier == "head" and d.width == 32
    else:
        assert d.taps == [0, 1, 2, 3] and d.width == 16 and d.norm == "head.norm"
        assert [seg.module.get_submodule(p).in_features for p in d.projections] == [32] * 4
    assert logits(seg).shape == (2, 5, 32, 48)


def _silence_block(graph: ModelGraph, index: int) -> None:
    """Zero a block's residual branches: its output equals its input."""
    blk = graph.spec.blocks[index]
    with torch.no_grad():
        for path in (blk.attn.proj, blk.mlp.fc2):
            lin = graph.module.get_submodule(path)
            lin.weight.zero_()
            lin.bias.zero_()


def test_keep_blocks_remaps_and_merges_mla_taps() -> None:
    g = segmenter(DECODERS["mla"])
    _silence_block(g, 1)  # dropping it changes nothing, so the tap on it must see block 0's tokens
    before = logits(g)
    g.keep_blocks([0, 2, 3])
    d = g.spec.decoder
    assert g.spec.depth == 3 and d.taps == [0, 1, 2]  # taps 0 and 1 both land on block 0 and merge
    assert d.projections == ["head.proj.0", "head.proj.1", "head.proj.2"]
    assert torch.allclose(before, logits(g), atol=1e-5)
    g.keep_blocks([1])  # taps on dropped blocks 0 and 2: the first kept block, and block 1
    assert g.spec.decoder.taps == [0] and len(g.module.head.proj) == 1
    assert logits(g).shape == (2, 5, 32, 48)


def test_keep_blocks_on_linear_head_reads_the_last_kept_block() -> None:
    g = segmenter(DECODERS["linear"])
    _silence_block(g, 3)
    before = logits(g)
    g.keep_blocks([0, 1, 2])
    assert g.spec.decoder.taps == [2]
    assert torch.allclose(before, logits(g), atol=1e-5)


def test_cost_matches_torch_flop_counter(seg: ModelGraph) -> None:
    seg.keep_heads(1, [0, 3])
    seg.keep_mlp_units(0, range(40))
    cost = seg.cost(batch=2)
    with seg.export_mode() as module, FlopCounterMode(display=False) as counter, torch.no_grad():
        module(X)
    assert cost.macs == counter.get_total_flops() // 2
    assert cost.params == seg.num_params()
    head = [x for x in cost.layers if x.kind == "head"]
    assert head[0].macs == 2 * 24 * seg.spec.decoder.width * 5  # one logit vector per patch
    assert [x.macs for x in cost.layers if x.name == "head.upsample"] == [0]


def test_class_token_is_dropped_before_the_head() -> None:
    g = segmenter(DECODERS["mla"], class_token=True)
    assert g.spec.num_prefix_tokens == 1 and g.spec.blocks[0].tokens == 25 and g.spec.num_patches == 24
    cost = g.cost(batch=2)
    with g.export_mode() as module, FlopCounterMode(display=False) as counter, torch.no_grad():
        assert module(X).shape == (2, 5, 32, 48)
    assert cost.macs == counter.get_total_flops() // 2 and cost.params == g.num_params()


def test_onnx_opset13_parses_on_tensorrt_8_2_and_matches_torch(seg: ModelGraph, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from edgevit.deploy.tensorrt_ops import standard_op_types, unsupported
    from edgevit.onnx_io import export_onnx, session

    path = tmp_path / "seg.onnx"
    export_onnx(seg, path, opset=13)
    model = onnx.load(str(path))
    ops = standard_op_types(model)
    assert "Resize" in ops and "LayerNormalization" not in ops
    assert unsupported(ops, "8.2") == []
    got = session(path, threads=1).run(None, {"input": X.numpy()})[0]
    assert got.shape == (2, 5, 32, 48)
    assert torch.allclose(torch.from_numpy(got), logits(seg), atol=1e-4)


def test_reference_layout_checkpoint_loads_through_the_source(tmp_path: Path) -> None:
    ref = SegViT().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file(ref.state_dict(), str(tmp_path / "seg.safetensors"))
    assert {k for k in ref.state_dict() if not k.startswith("backbone.")} == {"head.weight", "head.bias"}
    cfg = SegmenterSource.model_validate({"source": "segmenter", "backbone": BACKBONE, "num_classes": 5,
                                          "decoder": {"kind": "linear"}, "checkpoint": tmp_path / "seg.safetensors",
                                          "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]})
    g = load_model(cfg)
    assert g.spec.mean == (0.4, 0.4, 0.4) and g.spec.decoder.kind == "linear"
    with torch.no_grad():
        assert torch.equal(g.module(X), ref(X))


def test_source_errors_are_one_line(tmp_path: Path) -> None:
    def err(**over) -> str:
        data = {"source": "segmenter", "backbone": BACKBONE, "num_classes": 5, **over}
        with pytest.raises(EdgeVitError) as e:
            load_model(SegmenterSource.model_validate(data))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "VisionTransformer" in err(backbone={**BACKBONE, "no_such_arg": 1})
    assert "num_classes=0" in err(backbone={**BACKBONE, "num_classes": 3})
    assert "beyond" in err(decoder={"kind": "mla", "taps": [1, 9]})
    assert "file not found" in err(checkpoint=tmp_path / "missing.safetensors")
    save_file(SegViT(n_classes=3).state_dict(), str(tmp_path / "other.safetensors"))
    assert "head.bias has shape [3]" in err(checkpoint=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="pretrained"):
        SegmenterSource.model_validate({"source": "segmenter", "num_classes": 5, "pretrained": True})


def test_non_plain_backbone_is_refused() -> None:
    from timm.models.swin_transformer import SwinTransformer

    from edgevit.seg.model import LinearDecoder, Segmenter

    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                           num_classes=0)
    module = Segmenter(swin, LinearDecoder(32, 3, 1), (8, 8), tokens=lambda *a: [])
    with pytest.raises(EdgeVitError, match="plain ViT backbone") as e:
        ModelGraph.from_module(module)
    assert "\n" not in str(e.value)


def test_side_module_tuners_are_refused() -> None:
    from edgevit.graph.extension import SideModule

    class Side(SideModule):
        kind = "losa"

    g = segmenter(DECODERS["linear"])
    with pytest.raises(EdgeVitError, match="tuner losa: .*segmenter"):
        g.attach_side(Side(), {})


@pytest.mark.data
def test_reference_camvid_teacher_loads_through_the_source() -> None:
    import json

    from edgevit.data.shared import shared_root

    root = shared_root()
    weights = root / "vit_camvid_teacher.safetensors" if root else None
    if weights is None or not weights.is_file() or not (root / "vit_camvid_teacher.json").is_file():
        pytest.skip(f"no shared data ({root or '../shared/data or $EDGEVIT_SHARED_DATA'}) with "
                    "vit_camvid_teacher.safetensors + .json")
    card = json.loads((root / "vit_camvid_teacher.json").read_text())
    cfg = SegmenterSource.model_validate({"source": "segmenter", "backbone": card["kwargs"], "checkpoint": weights,
                                          "num_classes": len(card["classes"]), "mean": card["mean"],
                                          "std": card["std"]})
    g = load_model(cfg)
    assert (g.spec.img_size, g.spec.grid, g.spec.num_classes) == ((240, 320), (15, 20), 11)
    with torch.no_grad():
        out = g.module(torch.zeros(1, 3, 240, 320))
    assert out.shape == (1, 11, 240, 320) and torch.isfinite(out).all()
