"""The distill pass: every loss term reaches the student, layer maps and projectors bridge
depth/width mismatch, training-only modules never leave training, resume, shrink init."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from edgevit.distill import DistillObjective, LossConfig, ShrinkConfig, shrink
from edgevit.distill.objective import default_layers, teacher_input
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from tests.conftest import run_pipeline, tiny_recipe_data

TEACHER = dict(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)


def _timm(arch: str = "VisionTransformer", **kw) -> ModelGraph:
    import timm.models.deit as deit
    import timm.models.vision_transformer as vt

    cls = {"VisionTransformer": vt.VisionTransformer, "VisionTransformerDistilled": deit.VisionTransformerDistilled}
    kwargs = dict(TEACHER, **kw)
    module = cls[arch](**kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ModelGraph.from_module(module.eval(), {"architecture": arch, "kwargs": kwargs}, mean=(0.5,) * 3,
                                  std=(0.5,) * 3)


def _objective(cfg: LossConfig, student: ModelGraph, teacher: ModelGraph) -> DistillObjective:
    return DistillObjective(cfg, student.module, student.spec, teacher.module, teacher.spec,
                            teacher_input(student.spec, teacher.spec.mean, teacher.spec.std, teacher.spec.img_size))


def _grads(cfg: LossConfig, student: ModelGraph, teacher: ModelGraph, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    obj = _objective(cfg, student, teacher)
    student.module.train().zero_grad(set_to_none=True)
    loss, terms = obj(student.module, images, labels)
    loss.backward()
    obj.close()
    return {n: p.grad.clone() for n, p in student.module.named_parameters() if p.grad is not None}


TERMS = {"ce": dict(ce=1.0), "kd": dict(kd=1.0), "feature": dict(feature=1.0), "mgd": dict(mgd=1e-2)}
OFF = dict(ce=0.0, kd=0.0, feature=0.0, mgd=0.0)


@pytest.mark.parametrize("term", list(TERMS))
def test_each_loss_term_changes_the_students_gradient(term: str) -> None:
    teacher = _timm()
    student, _ = shrink(teacher, ShrinkConfig(depth=2, num_heads=2, mlp_ratio=1.0))
    alone = _grads(LossConfig(**{**OFF, **TERMS[term]}), student, teacher)
    assert alone and sum(float(g.abs().sum()) for g in alone.values()) > 0
    everything = LossConfig(**{k: v for t in TERMS.values() for k, v in t.items()})
    without = LossConfig(**{**everything.model_dump(), **{k: 0.0 for k in TERMS[term]}})
    a, b = _grads(everything, student, teacher), _grads(without, student, teacher)
    assert any(not torch.allclose(a[n], b[n]) for n in a), f"{term} does not reach the student"
    # the feature term reaches the mapped shallow block; MGD the deep one
    if term == "feature":
        assert alone["blocks.0.attn.qkv.weight"].abs().sum() > 0 and "blocks.1.attn.qkv.weight" not in alone
    if term == "mgd":
        assert alone["blocks.1.mlp.fc2.weight"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_distillation_token_learns_from_the_teacher(mode: str) -> None:
    teacher = _timm()
    student, _ = shrink(_timm("VisionTransformerDistilled"), ShrinkConfig(depth=2))
    g = _grads(LossConfig(**{**OFF, "kd": 1.0, "dist_token": mode}), student, teacher)
    assert g["head_dist.weight"].abs().sum() > 0 and "head.weight" not in g  # only the distillation head
    g = _grads(LossConfig(**{**OFF, "ce": 1.0, "dist_token": mode}), student, teacher)
    assert g["head.weight"].abs().sum() > 0 and "head_dist.weight" not in g
    with pytest.raises(EdgeVitError, match="no distillation token"):
        _objective(LossConfig(dist_token=mode), shrink(teacher, ShrinkConfig(depth=2))[0], teacher)


def test_mgd_masks_student_tokens_afresh_and_rebuilds_every_position() -> None:
    teacher = _timm()
    student, _ = shrink(teacher, ShrinkConfig(depth=2))
    obj = _objective(LossConfig(**{**OFF, "mgd": 1.0, "mask_ratio": 0.5}), student, teacher)
    gen = obj.generators["1"]
    grid = student.spec.grid
    masks = [gen.mask(2, grid, torch.device("cpu")) for _ in range(2)]
    assert not torch.equal(masks[0], masks[1])  # a new mask per call
    assert 0.2 < float(1 - torch.cat(masks).mean()) < 0.8
    x = torch.randn(1, 32, *grid, requires_grad=True)
    torch.manual_seed(3)
    m = gen.mask(1, grid, torch.device("cpu")).flatten()
    torch.manual_seed(3)
    gen(x, grid).sum().backward()
    g = x.grad[0].flatten(1)  # C, positions
    assert torch.all(g[:, m == 0] == 0) and torch.all(g[:, m == 1].abs().sum(0) > 0)  # masked = unseen
    obj.close()


def test_layer_map_and_projectors_bridge_depth_and_width() -> None:
    teacher = _timm()  # depth 4, width 32
    import timm.models.vision_transformer as vt

    kw = dict(TEACHER, embed_dim=16, depth=3, num_heads=2)
    student = ModelGraph.from_module(vt.VisionTransformer(**kw), {"architecture": "VisionTransformer", "kwargs": kw})
    assert default_layers(3, 4, "shallow") == {0: 0} and default_layers(3, 4, "deep") == {2: 3}
    assert default_layers(6, 12, "shallow") == {0: 1, 1: 3, 2: 5}
    obj = _objective(LossConfig(mgd=1e-2), student, teacher)
    assert obj.feature_layers == {0: 0} and obj.mgd_layers == {2: 3}
    proj = obj.projectors["0"]
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (16, 32)
    assert obj.generators["2"].align.out_features == 32
    obj.close()
    g = _grads(LossConfig(feature_layers={1: 2, 0: 1}, mgd=1e-2), student, teacher)
    assert g["blocks.1.attn.qkv.weight"].abs().sum() > 0
    same = _objective(LossConfig(), shrink(teacher, ShrinkConfig(depth=2))[0], teacher)
    assert isinstance(same.projectors["0"], torch.nn.Identity)  # same width: no projector
    same.close()
    with pytest.raises(EdgeVitError, match="feature_layers: 3: 0 is out of range"):
        _objective(LossConfig(feature_layers={3: 0}), student, teacher)
    # another patch grid (2x2 against the teacher's 4x4): the student's maps are resampled
    other_grid = ModelGraph.from_module(vt.VisionTransformer(**dict(kw, patch_size=8)), None)
    g = _grads(LossConfig(**{**OFF, "feature": 1.0, "mgd": 1e-2}), other_grid, teacher)
    assert g["blocks.0.attn.qkv.weight"].abs().sum() > 0 and g["blocks.2.mlp.fc2.weight"].abs().sum() > 0


def test_a_cnn_teacher_gives_logit_kd_and_a_clear_error_for_features() -> None:
    import timm

    cnn = timm.create_model("test_resnet", num_classes=10).eval()
    student, _ = shrink(_timm(), ShrinkConfig(depth=2))
    conv = teacher_input(student.spec, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (32, 32))
    assert conv(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 32, 32)
    obj = DistillObjective(LossConfig(feature=0.0, mgd=0.0), student.module, student.spec, cnn, None, conv)
    loss, terms = obj(student.module.train(), torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    loss.backward()
    assert set(terms) == {"ce", "kd"} and student.module.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cnn.parameters())  # the teacher never trains
    obj.close()
    assert all(p.requires_grad for p in cnn.parameters())  # and is handed back as it came
    with pytest.raises(EdgeVitError, match="logits only"):
        DistillObjective(LossConfig(), student.module, student.spec, cnn, None, conv)


def test_shrink_keeps_the_teachers_weights_and_leaves_the_teacher_alone() -> None:
    teacher = _timm()
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    full, _ = shrink(teacher, ShrinkConfig())
    assert torch.allclose(full.module(x), teacher.module(x))
    student, how = shrink(teacher, ShrinkConfig(depth=2, num_heads=2, mlp_ratio=1.0))
    assert "blocks [0, 3] of 4" in how
    assert student.spec.depth == 2 and student.spec.block(0).attn.num_heads == 2
    assert student.spec.block(1).mlp.hidden == 32
    t_fc2, s_fc2 = teacher.module.blocks[3].mlp.fc2.weight, student.module.blocks[1].mlp.fc2.weight
    # each kept unit is one of the teacher's columns, unchanged
    assert all(any(torch.equal(c, tc) for tc in t_fc2.T) for c in s_fc2.T)
    assert all(torch.equal(before[k], v) for k, v in teacher.module.state_dict().items())
    rand, how = shrink(teacher, ShrinkConfig(depth=2, init="random"))
    assert "random init" in how
    assert not torch.equal(rand.module.blocks[0].attn.qkv.weight, student.module.blocks[0].attn.qkv.weight)
    with pytest.raises(EdgeVitError, match="more than the teacher"):
        shrink(teacher, ShrinkConfig(depth=5))


def _distill_recipe(**distill) -> dict:
    cfg = {"epochs": 3, "lr": 0.003, "warmup_epochs": 0, "mgd": 1e-3,
           "student": {"shrink": {"depth": 1, "num_heads": 1, "mlp_ratio": 1.0}}}
    cfg.update(distill)
    return tiny_recipe_data(passes=[
        {"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
        {"distill": cfg},
        {"export": {"opset": 13, "parity_samples": 16}},
    ])



def test_training_only_modules_stay_out_of_the_saved_graph_and_the_onnx(tmp_path: Path) -> None:
    report, log = run_pipeline(_distill_recipe(), tmp_path / "run")
    stage = tmp_path / "run" / "02-distill"
    graph = ModelGraph.load(stage)
    saved = load_file(str(stage / "model.safetensors"))
    assert set(saved) == set(graph.module.state_dict())
    assert not any(w in k for k in saved for w in ("projector", "generator", "align"))
    assert graph.spec.depth == 1 and graph.num_params() < ModelGraph.load(tmp_path / "run" / "01-adapt").num_params()
    model = onnx.load(str(tmp_path / "run" / "03-export" / "model.onnx"))
    onnx_params = sum(int(torch.tensor(list(i.dims)).prod()) if i.dims else 1 for i in model.graph.initializer)
    assert onnx_params <= graph.num_params() + 64  # + a few constants the exporter folds in
    metrics = json.loads((stage / "metrics.json").read_text())["metrics"]
    assert "shrunk from the teacher" in metrics["student"] and metrics["flops_ratio"] < 0.5
    assert {"ce", "kd", "feat", "mgd"} <= set(metrics["log"][-1])
    assert "student: shrunk" in log
    assert "**02-distill**: student shrunk from the teacher" in (tmp_path / "run" / "report.md").read_text()


def test_interrupted_distillation_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    data = _distill_recipe()
    data["passes"] = data["passes"][:2]
    run_pipeline(data, tmp_path / "straight")

    import edgevit.training.loop as loop

    real_save = loop._save_checkpoint
    calls = []

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(args[5])
        if len(calls) == 3:  # adapt's 2 epochs, then distill's first
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(data, tmp_path / "crashed")
    ckpt = load_file(str(tmp_path / "crashed" / ".02-distill.partial" / "checkpoint" / "weights.safetensors"))
    assert any(k.startswith("extra.") for k in ckpt)  # projectors/generators are checkpointed too
    monkeypatch.setattr(loop, "_save_checkpoint", real_save)
    _, log = run_pipeline(data, tmp_path / "crashed")
    assert "resuming distill after epoch 1" in log
    a = load_file(str(tmp_path / "straight" / "02-distill" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "02-distill" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_distill_configs_are_one_line_errors(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import run_cli

    def no_adapt(data: dict) -> dict:  # the two errors found when distill starts: no adapt to train first
        data["passes"] = data["passes"][1:]
        return data

    cases = [
        (no_adapt(_distill_recipe(student={"shrink": {"depth": 9}})), "more than the teacher's 2 blocks"),
        (_distill_recipe(student={}), "exactly one of `shrink`"),
        (no_adapt(_distill_recipe(feature_layers={5: 0})), "feature_layers: 5: 0 is out of range"),
        (_distill_recipe(kd_weight=1), "passes[1].distill.kd_weight: unknown key"),
    ]
    for i, (data, message) in enumerate(cases):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        res = run_cli("compress", str(path), "--out", str(tmp_path / f"run{i}"))
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()  # progress lines of earlier stages may come first
        assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]] and message in lines[-1]


def test_a_cnn_teacher_from_a_model_source_runs_in_the_pipeline(tmp_path: Path) -> None:
    cnn = {"source": "timm", "name": "test_resnet", "kwargs": {"num_classes": 10}}
    data = _distill_recipe(teacher=cnn, feature=0.0, mgd=0.0, epochs=1, teacher_img_size=[32, 32])
    data["passes"] = data["passes"][1:2]
    run_pipeline(data, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "01-distill" / "metrics.json").read_text())["metrics"]
    assert set(m["log"][-1]) >= {"ce", "kd"} and "feat" not in m["log"][-1] and m["teacher_flops"] is None
    data = _distill_recipe(teacher=cnn, epochs=1)
    data["passes"] = data["passes"][1:2]
    with pytest.raises(EdgeVitError, match="gives logits only"):
        run_pipeline(data, tmp_path / "run2")


def test_kd_loss_mse_is_the_mean_squared_error_of_the_logits() -> None:
    """Logits shifted by a constant have the same softmax (KL 0) but not the same values (MSE c²)."""
    from edgevit.distill.objective import logit_distillation

    t = torch.randn(4, 10)
    assert float(logit_distillation(LossConfig(kd_loss="mse"), t + 1.5, t)) == pytest.approx(2.25, rel=1e-6)
    assert float(logit_distillation(LossConfig(kd_loss="kl"), t + 1.5, t)) == pytest.approx(0.0, abs=1e-5)
    teacher = _timm()
    student, _ = shrink(teacher, ShrinkConfig(depth=2))
    obj = _objective(LossConfig(**{**OFF, "kd": 2.0, "kd_loss": "mse"}), student, teacher)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _, terms = obj(student.module.eval(), images, torch.zeros(3, dtype=torch.long))
        expected = 2.0 * torch.nn.functional.mse_loss(student.module(images), teacher.module(images))
    obj.close()
    assert terms["kd"] == pytest.approx(float(expected), rel=1e-5)


def test_mgd_rebuilds_a_masked_token_from_its_neighbours() -> None:
    """The masked token's own features never reach its reconstruction, its kept neighbours do
    (a per-token generator could only return a constant there)."""
    teacher = _timm()
    student, _ = shrink(teacher, ShrinkConfig(depth=2))
    obj = _objective(LossConfig(**{**OFF, "mgd": 1.0, "mask_ratio": 0.5}), student, teacher)
    gen = obj.generators["1"]
    obj.close()
    rows, cols = student.spec.grid
    checked = 0
    for seed in range(4):
        torch.manual_seed(seed)
        m = gen.mask(1, (rows, cols), torch.device("cpu")).flatten()
        for j in torch.nonzero(m == 0).flatten().tolist():
            r, c = divmod(j, cols)
            near = [(nr, nc) for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                    if 0 <= nr < rows and 0 <= nc < cols and m[nr * cols + nc] == 1]
            if not near:
                continue
            x = torch.randn(1, 32, rows, cols, requires_grad=True)
            torch.manual_seed(seed)
            gen(x, (rows, cols))[0, :, r, c].sum().backward()
            assert torch.all(x.grad[0, :, r, c] == 0)  # masked: unseen
            assert all(x.grad[0, :, nr, nc].abs().sum() > 0 for nr, nc in near)  # rebuilt from its neighbours
            checked += 1
    assert checked >= 4
