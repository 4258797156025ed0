"""The prune pass: groups really leave the weights, OSSCAR's selection and re-fit, targets."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.prune.groups import head_columns
from edgevit.prune.importance import magnitude_scores, taylor_scores
from edgevit.prune.osscar import GramAccumulator, osscar_prune, selection_objective
from edgevit.prune.plan import PlanConfig, Target, _slopes, plan
from edgevit.prune.reconstruct import block0_inputs, osscar_model, refit_layer, run_block
from tests.conftest import REPO, run_pipeline, tiny_recipe_data


def _problem(d: int = 12, m: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, d, generator=g) @ torch.randn(d, d, generator=g) + torch.randn(d, generator=g)
    acc = GramAccumulator(d)
    acc.add(x)
    return acc.gram(1e-2), torch.randn(d + 1, m, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_osscar_matches_brute_force_on_small_layers(seed: int) -> None:
    h, w = _problem(seed=seed)
    groups, fixed = torch.arange(12).reshape(6, 2), torch.tensor([12])
    for keep in range(1, 6):
        r = osscar_prune(h, w, groups, keep, fixed)
        best = min(selection_objective(h, w, torch.cat([groups[list(c)].reshape(-1), fixed]), True)
                   for c in itertools.combinations(range(6), keep))
        assert r.objective == pytest.approx(best, rel=1e-9)
        assert r.objective <= r.greedy_objective + 1e-9  # local search never makes it worse
        direct = selection_objective(h, w, torch.cat([groups[r.keep].reshape(-1), fixed]), True)
        assert r.objective == pytest.approx(direct, rel=1e-9)  # the incremental objective is exact


def test_local_search_swaps_improve_on_greedy() -> None:
    improved = 0
    for seed in range(30):
        h, w = _problem(d=24, m=3, seed=seed)
        groups = torch.arange(24).reshape(24, 1)
        r = osscar_prune(h, w, groups, 6, torch.tensor([24]), swap_budget=30)
        assert r.objective <= r.greedy_objective * (1 + 1e-12)
        improved += r.swaps > 0 and r.objective < r.greedy_objective
    assert improved > 0  # on some problems greedy is not optimal and the swaps find better


def test_keeping_everything_changes_nothing(tiny_graph) -> None:
    h, w = _problem()
    r = osscar_prune(h, w, torch.arange(12).reshape(6, 2), 6, torch.tensor([12]))
    assert torch.allclose(r.weight, w, atol=1e-8)
    x = torch.randn(8, 3, 32, 32)
    ref = tiny_graph.module(x)
    g = tiny_graph.clone()
    counts = [(b.attn.num_heads, b.mlp.hidden) for b in g.spec.blocks]
    osscar_model(g, counts, x, torch.device("cpu"))
    assert torch.allclose(g.module(x), ref, atol=1e-6)
    assert plan(g, PlanConfig())[0] == counts


def test_pruned_spec_matches_modules_in_every_family(tiny_graph) -> None:
    g = tiny_graph.clone()
    counts = [(2, 24) for _ in g.spec.blocks]
    osscar_model(g, counts, torch.randn(16, 3, 32, 32), torch.device("cpu"))
    described = g.adapter.describe(g.module, mean=g.spec.mean, std=g.spec.std)
    assert described.model_dump() == g.spec.model_dump()
    for blk in g.spec.blocks:
        assert (blk.attn.num_heads, blk.mlp.hidden) == (2, 24)
        assert g.module.get_submodule(blk.attn.proj).in_features == 2 * blk.attn.head_dim
        assert g.module.get_submodule(blk.mlp.fc1).out_features == 24
    g.module(torch.randn(2, 3, 32, 32))


def test_refit_reconstructs_no_worse_than_plain_selection(tiny_graph) -> None:
    g = tiny_graph.clone()
    images = torch.randn(32, 3, 32, 32)
    xs = block0_inputs(g, images, torch.device("cpu"), 16)
    blk = g.spec.block(0)
    block = g.module.get_submodule(blk.path)
    proj = g.module.get_submodule(blk.attn.proj)
    original = proj.weight.detach().clone(), proj.bias.detach().clone()
    captured = []
    hook = proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach()))
    run_block(block, xs)
    hook.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    target = x @ original[0].T + original[1]
    res, h = refit_layer(g, blk.attn.proj, block, xs, head_columns(blk), 2, 1e-2, 10)
    cols = head_columns(blk)[res.keep].reshape(-1)
    refit_err = ((x[:, cols] @ proj.weight[:, cols].T.detach() + proj.bias.detach()) - target).pow(2).sum()
    plain_err = ((x[:, cols] @ original[0][:, cols].T + original[1]) - target).pow(2).sum()
    assert refit_err <= plain_err * (1 + 1e-6) and refit_err < plain_err
    fixed = torch.tensor([proj.in_features])
    w_hat = torch.cat([original[0].T, original[1][None]]).double()
    assert selection_objective(h, w_hat, torch.cat([cols, fixed]), True) <= \
        selection_objective(h, w_hat, torch.cat([cols, fixed]), False)


def test_magnitude_and_taylor_drop_a_dead_head() -> None:
    from tests.conftest import _timm_vit

    module, build = _timm_vit()
    g = ModelGraph.from_module(module.eval(), build)
    a = g.spec.block(0).attn
    with torch.no_grad():  # head 1 of block 0 does nothing: zero proj columns
        g.module.get_submodule(a.proj).weight[:, a.head_dim:2 * a.head_dim] = 0
    mag = magnitude_scores(g)[0][0]
    tay = taylor_scores(g, torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)), None, torch.device("cpu"))[0][0]
    assert mag.argmin() == 1 and tay[1] == 0 and tay.max() > 0


def test_targets_are_met_within_one_group_step(tiny_graph) -> None:
    for metric, keep in (("flops", 0.6), ("params", 0.7)):
        cfg = PlanConfig(target=Target(metric=metric, keep=keep), round_to=4)
        counts, aim = plan(tiny_graph, cfg)
        g = tiny_graph.clone()
        for blk, (nh, nu) in zip(list(g.spec.blocks), counts, strict=True):
            g.keep_heads(blk.index, range(nh))
            g.keep_mlp_units(blk.index, range(nu))
        total, dh, du = _slopes(tiny_graph, metric)
        achieved = getattr(g.cost(), metric) / total
        step = (sum(dh) + 4 * sum(du)) / total  # one head and one round_to of units in every block
        assert achieved <= keep + 1e-9 and keep - achieved <= step, (metric, achieved, step)
    with pytest.raises(EdgeVitError, match="out of reach"):
        plan(tiny_graph, PlanConfig(target=Target(keep=0.01)))



@pytest.mark.parametrize("method", ["osscar", "taylor"])
def test_pruned_model_saves_reloads_in_a_fresh_process_and_exports(tmp_path: Path, method: str) -> None:
    data = tiny_recipe_data(passes=[
        {"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
        {"prune": {"method": method, "heads": 0.5, "mlp": 0.5, "round_to": 8}},
        {"export": {"opset": 13, "parity_samples": 16}},
    ])
    report, _ = run_pipeline(data, tmp_path / "run")
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["02-prune"]["params"] < rows["01-adapt"]["params"]
    assert rows["02-prune"]["flops"] < rows["01-adapt"]["flops"]
    stage = tmp_path / "run" / "02-prune"
    m = json.loads((stage / "metrics.json").read_text())["metrics"]
    assert m["heads"] == [1, 1] and m["mlp_units"] == [32, 32]
    g = ModelGraph.load(stage)
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from edgevit.graph import ModelGraph; g = ModelGraph.load(sys.argv[1]); "
            "x = torch.load(sys.argv[2], weights_only=True); print(repr(g.module(x).sum().item()))")
    out = subprocess.run([sys.executable, "-c", code, str(stage), str(tmp_path / "x.pt")], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    assert float(out) == pytest.approx(g.module(x).sum().item(), abs=1e-5)
    export = json.loads((tmp_path / "run" / "03-export" / "metrics.json").read_text())["metrics"]
    assert export["parity"]["top1_agreement"] >= 0.99


def test_recovery_distils_from_the_unpruned_model(tmp_path: Path) -> None:
    data = tiny_recipe_data(passes=[
        {"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
        {"prune": {"method": "magnitude", "mlp": 0.5, "recover": {"epochs": 1, "lr": 0.001, "warmup_epochs": 0}}},
    ])
    run_pipeline(data, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "02-prune" / "metrics.json").read_text())["metrics"]
    assert set(m["recover"]["log"][0]) >= {"ce", "kd", "val_top1"}
    assert "magnitude pruning kept" in (tmp_path / "run" / "report.md").read_text()
    assert ModelGraph.load(tmp_path / "run" / "02-prune").spec.block(0).mlp.hidden == 32


def test_global_allocation_takes_from_the_weakest_block_and_keeps_a_floor() -> None:
    from edgevit.prune.plan import global_counts
    from tests.conftest import _timm_vit

    module, build = _timm_vit()
    g = ModelGraph.from_module(module.eval(), build)
    scores = magnitude_scores(g)
    base = global_counts(g, PlanConfig(allocation="global", round_to=1, min_keep=0.25), scores, 0.25, 0.25)
    assert sum(h for h, _ in base) == 6 and sum(u for _, u in base) == 96  # 25 % of 8 heads, of 128 units
    scaled = [scores[0], (scores[1][0] * 0.01, scores[1][1] * 0.01)]  # scores are normalised per block
    assert global_counts(g, PlanConfig(allocation="global", round_to=1, min_keep=0.25), scaled, 0.25, 0.25) == base
    weak = [(torch.tensor([1.0, 1.0, 1.0, 1.0]), scores[0][1]),
            (torch.tensor([1.0, 0.01, 0.01, 0.01]), scores[1][1])]  # three weak heads in block 1
    counts = global_counts(g, PlanConfig(allocation="global", min_keep=0.25), weak, 0.5, 0.0)
    assert [h for h, _ in counts] == [3, 1]  # block 1's three weak heads, then the next lowest, in block 0
    counts = global_counts(g, PlanConfig(allocation="global", min_keep=0.5), weak, 0.5, 0.0)
    assert [h for h, _ in counts] == [2, 2]  # block 1 stops at its floor (half), block 0 gives the rest
    with pytest.raises(EdgeVitError, match="global allocation"):
        from edgevit.context import RunContext  # noqa: F401
        from edgevit.passes.prune import PrunePass

        PrunePass(PrunePass.Config(method="osscar", allocation="global", mlp=0.5)).run(g, None)  # type: ignore[arg-type]
