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


def _scaled_problem(seed: int, scale_group: int, c: float, groups: torch.Tensor, d: int = 12, m: int = 5):
    """The same layer twice: as drawn, and with group ``scale_group``'s input columns × c and
    its weight rows ÷ c (the same function)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(d + 1, m, generator=g, dtype=torch.float64)
    cols = groups[scale_group]
    xs, ws = x.clone(), w.clone()
    xs[:, cols] *= c
    ws[cols] /= c
    out = []
    for xx, ww in ((x, w), (xs, ws)):
        acc = GramAccumulator(d)
        acc.add(xx)
        out.append((acc.gram(1e-2), ww))
    assert torch.allclose(torch.cat([x, torch.ones(300, 1, dtype=x.dtype)], 1) @ w,
                          torch.cat([xs, torch.ones(300, 1, dtype=x.dtype)], 1) @ ws)
    return out


@pytest.mark.parametrize("shape", [(6, 2), (12, 1)])
def test_osscar_choice_does_not_depend_on_activation_scale(shape: tuple[int, int]) -> None:
    """×100 inputs and ÷100 weights on one group is the same layer: the same choice and objective
    (a ridge λ·mean(diag)·I fails this: the scaled group's ridge shrinks, the others' grows)."""
    groups = torch.arange(12).reshape(*shape)
    fixed = torch.tensor([12])
    for seed in range(6):
        (h, w), (hs, ws) = _scaled_problem(seed, seed % shape[0], 100.0, groups)
        for keep in (shape[0] // 3, shape[0] // 2):
            a = osscar_prune(h, w, groups, keep, fixed, greedy_step=1, swap_size=2)
            b = osscar_prune(hs, ws, groups, keep, fixed, greedy_step=1, swap_size=2)
            assert a.keep == b.keep, (seed, keep)
            assert b.objective == pytest.approx(a.objective, rel=1e-7)


def _small_vit(mlp_ratio: float = 2.0, seed: int = 0) -> ModelGraph:
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=4, mlp_ratio=mlp_ratio)
    torch.manual_seed(seed)
    module = VisionTransformer(**kw).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ModelGraph.from_module(module, {"architecture": "VisionTransformer", "kwargs": kw})


def test_osscar_model_keeps_the_same_heads_when_one_head_is_rescaled() -> None:
    """Head h's value rows × 100 and its output-projection columns ÷ 100: the same model, so
    the same heads stay in every block and the pruned models agree."""
    images = torch.randn(48, 3, 16, 16)
    flips = 0
    for seed in range(3):
        g = _small_vit(seed=seed)
        scaled = g.clone()
        for blk in scaled.spec.blocks:
            a, h = blk.attn, seed % blk.attn.num_heads
            rows = slice(2 * a.attn_dim + h * a.head_dim, 2 * a.attn_dim + (h + 1) * a.head_dim)
            qkv, proj = scaled.module.get_submodule(a.qkv), scaled.module.get_submodule(a.proj)
            with torch.no_grad():
                qkv.weight[rows] *= 100
                qkv.bias[rows] *= 100
                proj.weight[:, h * a.head_dim:(h + 1) * a.head_dim] /= 100
        assert torch.allclose(scaled.module(images), g.module(images), atol=1e-5)
        counts = [(2, b.mlp.hidden) for b in g.spec.blocks]
        log = osscar_model(g, counts, images, torch.device("cpu"))
        log_s = osscar_model(scaled, counts, images, torch.device("cpu"))
        assert [e["heads_kept"] for e in log_s] == [e["heads_kept"] for e in log]
        assert torch.allclose(scaled.module(images), g.module(images), atol=1e-4)
        flips += [e["heads_kept"] for e in log_s] != [e["heads_kept"] for e in log]
    assert flips == 0


def _brute_force_best(block_in: list[torch.Tensor], block: torch.nn.Module, path: str, graph: ModelGraph,
                      groups: torch.Tensor, keep: int) -> tuple[list[int], float]:
    """Every ``keep``-subset of ``groups``, each with its ridge least-squares re-fit."""
    linear = graph.module.get_submodule(path)
    acc = GramAccumulator(linear.in_features)
    hook = linear.register_forward_pre_hook(lambda _m, a: acc.add(a[0]))
    run_block(block, block_in)
    hook.remove()
    h = acc.gram(1e-2)
    w = torch.cat([linear.weight.detach().T, linear.bias.detach()[None]]).double()
    fixed = torch.tensor([linear.in_features])
    scored = [(selection_objective(h, w, torch.cat([groups[list(c)].reshape(-1), fixed]), True), list(c))
              for c in itertools.combinations(range(groups.shape[0]), keep)]
    best = min(scored)
    return best[1], best[0]


def test_osscar_model_picks_the_brute_force_best_heads_and_units_in_every_block() -> None:
    """Whole model, block by block on the pruned predecessors' outputs: every head set and every
    unit set OSSCAR keeps is the best of all subsets (a norm-based selector is not)."""
    import copy

    from edgevit.prune.groups import unit_columns

    images = torch.randn(64, 3, 16, 16)
    for seed in range(2):
        original = _small_vit(mlp_ratio=0.25, seed=seed)  # 4 heads of 8, 8 MLP units per block
        g = original.clone()
        counts = [(2, 4) for _ in g.spec.blocks]
        log = osscar_model(g, counts, images, torch.device("cpu"), batch=64)
        xs = block0_inputs(original, images, torch.device("cpu"), 64)
        for b, entry in enumerate(log):
            blk = original.spec.block(b)
            block = copy.deepcopy(original.module.get_submodule(blk.path))
            host = original.clone()  # the unpruned block b, fed by the pruned blocks before it
            heads, value = _brute_force_best(xs, host.module.get_submodule(blk.path), blk.attn.proj, host,
                                             head_columns(blk), 2)
            assert entry["heads_kept"] == heads and entry["heads_objective"] == pytest.approx(value, rel=1e-9)
            hybrid = g.clone()  # block b with its pruned, re-fitted attention and its original MLP
            pruned_block = hybrid.module.get_submodule(blk.path)
            pruned_block.mlp = block.mlp
            units, value = _brute_force_best(xs, pruned_block, blk.mlp.fc2, hybrid, unit_columns(blk), 4)
            assert entry["units_objective"] == pytest.approx(value, rel=1e-9)
            kept_fc1 = g.module.get_submodule(g.spec.block(b).mlp.fc1).weight
            assert torch.allclose(kept_fc1, block.mlp.fc1.weight[units])  # the same units stayed
            xs = run_block(g.module.get_submodule(blk.path), xs)


def test_recovery_distils_from_a_named_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """recover.teacher: an earlier run's stage directory is the teacher, not the unpruned model."""
    from safetensors.torch import load_file

    import edgevit.passes.prune as prune_pass

    first = tiny_recipe_data(passes=[{"adapt": {"epochs": 1, "lr": 0.003, "warmup_epochs": 0}}], seed=1)
    run_pipeline(first, tmp_path / "teacher")
    stage = tmp_path / "teacher" / "01-adapt"
    seen = []

    class Spy(prune_pass.DistillObjective):
        def __init__(self, cfg, student, s_spec, teacher, *a, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
            seen.append({k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()})
            super().__init__(cfg, student, s_spec, teacher, *a, **kw)

    monkeypatch.setattr(prune_pass, "DistillObjective", Spy)
    data = tiny_recipe_data(passes=[
        {"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
        {"prune": {"method": "magnitude", "mlp": 0.5, "recover": {
            "epochs": 1, "lr": 0.001, "warmup_epochs": 0, "kd_loss": "mse",
            "teacher": {"source": "edgevit", "path": str(stage)}}}},
    ])
    run_pipeline(data, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "02-prune" / "metrics.json").read_text())["metrics"]
    assert m["recover_teacher"] == {"source": "edgevit", "path": str(stage)}
    saved, adapted = load_file(str(stage / "model.safetensors")), load_file(
        str(tmp_path / "run" / "01-adapt" / "model.safetensors"))
    assert len(seen) == 1 and seen[0].keys() == saved.keys()
    assert all(torch.equal(seen[0][k], saved[k]) for k in saved)  # the named teacher's weights
    assert not all(torch.equal(seen[0][k], adapted[k]) for k in adapted)  # not the unpruned model's
    assert set(m["recover"]["log"][0]) >= {"ce", "kd"}


def test_latency_target_probes_each_shape_once_with_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ONNX Runtime session per distinct pruned shape, and the same prediction the
    predictor gives for the chosen shape."""
    import onnxruntime as ort
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.predict.device import predict_graph_latency
    from edgevit.profiles import load_profile

    profile = load_profile("jetson-nano")
    kw = dict(img_size=64, patch_size=4, num_classes=10, embed_dim=128, depth=2, num_heads=4, mlp_ratio=4.0)
    g = ModelGraph.from_module(VisionTransformer(**kw).eval(), {"architecture": "VisionTransformer", "kwargs": kw})
    sessions = []
    real = ort.InferenceSession

    def counting(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        sessions.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    counts, aim = plan(g, PlanConfig(target=Target(metric="latency", keep=0.9), round_to=4), profile)
    assert len(sessions) == aim["latency_probes"] <= 12
    monkeypatch.setattr(ort, "InferenceSession", real)
    pruned = g.clone()
    for blk, (nh, nu) in zip(list(pruned.spec.blocks), counts, strict=True):
        pruned.keep_heads(blk.index, range(nh))
        pruned.keep_mlp_units(blk.index, range(nu))
    assert aim["predicted_ms_after"] == pytest.approx(predict_graph_latency(pruned, profile), abs=1e-3)
    assert aim["predicted_ms_before"] == pytest.approx(predict_graph_latency(g, profile), abs=1e-3)
    assert aim["predicted_ms_after"] <= 0.9 * aim["predicted_ms_before"]


def _devices_of(graph: ModelGraph, counts: list[tuple[int, int]], images: torch.Tensor,
                device: torch.device) -> tuple[set[torch.device], list[dict]]:
    """Run OSSCAR on ``device``; the devices every Gram matrix and solve ran on."""
    import edgevit.prune.reconstruct as rec

    seen: set[torch.device] = set()
    real = rec.osscar_prune

    def spy(h, w_hat, groups, keep, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = real(h, w_hat, groups, keep, *a, **kw)
        seen.update({h.device, out.weight.device})
        assert h.dtype == out.weight.dtype == torch.float64
        return out

    rec.osscar_prune = spy
    try:
        log = osscar_model(graph, counts, images, device)
    finally:
        rec.osscar_prune = real
    return seen, log


def test_osscar_gram_and_solver_run_on_the_runs_device_in_float64() -> None:
    acc = GramAccumulator(4, "meta")
    acc.add(torch.randn(3, 4, device="meta"))
    assert acc.h.device.type == "meta" and acc.h.dtype == torch.float64
    g = _small_vit()
    seen, _ = _devices_of(g, [(2, 32) for _ in g.spec.blocks], torch.randn(16, 3, 16, 16), torch.device("cpu"))
    assert seen == {torch.device("cpu")}


@pytest.mark.gpu
def test_osscar_on_cuda_matches_the_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = torch.randn(32, 3, 16, 16)
    counts = [(2, 32), (3, 24)]
    cpu, gpu = _small_vit(), _small_vit()
    _, log_cpu = _devices_of(cpu, counts, images, torch.device("cpu"))
    seen, log_gpu = _devices_of(gpu, counts, images, torch.device("cuda"))
    assert {d.type for d in seen} == {"cuda"}
    assert [e["heads_kept"] for e in log_gpu] == [e["heads_kept"] for e in log_cpu]
    gpu.module.cpu()
    assert torch.allclose(gpu.module(images), cpu.module(images), atol=1e-4)
