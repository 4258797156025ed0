"""The training passes on segmenters, through the pipeline: adapt → distill (shrink) → prune
(osscar + recovery), Taylor's per-pixel loss, shrinking an MLA head, and the user errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevit.distill.student import ShrinkConfig, _head_scores, shrink
from edgevit.graph import ModelGraph
from edgevit.graph.adapters.segmenter import SegmenterAdapter
from tests.conftest import outputs_in_a_fresh_process, randomised_graph, run_cli, run_pipeline, write_seg_pair
from tests.test_bad_input import assert_user_error

H, W = 32, 48  # the files and the model's input (patch 8: a 4x6 grid)
IGNORE = 255
CLASSES = ["dark", "mid", "bright"]
BACKBONE = {"img_size": [H, W], "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0,
            "class_token": False}


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat 8x8 cells (one patch each); the label is a function of the red channel, a corner ignored."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)
    img = cells.repeat(8, 0).repeat(8, 1)
    mask = np.digitize(img[..., 0], [86, 171]).astype(np.uint8)
    mask[:2, :6] = IGNORE
    return img, mask


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("segdata")
    for split, n, off in (("train", 24, 0), ("val", 8, 100), ("test", 4, 200)):
        for i in range(n):
            write_seg_pair(base / split, f"f{i:02d}", *_pair(off + i))
    return base


def _model(num_classes: int = 3, decoder: dict | None = None, **backbone: object) -> dict:
    return {"source": "segmenter", "num_classes": num_classes, "mean": [0.5] * 3, "std": [0.25] * 3,
            "backbone": {**BACKBONE, **backbone}, "decoder": decoder or {"kind": "mla", "taps": [1, 3], "width": 16}}


def _recipe(base: Path, passes: list[dict], **over: object) -> dict:
    data = {"source": "segmentation", "train": str(base / "train"), "val": str(base / "val"),
            "test": str(base / "test"), "classes": CLASSES, "ignore_index": IGNORE, "batch_size": 8,
            "eval_batch_size": 8}
    return {"name": "seg", "seed": 0, "device": "cpu", "model": _model(), "data": data,
            "calibration": {"num_samples": 8}, "passes": passes, **over}


TRAIN = {"warmup_epochs": 0, "label_smoothing": 0.0, "amp": False}
PIXEL = {"class_weights": "median_frequency", "ohem": {"thresh": 0.9, "min_kept": 2000}}


def test_a_segmentation_run_through_every_pass(seg_folder: Path, tmp_path: Path) -> None:
    """adapt → distill → prune → export → quantize → bundle → benchmark for jetson-nano: every
    stage scored in mIoU, the bundle a segmentation bundle, the stage directories reloadable."""
    passes = [
        {"adapt": {"epochs": 3, "lr": 0.003, **TRAIN, **PIXEL}},
        {"distill": {"student": {"shrink": {"depth": 2, "num_heads": 2}}, "epochs": 2, "lr": 0.002, "kd_loss": "mse",
                     **TRAIN, **PIXEL}},
        {"prune": {"method": "osscar", "heads": 0.5, "mlp": 0.5,
                   "recover": {"epochs": 1, "lr": 0.001, "kd_loss": "mse", **TRAIN, **PIXEL}}},
        {"export": {}}, {"quantize": {"precision": "fp16"}}, {"bundle": {"validation_samples": 8}},
        {"benchmark": {"runs": 3, "warmup": 1}},
    ]
    recipe = _recipe(seg_folder, passes, model=_model(num_classes=5),  # 5 → 3 classes: adapt resets the head
                     profile="jetson-nano")
    report, out = run_pipeline(recipe, tmp_path / "run")
    lines = out.splitlines()
    assert "recipe seg (segmentation, 3 classes)" in lines[0]
    run = tmp_path / "run"
    stages = ["01-adapt", "02-distill", "03-prune"]
    metrics = {s: json.loads((run / s / "metrics.json").read_text())["metrics"] for s in stages}
    trained = [metrics["01-adapt"], metrics["02-distill"], metrics["03-prune"]["recover"]]
    for m in trained:  # keyed like classification's val_top1, with pixel accuracy and per-class IoU
        assert "val_top1" not in m and 0 <= m["val_miou"] <= 100 and 0 <= m["val_pixel_accuracy"] <= 100
        assert set(m["val_iou"]) == set(CLASSES) and all("val_miou" in e for e in m["log"])
    for s, m in zip(stages, trained, strict=True):
        assert any(line.startswith(f"✓ {s}") and f"val mIoU {m['val_miou']:.2f} %" in line for line in lines), out
    assert metrics["01-adapt"]["reset_head"] is True and metrics["01-adapt"]["val_miou"] > 40
    edits = json.loads((run / "01-adapt" / "graph.json").read_text())["edits"]
    assert any("reset_classifier" in json.dumps(e) for e in edits)
    assert metrics["02-distill"]["flops_ratio"] < 0.6 and metrics["03-prune"]["flops_kept"] < 0.9
    flops = [s["flops"] for s in report["stages"]]
    assert flops[3] < flops[2] < flops[1] < flops[0]  # (5 → 3 classes: the new head is smaller too)
    final = ModelGraph.load(run / "03-prune")
    assert [b.attn.num_heads for b in final.spec.blocks] == [1, 1]
    assert [b.mlp.hidden for b in final.spec.blocks] == [32, 32] and final.spec.decoder.taps == [0, 1]
    x = torch.randn(2, 3, H, W)
    dirs = [run / s for s in ["00-source", *stages]]
    fresh, _ = outputs_in_a_fresh_process(dirs, x, tmp_path)
    for d, y_fresh in zip(dirs, fresh, strict=True):
        with torch.no_grad():
            y = ModelGraph.load(d).module.eval()(x)
        assert y.shape == (2, 5 if d.name == "00-source" else 3, H, W)
        assert torch.allclose(y_fresh, y, atol=1e-5), d
    # the deploy half: per-pixel parity, FP16 judged in mIoU, a segmentation bundle, mIoU per stage
    export = json.loads((run / "04-export" / "metrics.json").read_text())["metrics"]
    assert export["parity"]["pixel_agreement"] >= 0.99
    quant = json.loads((run / "05-quantize" / "metrics.json").read_text())["metrics"]
    assert {"miou", "miou_drop", "pixel_agreement"} <= set(quant)
    bundle = json.loads(next((run / "06-bundle").rglob("bundle.json")).read_text())
    assert bundle["task"] == "segmentation" and bundle["classes"] == CLASSES
    measured = [s for s in report["stages"] if s.get("miou") is not None]
    assert report["task"] == "segmentation" and len(measured) >= 5
    assert all("top1" not in s or s["top1"] is None for s in measured)
    assert any(s.get("predicted") for s in report["stages"])  # predicted on the Nano at the input size


def test_a_segmenter_student_from_a_model_source(seg_folder: Path, tmp_path: Path) -> None:
    """``student: {model: {source: segmenter}}`` of another width, a new head for the data's classes;
    feature mimicking and MGD on the patch tokens across widths (spec.pool == "none")."""
    student = _model(num_classes=4, decoder={"kind": "linear"}, embed_dim=16, depth=2, num_heads=2)
    passes = [{"distill": {"student": {"model": student}, "epochs": 1, "lr": 0.003, "feature": 1.0, "mgd": 1e-3,
                           **TRAIN}}]
    report, out = run_pipeline(_recipe(seg_folder, passes), tmp_path / "run")
    m = json.loads((tmp_path / "run" / "01-distill" / "metrics.json").read_text())["metrics"]
    assert "new 3-class head" in m["student"] and m["feature_layers"] and m["mgd_layers"]
    assert {"ce", "kd", "feat", "mgd"} <= set(m["log"][0]) and "val_miou" in m
    assert report["stages"][1]["flops"] < report["stages"][0]["flops"]


def test_taylor_on_a_segmenter_uses_the_per_pixel_loss(seg_folder: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The calibration masks hold the ignore label (255), which classification cross-entropy
    cannot take (a target out of range): the run finishes only with the per-pixel task loss, and
    the scores are the ones that loss gives."""
    import edgevit.passes.prune as prune_pass
    from edgevit.prune.importance import taylor_scores
    from edgevit.training.task import PixelLoss

    seen: dict = {}

    def spy(graph, images, labels, *args, loss_fn=None, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.update(loss=loss_fn, labels=labels.clone())
        seen["scores"] = taylor_scores(graph, images, labels, *args, loss_fn=loss_fn, **kw)
        return seen["scores"]

    monkeypatch.setattr(prune_pass, "taylor_scores", spy)
    passes = [{"prune": {"method": "taylor", "mlp": 0.5}}]
    run_pipeline(_recipe(seg_folder, passes), tmp_path / "run")
    assert isinstance(seen["loss"], PixelLoss) and seen["loss"].ignore_index == IGNORE
    labels = seen["labels"]
    assert labels.shape[-2:] == (H, W) and (labels == IGNORE).any()
    with pytest.raises((IndexError, RuntimeError)):  # what a classification loss would have done
        torch.nn.CrossEntropyLoss()(torch.randn(len(labels), 3, H, W), labels)
    pruned = ModelGraph.load(tmp_path / "run" / "01-prune")
    for blk, (_, units) in zip(pruned.spec.blocks, seen["scores"], strict=True):
        assert blk.mlp.hidden == 32 and len(units) == 64


def _mla_graph(taps: list[int]) -> ModelGraph:
    build = {"backbone": {"family": "timm", "architecture": "VisionTransformer",
                          "kwargs": {**BACKBONE, "img_size": (H, W), "num_classes": 0, "global_pool": ""}},
             "decoder": {"kind": "mla", "taps": taps, "width": 16}, "num_classes": 3}
    return randomised_graph(SegmenterAdapter().build(build), build)


@pytest.mark.parametrize(("depth", "blocks", "taps"), [(2, [0, 3], [0, 1]), (1, [3], [0]), (3, [0, 2, 3], [0, 1, 2])])
def test_shrink_of_an_mla_segmenter_keeps_a_working_head(depth: int, blocks: list[int], taps: list[int]) -> None:
    g = _mla_graph([0, 1, 2, 3])
    before = copy.deepcopy(g.module.head.state_dict())
    student, how = shrink(g, ShrinkConfig(depth=depth, num_heads=2, mlp_ratio=1.0))
    assert f"blocks {blocks} of 4" in how and student.spec.decoder.taps == taps
    assert all(p.startswith("backbone.blocks.") for b in student.spec.blocks for p in (b.attn.qkv, b.mlp.fc1))
    assert [b.attn.num_heads for b in student.spec.blocks] == [2] * depth
    assert [b.mlp.hidden for b in student.spec.blocks] == [32] * depth
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        y = student.module.eval()(x)
    assert y.shape == (2, 3, H, W) and torch.isfinite(y).all()
    # a tap on a dropped block merges into the last kept block at or before it (else the first kept)
    old = [before[f"proj.{i}.weight"] for i in range(4)]
    groups: dict[int, list[int]] = {}
    for t in range(4):
        groups.setdefault(max((j for j, b in enumerate(blocks) if b <= t), default=0), []).append(t)
    for new, olds in groups.items():
        assert torch.allclose(student.module.head.proj[new].weight, sum(old[t] for t in olds))
    assert torch.equal(g.module.head.proj[0].weight, old[0])  # the teacher is untouched
    # the heads kept are the top ones by value·proj norm on the backbone's paths
    blk = g.spec.block(blocks[0])
    top = sorted(torch.topk(_head_scores(g, blk), 2).indices.tolist())
    qkv = g.module.get_submodule(blk.attn.qkv).weight
    v_rows = torch.cat([qkv[2 * 32 + h * 8: 2 * 32 + (h + 1) * 8] for h in top])
    s_qkv = student.module.get_submodule(student.spec.blocks[0].attn.qkv).weight
    assert torch.equal(s_qkv[2 * 16:], v_rows)


def _cli_recipe(tmp_path: Path, data: dict) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_classification_recipe_with_a_segmenter_is_one_line(tmp_path: Path) -> None:
    data = {"name": "bad", "device": "cpu", "model": _model(),
            "data": {"source": "digits", "limit_train": 64, "limit_val": 32},
            "passes": [{"adapt": {"epochs": 1}}]}
    res = run_cli("compress", str(_cli_recipe(tmp_path, data)), "--out", str(tmp_path / "run"))
    assert_user_error(res, "data.source: digits", "segmentation")
    assert not (tmp_path / "run").exists()


def test_seg_data_of_other_classes_is_one_line(seg_folder: Path, tmp_path: Path) -> None:
    data = _recipe(seg_folder, [{"distill": {"student": {"shrink": {"depth": 2}}, "epochs": 1}}],
                   model=_model(num_classes=5))
    res = run_cli("compress", str(_cli_recipe(tmp_path, data)), "--out", str(tmp_path / "run"))
    assert_user_error(res, "data.classes has 3 classes but the model outputs 5")
    assert not (tmp_path / "run").exists()


def test_seg_loss_options_of_distill_and_recovery_are_checked_up_front(seg_folder: Path, tmp_path: Path) -> None:
    data = _recipe(seg_folder, [{"prune": {"method": "osscar", "mlp": 0.5,
                                           "recover": {"epochs": 1, "class_weights": [1.0, 2.0]}}}])
    res = run_cli("compress", str(_cli_recipe(tmp_path, data)), "--out", str(tmp_path / "run"))
    assert_user_error(res, "passes[0].prune.recover.class_weights: 2 weights for 3 classes")
    digits = {"name": "bad", "device": "cpu", "data": {"source": "digits", "limit_train": 64, "limit_val": 32},
              "model": {"source": "builtin", "kwargs": {"img_size": 16, "patch_size": 4, "num_classes": 10,
                                                        "embed_dim": 32, "depth": 2, "num_heads": 2}},
              "passes": [{"distill": {"student": {"shrink": {"depth": 1}}, "ohem": {"thresh": 0.7}}}]}
    res = run_cli("compress", str(_cli_recipe(tmp_path, digits)), "--out", str(tmp_path / "run2"))
    assert_user_error(res, "passes[0].distill", "segmentation loss options")


@pytest.mark.parametrize("tuner", ["slicefine"])
def test_tuners_train_a_segmenter(seg_folder: Path, tmp_path: Path, tuner: str) -> None:
    """A per-patch head and ``pool: none`` through a tuner's adapt and a distill with it."""
    passes = [{"adapt": {"epochs": 1, "lr": 0.003, "tuner": tuner, **TRAIN}},
              {"distill": {"student": {"shrink": {"depth": 2}}, "epochs": 1, "lr": 0.003, "tuner": tuner, **TRAIN}}]
    run_pipeline(_recipe(seg_folder, passes), tmp_path / "run")
    for stage in ("01-adapt", "02-distill"):
        m = json.loads((tmp_path / "run" / stage / "metrics.json").read_text())["metrics"]
        assert m["tuner"]["name"] == tuner and "val_miou" in m
        with torch.no_grad():
            y = ModelGraph.load(tmp_path / "run" / stage).module.eval()(torch.randn(1, 3, H, W))
        assert y.shape == (1, 3, H, W) and torch.isfinite(y).all()


@pytest.mark.parametrize("where", ["adapt", "distill", "recover"])
def test_a_side_module_tuner_on_a_segmenter_is_refused_up_front(seg_folder: Path, tmp_path: Path,
                                                                 where: str) -> None:
    step = {"adapt": {"adapt": {"epochs": 1, "tuner": "losa"}},
            "distill": {"distill": {"student": {"shrink": {"depth": 2}}, "epochs": 1, "tuner": "disentangled"}},
            "recover": {"prune": {"mlp": 0.5, "recover": {"epochs": 1, "tuner": "losa"}}}}[where]
    res = run_cli("compress", str(_cli_recipe(tmp_path, _recipe(seg_folder, [step]))), "--out", str(tmp_path / "r"))
    assert_user_error(res, "tuner:", "side module predicts one class per image", "use tuner full or slicefine")
    assert not (tmp_path / "r").exists()
