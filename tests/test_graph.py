"""The shared model graph: spec extraction, structural edits, cost, save/load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from tests.conftest import MODEL_FACTORIES, SEGMENTER_FACTORIES, outputs_in_a_fresh_process, randomised_graph

X = torch.randn(3, 3, 32, 32)
FAMILIES = {**MODEL_FACTORIES, **SEGMENTER_FACTORIES}


@pytest.fixture(scope="module")
def _built() -> dict[str, ModelGraph]:
    return {}


@pytest.fixture(params=list(FAMILIES))
def tiny_graph(request: pytest.FixtureRequest, _built: dict[str, ModelGraph]) -> ModelGraph:
    """conftest's tiny graph of each family, and segmenters (that backbone + a linear or an MLA
    head), so every generic edit is checked on a dense model too. Each is built once here and
    cloned per test: a segmenter's build reads the plugin registry (about 0.2 s a time)."""
    if request.param not in _built:
        _built[request.param] = randomised_graph(*FAMILIES[request.param]())
    return _built[request.param].clone()


def logits(graph: ModelGraph, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return graph.module.eval()(x)


def out_shape(graph: ModelGraph, classes: int) -> tuple[int, ...]:
    """What ``logits(graph)`` must be: (B, classes), a segmenter's at every input pixel."""
    dense = graph.spec.task == "segmentation"
    return (len(X), classes, *(X.shape[-2:] if dense else ()))


def test_spec_of_each_family(tiny_graph: ModelGraph) -> None:
    s = tiny_graph.spec
    assert (s.embed_dim, s.img_size, s.patch_size, s.in_chans, s.num_classes) == (32, (32, 32), (8, 8), 3, 5)
    assert s.depth == 2 and s.num_patches == 16
    for b in s.blocks:
        assert (b.attn.num_heads, b.attn.head_dim, b.mlp.hidden) == (4, 8, 64)
        for path in [*b.attn.input_projections(), b.attn.proj, b.mlp.fc1, b.mlp.fc2]:
            assert isinstance(tiny_graph.module.get_submodule(path), torch.nn.Linear)
    family = s.family
    if family == "timm" and s.pool == "avg":
        assert s.num_prefix_tokens == 0 and s.classifiers == ["head"]
    elif family == "timm" and len(s.classifiers) == 2:  # distilled DeiT: class + distillation token
        assert s.num_prefix_tokens == 2 and s.classifiers == ["head", "head_dist"]
        assert tiny_graph.module.get_submodule(s.blocks[0].attn.qkv).bias is None
    elif family == "segmenter":  # a timm backbone without class token, under backbone.
        assert s.task == "segmentation" and s.num_prefix_tokens == 0 and s.classifiers == [s.decoder.classifier]
        assert all(b.path.startswith("backbone.") for b in s.blocks)
    else:
        assert s.num_prefix_tokens == 1
    assert s.blocks[0].attn.fused == (family in ("timm", "segmenter"))
    assert logits(tiny_graph).shape == out_shape(tiny_graph, 5)


def test_spec_of_hf_reads_separate_qkv(tiny_graph: ModelGraph) -> None:
    if tiny_graph.spec.family != "hf":
        pytest.skip("HF-specific")
    a = tiny_graph.spec.blocks[1].attn
    assert a.q.endswith("q_proj") or a.q.endswith("attention.query")
    assert tiny_graph.spec.classifiers == ["model.classifier"]


def test_unsupported_model_is_a_clear_error() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    with pytest.raises(EdgeVitError, match="not a supported Vision Transformer.*timm VisionTransformer"):
        ModelGraph.from_module(net)


def test_keep_everything_is_identity(tiny_graph: ModelGraph) -> None:
    before = logits(tiny_graph)
    for b in tiny_graph.spec.blocks:
        tiny_graph.keep_heads(b.index, range(b.attn.num_heads))
        tiny_graph.keep_mlp_units(b.index, list(reversed(range(b.mlp.hidden))))
    assert torch.equal(before, logits(tiny_graph))


def test_removing_zeroed_head_and_unit_keeps_outputs(tiny_graph: ModelGraph) -> None:
    g = tiny_graph
    a, m = g.spec.blocks[0].attn, g.spec.blocks[1].mlp
    with torch.no_grad():
        g.module.get_submodule(a.proj).weight[:, 2 * a.head_dim : 3 * a.head_dim] = 0  # head 2 contributes nothing
        g.module.get_submodule(m.fc2).weight[:, [5, 17]] = 0  # units 5 and 17 contribute nothing
    before = logits(g)
    g.keep_heads(0, [0, 1, 3])
    g.keep_mlp_units(1, [u for u in range(m.hidden) if u not in (5, 17)])
    after = logits(g)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert g.spec.blocks[0].attn.num_heads == 3 and g.spec.blocks[1].mlp.hidden == 62
    qkv_rows = sum(g.module.get_submodule(p).out_features for p in g.spec.blocks[0].attn.input_projections())
    assert qkv_rows == 3 * 3 * a.head_dim  # q, k, v of three heads: the weights really shrank
    assert g.module.get_submodule(a.proj).in_features == 3 * a.head_dim
    assert g.cost().params == g.num_params()


def test_removing_a_live_head_changes_outputs(tiny_graph: ModelGraph) -> None:
    before = logits(tiny_graph)
    tiny_graph.keep_heads(0, [0, 1])
    assert not torch.allclose(before, logits(tiny_graph), atol=1e-4)


@pytest.mark.parametrize("bad", [[], [0, 0], [4], [-1]])
def test_keep_heads_rejects_bad_indices(tiny_graph: ModelGraph, bad: list[int]) -> None:
    with pytest.raises(ValueError):
        tiny_graph.keep_heads(0, bad)


def test_cost_matches_torch_flop_counter(tiny_graph: ModelGraph) -> None:
    g = tiny_graph
    g.keep_heads(1, [1, 2])
    g.keep_mlp_units(0, range(40))
    cost = g.cost(batch=3)
    with g.export_mode() as module, FlopCounterMode(display=False) as counter, torch.no_grad():
        module(X)  # export mode: explicit matmuls, which the counter sees (SDPA on CPU it does not)
    assert cost.macs == counter.get_total_flops() // 2
    assert cost.params == g.num_params()
    assert cost.flops > 2 * cost.macs  # element-wise work is counted too
    attn = [x for x in cost.layers if x.kind == "attention"]
    assert attn[1].scratch_bytes == 3 * 2 * g.spec.num_tokens**2 * 4  # batch x heads x N x N fp32


def test_save_load_in_fresh_process(tiny_graph: ModelGraph, tmp_path) -> None:
    g = tiny_graph
    g.keep_heads(0, [1, 3])
    g.keep_mlp_units(1, range(0, 64, 3))
    g.save(tmp_path / "stage")
    (y,), shown = outputs_in_a_fresh_process([tmp_path / "stage"], X, tmp_path,
                                             "g.spec.blocks[0].attn.num_heads, g.spec.blocks[1].mlp.hidden")
    assert shown == ["2 22"]
    assert torch.equal(y, logits(g))


def test_load_refuses_mismatched_weights(tiny_graph: ModelGraph, tmp_path) -> None:
    g = tiny_graph
    g.save(tmp_path / "a")
    g.keep_heads(0, [0])
    g.save(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(EdgeVitError, match="does not fit this model.*shape"):
        ModelGraph.load(tmp_path / "b")


def test_reset_classifier_survives_save_load(tiny_graph: ModelGraph, tmp_path) -> None:
    tiny_graph.reset_classifier(7)
    assert logits(tiny_graph).shape == out_shape(tiny_graph, 7)
    tiny_graph.save(tmp_path / "s")
    assert logits(ModelGraph.load(tmp_path / "s")).shape == out_shape(tiny_graph, 7)


def test_keep_blocks_drops_blocks_and_rebuilds_from_disk(tiny_graph, tmp_path) -> None:
    x = torch.randn(2, 3, 32, 32)
    g = tiny_graph.clone()
    g.keep_blocks([1])
    assert g.spec.depth == 1 and g.spec.block(0).path.endswith("0")
    y = g.module(x)
    g.save(tmp_path)
    h = ModelGraph.load(tmp_path)
    assert h.spec.depth == 1 and torch.allclose(h.module(x), y, atol=1e-6)
    assert sum(p.numel() for p in g.module.parameters()) < sum(p.numel() for p in tiny_graph.module.parameters())


def test_keep_blocks_equals_a_model_built_without_them() -> None:
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=4)
    big = VisionTransformer(**kw).eval()
    small = VisionTransformer(**dict(kw, depth=2)).eval()
    state = {k.replace("blocks.2.", "blocks.1."): v for k, v in big.state_dict().items() if "blocks.1." not in k}
    small.load_state_dict(state)
    g = ModelGraph.from_module(big, {"architecture": "VisionTransformer", "kwargs": kw})
    g.keep_blocks([0, 2])
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(g.module(x), small(x), atol=1e-6)


FIXTURES = Path(__file__).parent / "fixtures"


def test_edits_are_recorded_and_the_base_recipe_stays(tiny_graph: ModelGraph, tmp_path) -> None:
    g = tiny_graph
    build = copy.deepcopy(g.build)
    g.keep_blocks([1])
    g.reset_classifier(7)
    g.keep_heads(0, [3, 1])
    g.keep_mlp_units(0, range(0, 64, 2))
    assert g.build == build  # nothing folded into the recipe: the edits say it all
    assert [(e.kind, e.args) for e in g.edits] == [
        ("keep_blocks", {"blocks": [1]}),
        ("reset_classifier", {"num_classes": 7}),
        ("keep_heads", {"block": 0, "heads": [1, 3]}),
        ("keep_mlp_units", {"block": 0, "units": list(range(0, 64, 2))}),
    ]
    g.save(tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "graph.json").read_text())
    assert saved["format"] == "edgevit.graph/2" and saved["build"] == json.loads(json.dumps(build))
    assert [e["kind"] for e in saved["edits"]] == ["keep_blocks", "reset_classifier", "keep_heads", "keep_mlp_units"]
    h = ModelGraph.load(tmp_path / "s")
    assert torch.equal(logits(h), logits(g)) and h.edits == g.edits
    assert h.spec == g.spec


def test_a_plugin_edit_kind_replays_on_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.registry import BUILTINS

    kw = dict(img_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    g = ModelGraph.from_module(VisionTransformer(**kw).eval(), {"architecture": "VisionTransformer", "kwargs": kw})
    # an edit kind from "a plugin": keeps heads chosen by rule, expressed through the public edits
    monkeypatch.setitem(BUILTINS, "edits", {**BUILTINS["edits"], "first_head_only": "tests.test_graph:_first_head"})
    g._registry = None
    g.apply("first_head_only", {"block": 1})
    assert g.spec.blocks[1].attn.num_heads == 1
    assert [(e.kind, e.args) for e in g.edits] == [("first_head_only", {"block": 1})]
    g.save(tmp_path / "p")  # replaying the plugin's record must redo the slicing, or the weights do not fit
    assert ModelGraph.load(tmp_path / "p").spec.blocks[1].attn.num_heads == 1


def _first_head(graph: ModelGraph, block: int) -> None:
    graph._keep_heads(block, [0])


@pytest.fixture
def fixture_threads():  # noqa: ANN201
    """The v1 fixtures' outputs were written with one torch thread; bit-identical needs the same
    reduction order (another thread count differs in the last bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_v1_stage_directories_still_load(fixture_threads: None) -> None:
    from safetensors.torch import load_file

    io = load_file(str(FIXTURES / "v1_io.safetensors"))
    g = ModelGraph.load(FIXTURES / "v1_stage")
    assert [b.attn.num_heads for b in g.spec.blocks] == [2, 4] and [b.mlp.hidden for b in g.spec.blocks] == [32, 16]
    assert g.spec.num_classes == 3 and g.spec.depth == 2
    with torch.no_grad():
        assert torch.equal(g.module.eval()(io["x"]), io["y"])
    s = ModelGraph.load(FIXTURES / "v1_side")
    assert s.side is not None and s.side.kind == "losa" and "side" not in s.build
    assert [e.kind for e in s.edits][-1] == "attach_side"
    with torch.no_grad():
        assert torch.equal(s.module.eval()(io["x"]), io["y_side"])


def test_v1_loaded_graph_saves_as_v2_and_reloads(tmp_path, fixture_threads: None) -> None:
    from safetensors.torch import load_file

    io = load_file(str(FIXTURES / "v1_io.safetensors"))
    ModelGraph.load(FIXTURES / "v1_side").save(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "graph.json").read_text())["format"] == "edgevit.graph/2"
    with torch.no_grad():
        assert torch.equal(ModelGraph.load(tmp_path / "v2").module.eval()(io["x"]), io["y_side"])


def test_load_refuses_edits_that_do_not_match_the_spec(tiny_graph: ModelGraph, tmp_path) -> None:
    tiny_graph.keep_heads(0, [0, 1])
    tiny_graph.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "graph.json").read_text())
    meta["edits"] = []
    (tmp_path / "s" / "graph.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeVitError, match="block 0 has 2 heads .* saved but 4"):
        ModelGraph.load(tmp_path / "s")
