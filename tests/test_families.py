"""Swin (v1, v2), BEiT, EVA-02 and MobileViT v1 through the graph: the ViT adapters' tests on
tiny configs built with timm's own classes (random weights, no hub)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from tests.conftest import outputs_in_a_fresh_process

TINY_SWIN = dict(img_size=32, patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                 window_size=4, mlp_ratio=2.0)
TINY_PLAIN = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4)


def _swin():
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(**TINY_SWIN), {"architecture": "SwinTransformer", "kwargs": TINY_SWIN}


def _swinv2():
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    return SwinTransformerV2(**TINY_SWIN), {"architecture": "SwinTransformerV2", "kwargs": TINY_SWIN}


def _beit():
    from timm.models.beit import Beit
    kw = dict(TINY_PLAIN, mlp_ratio=2.0, use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1)
    return Beit(**kw), {"architecture": "Beit", "kwargs": kw}


def _eva02():  # EVA-02's layout: rope, fused SwiGLU (GluMlp)
    from timm.models.eva import Eva
    kw = dict(TINY_PLAIN, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    return Eva(**kw), {"architecture": "Eva", "kwargs": kw}


def _eva_swiglu():  # separate gate linear (SwiGLU), layer scale, a register token, q/k bias
    from timm.models.eva import Eva
    kw = dict(TINY_PLAIN, mlp_ratio=2.0, swiglu_mlp=True, swiglu_align_to=8, use_rot_pos_emb=True,
              ref_feat_shape=(4, 4), init_values=0.1, num_reg_tokens=1, qkv_bias=True)
    return Eva(**kw), {"architecture": "Eva", "kwargs": kw}


def _mobilevit():
    import timm
    kw = dict(num_classes=5, img_size=64)
    return timm.create_model("mobilevit_xxs", pretrained=False, **kw), {"name": "mobilevit_xxs", "kwargs": kw}


FAMILIES: dict[str, Callable] = {
    "swin": _swin,
    "swinv2": _swinv2,
    "beit": _beit,
    "eva02": _eva02,
    "eva_swiglu": _eva_swiglu,
    "mobilevit": _mobilevit,
}


ADAPTER = {"swin": "timm_swin", "swinv2": "timm_swinv2", "beit": "timm_beit", "eva02": "timm_eva",
           "eva_swiglu": "timm_eva", "mobilevit": "timm_mobilevit"}


@pytest.fixture(params=list(FAMILIES))
def fam(request: pytest.FixtureRequest) -> tuple[str, ModelGraph]:
    module, build = FAMILIES[request.param]()
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised biases and tables too)
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return request.param, ModelGraph.from_module(module.eval(), build)


def images(g: ModelGraph, n: int = 2) -> torch.Tensor:
    return torch.randn(n, g.spec.in_chans, *g.spec.img_size, generator=torch.Generator().manual_seed(1))


def logits(g: ModelGraph, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return g.module.eval()(x)


def test_spec_matches_the_modules(fam) -> None:
    name, g = fam
    s = g.spec
    assert s.family == ADAPTER[name] and s.depth >= 2
    for b in s.blocks:
        a, m = b.attn, b.mlp
        rows = sum(g.module.get_submodule(p).out_features for p in a.input_projections())
        assert rows == 3 * a.num_heads * a.head_dim
        assert g.module.get_submodule(a.proj).in_features == a.attn_dim
        assert g.module.get_submodule(a.proj).out_features == b.dim
        for p in m.unit_rows():
            fc1 = g.module.get_submodule(p)
            assert fc1.in_features == b.dim and fc1.out_features == m.hidden * (2 if m.fused_gate else 1)
        assert g.module.get_submodule(m.fc2).in_features == m.hidden
        assert b.tokens == b.attn.windows * b.attn.window_tokens
        if a.bias_table:
            assert g.module.get_parameter(a.bias_table).shape == (a.bias_rows, a.num_heads)
    kinds = {b.attn.kind for b in s.blocks}
    expected = {"swin": {"window"}, "swinv2": {"window_cpb"}, "beit": {"rel_pos"}, "eva02": {"rope"},
                "eva_swiglu": {"rope"}, "mobilevit": {"global"}}[name]
    assert kinds == expected
    assert {b.mlp.kind for b in s.blocks} == ({"swiglu"} if name.startswith("eva") else {"gelu"})
    assert not s.plain if name in ("swin", "swinv2", "mobilevit") else s.plain
    if name in ("swin", "swinv2"):  # two stages: 16x16 tokens in 4x4 windows, then 8x8 after patch merging
        assert [(b.stage, b.dim, b.tokens, b.attn.windows) for b in s.blocks] == [
            (0, 16, 256, 16), (0, 16, 256, 16), (1, 32, 64, 4), (1, 32, 64, 4)]
        assert [f.module for f in s.fixed] == ["PatchEmbed", "PatchMerging", "LayerNorm"]
        assert s.fixed[1].in_shape == [16, 16, 16] and s.fixed[1].out_shape == [8, 8, 32]
    if name == "mobilevit":  # the MobileNetV2 blocks and convs are fixed parts; the 3 stages' blocks widen
        assert sorted({b.dim for b in s.blocks}) == [64, 80, 96]
        assert "BottleneckBlock" in {f.module for f in s.fixed}
    if name == "eva02":  # one fc1: value rows then gate rows
        assert all(b.mlp.fused_gate and b.mlp.gate is None for b in s.blocks)
    if name == "eva_swiglu":
        assert all(b.mlp.gate and not b.mlp.fused_gate for b in s.blocks)
        assert s.register_tokens == 1 and s.num_prefix_tokens == 2 and all(b.layer_scale for b in s.blocks)
    if name == "beit":
        assert all(b.layer_scale for b in s.blocks)


def test_keep_everything_is_an_exact_identity(fam) -> None:
    _, g = fam
    x = images(g)
    before = logits(g, x)
    for b in g.spec.blocks:
        g.keep_heads(b.index, range(b.attn.num_heads))
        g.keep_mlp_units(b.index, range(b.mlp.hidden))
    assert torch.equal(before, logits(g, x))


def _zero_head_and_units(g: ModelGraph, block: int, head: int, units: list[int]) -> None:
    b = g.spec.block(block)
    hd = b.attn.head_dim
    with torch.no_grad():
        g.module.get_submodule(b.attn.proj).weight[:, head * hd:(head + 1) * hd] = 0
        g.module.get_submodule(b.mlp.fc2).weight[:, units] = 0


def test_removing_a_zeroed_head_and_units_keeps_outputs(fam) -> None:
    name, g = fam
    x = images(g)
    first, last = g.spec.blocks[0], g.spec.blocks[-1]
    # head 0 and units 0, 3: whatever follows them must keep its own bias column, logit scale, gate row
    _zero_head_and_units(g, first.index, 0, [0, 3])
    _zero_head_and_units(g, last.index, 0, [1])
    before = logits(g, x)
    params, heads0 = g.num_params(), first.attn.num_heads
    g.keep_heads(first.index, range(1, first.attn.num_heads))
    g.keep_mlp_units(first.index, [u for u in range(first.mlp.hidden) if u not in (0, 3)])
    g.keep_heads(last.index, range(1, last.attn.num_heads))
    g.keep_mlp_units(last.index, [u for u in range(last.mlp.hidden) if u != 1])
    after = logits(g, x)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert g.num_params() < params and g.cost().params == g.num_params()
    a = g.spec.blocks[0].attn
    assert g.module.get_submodule(a.proj).in_features == a.attn_dim == (heads0 - 1) * a.head_dim
    if a.bias_table:
        assert g.module.get_parameter(a.bias_table).shape[1] == a.num_heads
    if name == "swinv2":
        attn = g.module.get_submodule(a.path)
        assert attn.logit_scale.shape[0] == a.num_heads and attn.cpb_mlp[-1].out_features == a.num_heads


def test_removing_a_live_head_changes_outputs(fam) -> None:
    _, g = fam
    x = images(g)
    before = logits(g, x)
    g.keep_heads(0, [1])
    assert not torch.allclose(before, logits(g, x), atol=1e-4)


def test_cost_matches_torch_flop_counter(fam) -> None:
    _, g = fam
    b = g.spec.blocks[-1]
    g.keep_heads(b.index, [0, 1])
    g.keep_mlp_units(0, range(g.spec.blocks[0].mlp.hidden // 2))
    x = images(g, 3)
    cost = g.cost(batch=3)
    with g.export_mode() as module, FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    assert cost.macs == counter.get_total_flops() // 2
    assert cost.params == g.num_params()


def test_save_load_in_a_fresh_process(fam, tmp_path) -> None:
    _, g = fam
    first = g.spec.blocks[0]
    g.keep_heads(0, [first.attn.num_heads - 1])
    g.keep_mlp_units(1, range(0, g.spec.blocks[1].mlp.hidden, 3))
    g.reset_classifier(7)
    g.save(tmp_path / "stage")
    x = images(g)
    (y,), _ = outputs_in_a_fresh_process([tmp_path / "stage"], x, tmp_path)
    assert torch.equal(y, logits(g, x))


def test_keep_blocks_within_stages_and_reload(fam, tmp_path) -> None:
    name, g = fam
    stages: dict[int, list[int]] = {}
    for b in g.spec.blocks:
        stages.setdefault(b.stage, []).append(b.index)
    keep = sorted(ix[-1] for ix in stages.values())  # the last block of each stage
    if len(keep) == g.spec.depth:
        keep = keep[1:] if len(keep) > 1 else keep
    x = images(g)
    g.keep_blocks(keep)
    assert g.spec.depth == len(keep)
    y = logits(g, x)
    g.save(tmp_path / "s")
    assert torch.equal(logits(ModelGraph.load(tmp_path / "s"), x), y)
    if len(stages) > 1:
        with pytest.raises(EdgeVitError, match="stage .* no .*block"):
            g.keep_blocks([0])


def test_mobilevit_v2_is_refused_naming_the_model_and_the_supported_families() -> None:
    import timm

    m = timm.create_model("mobilevitv2_050", pretrained=False, num_classes=5)
    with pytest.raises(EdgeVitError) as e:
        ModelGraph.from_module(m, {"name": "mobilevitv2_050"})
    msg = str(e.value)
    assert "timm mobilevitv2_050 (ByobNet) is not a supported" in msg
    assert "timm SwinTransformer" in msg and "timm MobileViT v1" in msg and "timm Eva" in msg


# compress end to end: tiny configs given as timm model names + kwargs, as a user writes them ---------------
NAMED = {
    "swin": ("swin_tiny_patch4_window7_224", dict(TINY_SWIN, num_classes=10)),
    "swinv2": ("swinv2_tiny_window8_256", dict(TINY_SWIN, num_classes=10)),
    "beit": ("beit_base_patch16_224", dict(TINY_PLAIN, num_classes=10, mlp_ratio=2.0)),
    "eva02": ("eva02_tiny_patch14_224", dict(TINY_PLAIN, num_classes=10, ref_feat_shape=(4, 4))),
    "mobilevit": ("mobilevit_xxs", dict(num_classes=10, img_size=64)),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(NAMED))
def test_compress_prunes_exports_for_jetson_nano_and_benchmarks(family: str, tmp_path) -> None:
    import json

    from tests.conftest import run_pipeline, tiny_recipe_data

    name, kwargs = NAMED[family]
    data = tiny_recipe_data(
        profile="jetson-nano",
        model={"source": "timm", "name": name, "kwargs": kwargs},
        passes=[
            {"export": {"parity_samples": 8}},
            {"prune": {"method": "osscar", "heads": 0.5, "mlp": 0.5}},
            {"export": {"parity_samples": 8}},
            {"benchmark": {"runs": 2, "warmup": 1, "throughput_batch": 2}},
        ],
    )
    data["data"] = dict(data["data"], limit_train=64, limit_val=16)
    out = tmp_path / "run"
    run_pipeline(data, out)
    metrics = {d.name: json.loads((d / "metrics.json").read_text())["metrics"] for d in sorted(out.iterdir())
               if (d / "metrics.json").is_file()}
    before, pruned, after = metrics["01-export"], metrics["02-prune"], metrics["03-export"]
    assert before["opset"] == after["opset"] == 13
    assert after["parity"]["max_abs_diff"] < 1e-3 and after["parity"]["top1_agreement"] >= 0.99
    assert after["onnx_bytes"] < 0.8 * before["onnx_bytes"]  # the weights really left the file
    assert pruned["params_kept"] < 0.8 and all(h >= 1 for h in pruned["heads"])
    assert "04-benchmark" in metrics
    g = ModelGraph.load(out / "02-prune")  # and the pruned stage reloads from its recorded edits
    assert [b.attn.num_heads for b in g.spec.blocks] == pruned["heads"]


# passes on every family ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "taylor", "osscar"])
def test_prune_methods_on_every_family(fam, method: str) -> None:
    from edgevit.prune.importance import magnitude_scores, taylor_scores
    from edgevit.prune.plan import PlanConfig, counts_for
    from edgevit.prune.reconstruct import osscar_model

    _, g = fam
    x = images(g, 8)
    ref = logits(g, x)
    counts = counts_for(g, PlanConfig(heads=0.5, mlp=0.5, round_to=4), 0.5, 0.5)
    params = g.num_params()
    if method == "osscar":  # block by block; where a stage changes, inputs are captured afresh
        osscar_model(g, counts, x, torch.device("cpu"), batch=4)
    else:
        scores = magnitude_scores(g) if method == "magnitude" else taylor_scores(
            g, x, torch.randint(0, 5, (8,)), None, torch.device("cpu"), 4)
        for blk, (nh, nu), (hs, us) in zip(list(g.spec.blocks), counts, scores, strict=True):
            assert hs.shape == (blk.attn.num_heads,) and us.shape == (blk.mlp.hidden,)
            g.keep_heads(blk.index, sorted(torch.topk(hs, nh).indices.tolist()))
            g.keep_mlp_units(blk.index, sorted(torch.topk(us, nu).indices.tolist()))
    assert [(b.attn.num_heads, b.mlp.hidden) for b in g.spec.blocks] == counts
    assert g.num_params() < params and g.cost().params == g.num_params()
    out = logits(g, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_osscar_reconstructs_better_than_magnitude_selection(fam) -> None:
    """On its calibration images OSSCAR's pruned model stays closer to the unpruned one."""
    from edgevit.prune.importance import magnitude_scores
    from edgevit.prune.plan import PlanConfig, counts_for
    from edgevit.prune.reconstruct import osscar_model

    _, g = fam
    x = images(g, 16)
    ref = logits(g, x)
    counts = counts_for(g, PlanConfig(heads=0.5, mlp=0.5, round_to=4), 0.5, 0.5)
    mag = g.clone()
    for blk, (nh, nu), (hs, us) in zip(list(mag.spec.blocks), counts, magnitude_scores(mag), strict=True):
        mag.keep_heads(blk.index, sorted(torch.topk(hs, nh).indices.tolist()))
        mag.keep_mlp_units(blk.index, sorted(torch.topk(us, nu).indices.tolist()))
    osscar_model(g, counts, x, torch.device("cpu"), batch=8)
    err = lambda h: (logits(h, x) - ref).pow(2).mean().item()  # noqa: E731
    assert err(g) < err(mag)


def test_shrink_keeps_blocks_within_each_stage(fam) -> None:
    from edgevit.distill.student import ShrinkConfig, shrink

    name, g = fam
    stages = len({b.stage for b in g.spec.blocks})
    student, how = shrink(g, ShrinkConfig(depth=max(stages, g.spec.depth // 2), num_heads=1, mlp_ratio=1.0))
    assert {b.stage for b in student.spec.blocks} == {b.stage for b in g.spec.blocks}
    assert student.spec.depth < g.spec.depth and all(b.attn.num_heads == 1 for b in student.spec.blocks)
    assert all(b.mlp.hidden == b.dim for b in student.spec.blocks)
    assert logits(student, images(g)).shape == (2, 5)
    assert g.spec.depth == len(g.spec.blocks) and g.edits == []  # the teacher is untouched


@pytest.mark.parametrize("teacher_family", ["swin", "mobilevit"])
def test_feature_losses_match_other_token_grids(teacher_family: str) -> None:
    """A Swin or MobileViT teacher's block maps (other grids and widths) reach a plain ViT
    student through the adapters' feature maps, a projector and resampling."""
    from edgevit.distill import LossConfig
    from edgevit.distill.objective import DistillObjective, teacher_input

    module, build = FAMILIES[teacher_family]()
    t = ModelGraph.from_module(module.eval(), build)
    vit = ModelGraph.load(Path(__file__).parent / "fixtures" / "v1_stage")
    cfg = LossConfig(ce=0.0, kd=0.0, feature=1.0, mgd=1e-2, feature_layers={0: 0}, mgd_layers={1: t.spec.depth - 1})
    obj = DistillObjective(cfg, vit.module, vit.spec, t.module, t.spec,
                           teacher_input(vit.spec, None, None, t.spec.img_size), 0.0, where="passes.distill",
                           student_adapter=vit.adapter, teacher_adapter=t.adapter)
    t_last = t.spec.block(t.spec.depth - 1)
    align = obj.generators["1"].align
    assert isinstance(align, torch.nn.Linear) and align.out_features == t_last.dim
    vit.module.train().zero_grad()
    x = torch.randn(2, 3, *vit.spec.img_size)
    loss, terms = obj(vit.module, x, torch.zeros(2, dtype=torch.long))
    loss.backward()
    obj.close()
    assert set(terms) == {"feat", "mgd"} and all(v > 0 for v in terms.values())
    grads = {n: p.grad for n, p in vit.module.named_parameters() if p.grad is not None}
    assert grads[f"{vit.spec.block(0).path}.attn.qkv.weight"].abs().sum() > 0
    assert grads[f"{vit.spec.block(1).path}.mlp.fc2.weight"].abs().sum() > 0


def test_feature_maps_are_the_blocks_own_layout() -> None:
    """Swin's (B, H, W, C) output is permuted, not reshaped: position (h, w) keeps its channels."""
    module, build = _swin()
    g = ModelGraph.from_module(module.eval(), build)
    out = torch.randn(2, 4, 6, g.spec.block(0).dim)
    fmap = g.adapter.feature_map(out, g.spec.block(0), g.spec, 2)
    assert fmap.shape == (2, out.shape[-1], 4, 6) and torch.equal(fmap[1, :, 3, 5], out[1, 3, 5])


def test_side_module_tuners_refuse_staged_models_clearly() -> None:
    from edgevit.tuners import make_tuner
    from edgevit.tuners.losa import LoSAConfig

    module, build = _swin()
    g = ModelGraph.from_module(module.eval(), build)
    with pytest.raises(EdgeVitError, match="tuner losa: .*timm_swin model has stages.*use tuner full or slicefine"):
        make_tuner(LoSAConfig(name="losa")).setup(g)
    assert g.side is None and g.edits == []
