"""Tuners: SliceFine moves one trained slice through existing weights and adds nothing; LoSA
and disentangled train only a side module while the backbone neither changes nor builds a
backward graph; every tuned model saves, reloads and exports with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.tuners import make_tuner
from edgevit.tuners.disentangled import DisentangledConfig
from edgevit.tuners.losa import LoSAConfig
from edgevit.tuners.slicefine import SliceFineConfig
from tests.conftest import TIMM_KWARGS, run_pipeline, tiny_recipe_data


def _graph() -> ModelGraph:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    build = {"architecture": "VisionTransformer", "kwargs": TIMM_KWARGS}
    return ModelGraph.from_module(VisionTransformer(**TIMM_KWARGS), build)


def _steps(graph: ModelGraph, tuner, params, n: int, on_step=None) -> None:  # noqa: ANN001
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2, weight_decay=0.0)
    tuner.start(0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 5, (8,))
    graph.module.train()
    for step in range(n):
        loss = nn.functional.cross_entropy(graph.module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tuner.after_step(step, opt)
        if on_step:
            on_step(step)


def test_slicefine_trains_only_the_active_slice_and_moves_it_every_n_steps() -> None:
    g = _graph()
    keys = {k: v.shape for k, v in g.module.state_dict().items()}
    n_params = g.num_params()
    cfg = SliceFineConfig(name="slicefine", layers=["fc1"], blocks=[0], rank=2, switch_every=3, train_head=False)
    tuner = make_tuner(cfg)
    params = tuner.setup(g)
    assert sum(p.numel() for _, p in params) == 2 * g.spec.block(0).mlp.hidden  # rank x rows of fc1
    fc1 = g.module.get_submodule("blocks.0.mlp.fc1")
    frozen = {n: p.detach().clone() for n, p in g.module.named_parameters() if "fc1" not in n}
    changed_cols: list[set[int]] = []
    before = [fc1.weight.detach().clone()]

    def record(step: int) -> None:
        now = fc1.weight.detach().clone()
        diff = (now - before[-1]).abs().sum(dim=0)
        changed_cols.append({int(c) for c in torch.nonzero(diff).flatten()})
        before.append(now)

    _steps(g, tuner, params, 9, record)
    # steps 0-2 touch columns 0-1 only, steps 3-5 columns 2-3, steps 6-8 columns 4-5
    assert changed_cols[:3] == [{0, 1}] * 3 and changed_cols[3:6] == [{2, 3}] * 3 and changed_cols[6:] == [{4, 5}] * 3
    assert tuner.switches == 3
    tuner.finish(g)
    assert {k: v.shape for k, v in g.module.state_dict().items()} == keys and g.num_params() == n_params
    final = g.module.get_submodule("blocks.0.mlp.fc1").weight.detach()
    assert torch.equal(final, before[-1])  # the trained slices were written back
    assert (final - before[0]).abs().sum(dim=0)[6:].eq(0).all()  # columns never active are untouched
    for n, p in g.module.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_slicefine_rows_and_random_order_are_seeded() -> None:
    def run() -> torch.Tensor:
        g = _graph()
        t = make_tuner(SliceFineConfig(name="slicefine", layers=["qkv", "fc2"], rank=1, axis="alternate",
                                       switch_every=2, order="random", seed=3))
        _steps(g, t, t.setup(g), 6)
        t.finish(g)
        return g.module.get_submodule("blocks.1.attn.qkv").weight.detach().clone()

    torch.manual_seed(0)
    a = run()
    torch.manual_seed(0)
    assert torch.equal(a, run())


@pytest.mark.parametrize("cfg", [LoSAConfig(name="losa", rank=4, token_rank=4),
                                 DisentangledConfig(name="disentangled", num_queries=2, adapter_dim=8)],
                         ids=["losa", "disentangled"])
def test_side_tuners_leave_the_backbone_unchanged_and_without_a_backward_graph(cfg) -> None:  # noqa: ANN001
    g = _graph()
    backbone = {n: p.detach().clone() for n, p in g.module.named_parameters()}
    tuner = make_tuner(cfg)
    params = tuner.setup(g)
    assert all(n.startswith("side.") for n, _ in params) and tuner.summary()["added_params"] > 0
    grad_in_blocks = []
    for blk in g.spec.blocks:
        g.module.get_submodule(blk.path).register_forward_hook(
            lambda m, a, out: grad_in_blocks.append(torch.is_grad_enabled() or out.requires_grad))
    side_before = {n: p.detach().clone() for n, p in params}
    _steps(g, tuner, params, 3)
    assert grad_in_blocks and not any(grad_in_blocks)  # the backbone ran without autograd, every step
    for n, p in g.backbone.named_parameters():
        assert torch.equal(p.detach(), backbone[n]), n
        assert p.grad is None, n
    assert any(not torch.equal(p.detach(), side_before[n]) for n, p in params)  # the side module learned
    tuner.finish(g)


def _tuner_recipe(tuner: dict) -> dict:
    data = tiny_recipe_data(model={"source": "timm", "architecture": "VisionTransformer",
                                   "kwargs": dict(TIMM_KWARGS, img_size=16, patch_size=4, num_classes=10)})
    data["passes"] = [{"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0, "tuner": tuner}},
                      {"export": {"opset": 13, "parity_samples": 16}}]
    return data


@pytest.mark.parametrize("tuner", [{"name": "slicefine", "rank": 2, "switch_every": 5},
                                   {"name": "losa", "rank": 4, "token_rank": 4},
                                   {"name": "disentangled", "num_queries": 2, "adapter_dim": 8}],
                         ids=lambda t: t["name"])
def test_tuned_models_save_reload_and_export_with_parity(tuner: dict, tmp_path: Path) -> None:
    report, log = run_pipeline(_tuner_recipe(tuner), tmp_path / "run")
    stage = tmp_path / "run" / "01-adapt"
    m = json.loads((stage / "metrics.json").read_text())["metrics"]
    assert m["tuner"]["name"] == tuner["name"] and f"tuner {tuner['name']}" in log
    g = ModelGraph.load(stage)
    source = ModelGraph.load(tmp_path / "run" / "00-source")
    if tuner["name"] == "slicefine":
        assert m["tuner"]["added_params"] == 0 and g.num_params() == source.num_params()
        assert set(g.module.state_dict()) == set(source.module.state_dict())
        assert m["tuner"]["trainable_params"] < source.num_params()
    else:
        assert g.side is not None and g.side.kind == tuner["name"]
        assert g.num_params() == source.num_params() + m["tuner"]["added_params"]
        for n, p in g.backbone.named_parameters():  # frozen: exactly the source's weights
            assert torch.equal(p, source.module.get_submodule(n.rsplit(".", 1)[0]).get_parameter(
                n.rsplit(".", 1)[1]) if "." in n else source.module.get_parameter(n)), n
        rows = {s["stage"]: s for s in report["stages"]}
        assert rows["01-adapt"]["flops"] > rows["00-source"]["flops"]  # the side module's cost shows
    x = torch.randn(4, 3, 16, 16)
    saved = json.loads((stage / "graph.json").read_text())
    with torch.no_grad():
        again = ModelGraph.load(stage).module.eval()(x)
        assert torch.allclose(g.module.eval()(x), again)
    ex = json.loads((tmp_path / "run" / "02-export" / "metrics.json").read_text())["metrics"]
    assert ex["parity"]["max_abs_diff"] < 1e-3 and ex["parity"]["top1_agreement"] == 1.0
    sides = [e["args"]["side"] for e in saved["edits"] if e["kind"] == "attach_side"]
    assert sides == ([] if tuner["name"] == "slicefine" else [tuner["name"]])
    if tuner["name"] != "slicefine":
        from edgevit.onnx_io import session

        sess = session(tmp_path / "run" / "02-export" / "model.onnx")
        out = sess.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(out, again.numpy(), atol=1e-4)


def test_distill_and_recovery_select_a_tuner_and_the_report_names_it(tmp_path: Path) -> None:
    data = tiny_recipe_data(model={"source": "timm", "architecture": "VisionTransformer",
                                   "kwargs": dict(TIMM_KWARGS, img_size=16, patch_size=4, num_classes=10)})
    data["passes"] = [
        {"adapt": {"epochs": 1, "lr": 0.003, "warmup_epochs": 0}},
        {"distill": {"student": {"shrink": {"depth": 1}}, "epochs": 1, "warmup_epochs": 0,
                     "tuner": {"name": "slicefine", "rank": 1}}},
        {"prune": {"method": "magnitude", "mlp": 0.5, "recover": {"epochs": 1, "warmup_epochs": 0, "tuner": "losa"}}},
    ]
    report, log = run_pipeline(data, tmp_path / "run")
    notes = (tmp_path / "run" / "report.md").read_text()
    assert "tuner losa:" in notes and "tuner slicefine:" in notes and "none added" in notes
    pruned = ModelGraph.load(tmp_path / "run" / "03-prune")
    assert pruned.side is not None and pruned.side.kind == "losa"  # recovery trained a side network
    assert pruned.spec.blocks[0].mlp.hidden < ModelGraph.load(tmp_path / "run" / "02-distill").spec.blocks[0].mlp.hidden
    # a side-tuned model cannot then be fine-tuned through its frozen backbone: one clear error
    data["passes"].append({"prune": {"method": "magnitude", "mlp": 0.25, "recover": {
        "epochs": 1, "warmup_epochs": 0, "tuner": "slicefine"}}})
    with pytest.raises(EdgeVitError, match="train it with tuner losa"):
        run_pipeline(data, tmp_path / "run")


def test_distill_with_a_side_tuner_distills_logits_only(tmp_path: Path) -> None:
    data = tiny_recipe_data(model={"source": "timm", "architecture": "VisionTransformer",
                                   "kwargs": dict(TIMM_KWARGS, img_size=16, patch_size=4, num_classes=10)})
    data["passes"] = [{"distill": {"student": {"shrink": {"depth": 1}}, "epochs": 1, "warmup_epochs": 0,
                                   "tuner": {"name": "disentangled", "num_queries": 1, "adapter_dim": 8}}}]
    _, log = run_pipeline(data, tmp_path / "run")
    assert "feature mimicking and MGD are off" in log
    assert ModelGraph.load(tmp_path / "run" / "01-distill").side.kind == "disentangled"


def test_a_tuner_name_typo_is_one_clear_line(tmp_path: Path, write_recipe) -> None:
    from tests.conftest import run_cli

    res = run_cli("compress", str(write_recipe(_tuner_recipe({"name": "slicefin"}))), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "tuner" in res.stderr


def test_slicefine_slices_move_and_take_no_weight_decay() -> None:
    """Every switch period trains another slice position, and AdamW's decay never touches the
    slice entries (it would pull pretrained weights toward zero)."""
    from edgevit.training.loop import _param_groups

    def changed(cfg: SliceFineConfig) -> torch.Tensor:
        g = _graph()
        t = make_tuner(cfg)
        before = g.module.get_submodule("blocks.1.attn.qkv").weight.detach().clone()
        _steps(g, t, t.setup(g), 6)
        t.finish(g)
        return (g.module.get_submodule("blocks.1.attn.qkv").weight.detach() - before).abs()

    diff = changed(SliceFineConfig(name="slicefine", layers=["qkv"], rank=1, switch_every=2, order="random",
                                   seed=3, train_head=False))
    assert len(set(torch.nonzero(diff.sum(0)).flatten().tolist())) >= 2  # seeded random columns: it moved
    diff = changed(SliceFineConfig(name="slicefine", layers=["qkv"], rank=1, axis="alternate", switch_every=2,
                                   train_head=False))
    expected = torch.zeros_like(diff, dtype=torch.bool)
    expected[:, 0] = expected[0, :] = expected[:, 1] = True  # sweep: column 0, then row 0, then column 1
    assert torch.equal(diff > 0, expected)
    g = _graph()
    t = make_tuner(SliceFineConfig(name="slicefine", rank=2, train_head=False))
    params = t.setup(g)
    groups = _param_groups(params, 0.05, frozenset(t.no_weight_decay))
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and not any(id(p) in decayed for n, p in params if ".slice." in n)
    t.finish(g)


def test_slicefine_alternate_counts_one_active_axis() -> None:
    g = _graph()
    t = make_tuner(SliceFineConfig(name="slicefine", layers=["fc1"], blocks=[0], rank=2, axis="alternate",
                                   train_head=False))
    params = t.setup(g)
    fc1 = g.spec.block(0).mlp
    cols, rows = 2 * fc1.hidden, 2 * g.spec.embed_dim  # fc1 weight is (hidden, embed)
    assert sum(p.numel() for _, p in params) == cols + rows  # both value tensors exist ...
    assert t.summary()["trainable_params"] == max(cols, rows)  # ... but one axis trains at a time
    t.finish(g)


def _side_step(cfg) -> ModelGraph:  # noqa: ANN001
    g = _graph()
    tuner = make_tuner(cfg)
    params = tuner.setup(g)
    _steps(g, tuner, params, 3)  # up-projections start at zero: train a little first
    tuner.finish(g)
    g.module.eval()
    return g


def test_losa_mixes_tokens_and_reads_every_block() -> None:
    """Token 0 of one block's output moves token 5 of the side features (token mixing), and
    every block's output changes the logits (not only the last one is read)."""
    from edgevit.graph.extension import BlockFeatures

    g = _side_step(LoSAConfig(name="losa", rank=4, token_rank=4))
    side, spec = g.side, g.spec
    assert side.reads(spec) == [b.index for b in spec.blocks]
    torch.manual_seed(1)
    outs = [torch.randn(2, spec.num_tokens, spec.embed_dim) for _ in spec.blocks]

    def feats(i: int | None = None, token: int | None = None) -> list[BlockFeatures]:
        fs = [BlockFeatures(output=o.clone()) for o in outs]
        if i is not None:  # a random change (a constant one would vanish in the LayerNorms)
            g_ = torch.Generator().manual_seed(i)
            if token is None:
                fs[i].output += torch.randn(fs[i].output.shape, generator=g_)
            else:
                fs[i].output[:, token] += torch.randn(fs[i].output[:, token].shape, generator=g_)
        return fs

    with torch.no_grad():
        base = side.refine(feats())
        moved = side.refine(feats(0, token=0))
        assert (moved[:, 5] - base[:, 5]).abs().max() > 1e-6  # token 5 sees token 0 of block 0
        logits = side(feats(), spec, g.backbone)
        for i in range(spec.depth):
            assert (side(feats(i), spec, g.backbone) - logits).abs().max() > 1e-6, f"block {i} is not read"


def test_disentangled_never_changes_the_image_tokens_and_its_logits_depend_on_the_queries() -> None:
    g = _side_step(DisentangledConfig(name="disentangled", num_queries=2, adapter_dim=8))
    x = torch.randn(3, 3, 32, 32)
    outs: dict[str, list[torch.Tensor]] = {"plain": [], "tuned": []}
    for key, run in (("plain", lambda: g.backbone(x)), ("tuned", lambda: g.module(x))):
        hooks = [g.backbone.get_submodule(b.path).register_forward_hook(
            lambda _m, _a, out, k=key: outs[k].append(out.detach().clone())) for b in g.spec.blocks]
        with torch.no_grad():
            run()
        for h in hooks:
            h.remove()
    assert len(outs["tuned"]) == g.spec.depth
    assert all(torch.equal(a, b) for a, b in zip(outs["plain"], outs["tuned"], strict=True))  # bit-identical
    with torch.no_grad():
        logits = g.module(x)
        g.side.queries.add_(torch.randn_like(g.side.queries))
        assert (g.module(x) - logits).abs().max() > 1e-4  # the logits come from the queries


@pytest.mark.parametrize("extras", [dict(act_layer=nn.SiLU), dict(init_values=0.3, qk_norm=True)],
                         ids=["silu", "layerscale_qknorm"])
def test_knowledge_extraction_is_the_blocks_own_forward_with_queries_attending_to_image_tokens(extras) -> None:
    """The queries' outputs equal the block's own forward on [image tokens, queries] with an
    attention mask that lets every token see the image tokens only (so image tokens see
    exactly what they saw before): whatever the activation, layer scale or query/key norm."""
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.graph.extension import BlockFeatures
    from edgevit.tuners.disentangled import _extract

    kw = dict(TIMM_KWARGS, **extras)
    torch.manual_seed(0)
    module = VisionTransformer(**kw).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = ModelGraph.from_module(module, {"architecture": "VisionTransformer", "kwargs": kw})
    make_tuner(DisentangledConfig(name="disentangled", num_queries=3)).setup(g)
    blk = g.spec.block(1)
    block = g.backbone.get_submodule(blk.path)
    n, t = g.spec.num_tokens, 3
    x, p = torch.randn(2, n, g.spec.embed_dim), torch.randn(2, t, g.spec.embed_dim)
    with torch.no_grad():
        f = BlockFeatures(projections={blk.attn.qkv: block.attn.qkv(block.norm1(x))})
        out, _, _ = _extract(p, blk, f, g.adapter.block_branches(g.backbone, blk), g.backbone)
        mask = torch.zeros(n + t, n + t)
        mask[:, n:] = float("-inf")  # nobody attends to the queries
        ref = block(torch.cat([x, p], dim=1), attn_mask=mask)
    assert torch.allclose(ref[:, :n], block(x), atol=1e-5)
    assert torch.allclose(out, ref[:, n:], atol=1e-5), (out - ref[:, n:]).abs().max()
