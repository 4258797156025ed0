"""Segmentation in recipes and training: the data section, the task loss and metric, pixel KD."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from rich.console import Console
from torch import nn

from edgevit.context import RunContext
from edgevit.data import build_data
from edgevit.data.config import SegmentationData
from edgevit.distill.objective import DistillObjective, LossConfig
from edgevit.errors import EdgeVitError
from edgevit.graph.spec import DecoderSpec, GraphSpec
from edgevit.passes.adapt import AdaptConfig, AdaptPass
from edgevit.recipe import parse_recipe
from edgevit.registry import Registry
from edgevit.seg.losses import pixel_kd_kl, pixel_kd_mse
from edgevit.training.loop import TrainConfig, train
from edgevit.training.task import (
    OhemConfig,
    SegLossConfig,
    TaskObjective,
    median_frequency_weights,
    task_loss,
    task_metric,
)
from tests.conftest import write_seg_pair

H, W = 24, 32  # the files
INPUT = (12, 16)  # the model's input size
IGNORE = 255


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat 4x4-pixel blocks; the mask is a function of the pixels (red > 127), the first row ignored."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (H // 4, W // 4, 3), dtype=np.uint8)
    cells[..., 0] = rng.choice(np.array([20, 235], dtype=np.uint8), size=cells.shape[:2])
    img = cells.repeat(4, 0).repeat(4, 1)
    mask = (img[..., 0] > 127).astype(np.uint8)
    mask[0] = IGNORE
    return img, mask


def _dataset(base: Path, n_train: int = 8, n_val: int = 4) -> Path:
    for split, n, off in (("train", n_train, 0), ("val", n_val, 100), ("test", 2, 200)):
        for i in range(n):
            write_seg_pair(base / split, f"f{i:02d}", *_pair(off + i))
    return base


def _spec(num_classes: int = 2, task: str = "segmentation") -> GraphSpec:
    """A model's spec as the data reads it (size, normalisation, classes, task)."""
    return GraphSpec(family="test", embed_dim=8, img_size=INPUT, patch_size=(4, 4), in_chans=3,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=num_classes, num_prefix_tokens=0,
                     pool="avg", patch_embed="stem", classifiers=["head"], blocks=[], task=task,  # type: ignore[arg-type]
                     decoder=DecoderSpec(kind="linear", path="head", taps=[0], classifier="head", width=8)
                     if task == "segmentation" else None)


class TinySegmenter(nn.Module):
    """A stand-in segmenter: logits on a 2x coarser grid, bilinearly upsampled to the input."""

    def __init__(self, num_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, width, 1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _cfg(base: Path, **kw: object) -> SegmentationData:
    d = {"source": "segmentation", "train": base / "train", "val": base / "val", "classes": ["dark", "bright"],
         "ignore_index": IGNORE, "batch_size": 4, **kw}
    return SegmentationData.model_validate(d)


def test_recipe_section_validates_and_builds(tmp_path: Path) -> None:
    _dataset(tmp_path)
    recipe, _ = parse_recipe({
        "name": "seg", "model": {"source": "builtin", "kwargs": {"img_size": 16, "patch_size": 4, "num_classes": 2,
                                                                  "embed_dim": 16, "depth": 1, "num_heads": 2}},
        "data": {"source": "segmentation", "train": "train", "val": "val", "test": "test",  # relative to the recipe
                 "classes": ["dark", "bright"], "batch_size": 4, "limit_train": 6,
                 "augment": {"scale": [1.0, 1.25], "flip": True}},
    }, tmp_path, Registry())
    data = build_data(recipe.data, _spec(), seed=0)
    assert (data.task, data.num_classes, data.ignore_index, data.class_names) == ("segmentation", 2, 255,
                                                                                   ["dark", "bright"])
    assert len(data.train) == 6 and len(data.val) == 4
    x, y = data.train[0]
    assert x.shape == (3, *INPUT) and y.shape == INPUT  # training: mask cropped with its image
    xv, yv = data.val[0]
    assert xv.shape == (3, *INPUT) and yv.shape == (H, W)  # evaluation: the mask's own resolution
    images, masks = next(iter(data.train_loader(0, 0)))
    assert images.shape == (4, 3, *INPUT) and masks.shape == (4, *INPUT) and masks.dtype == torch.int64
    images, masks = next(iter(data.val_loader()))
    assert images.shape == (4, 3, *INPUT) and masks.shape == (4, H, W)
    cx, cy = data.sample(3, seed=0, split="train")  # calibration: both at the input size
    assert cx.shape == (3, 3, *INPUT) and cy.shape == (3, *INPUT)
    assert torch.equal(cx, data.sample(3, seed=0, split="train")[0])
    img, mask = data.raw("val", 0)
    assert Path(img).parent.name == "images" and Path(mask).parent.name == "masks"
    assert len(data.test_loader().dataset) == 2
    # the normalisation is the model's
    raw = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1).float() / 255
    ref = (F.interpolate(raw[None], size=INPUT, mode="bilinear", antialias=True, align_corners=False)[0] - 0.5) / 0.25
    assert torch.allclose(xv, ref, atol=1e-5)


@pytest.mark.parametrize(("data", "match"), [
    ({"preset": "camvid", "classes": ["a"]}, "exactly one of `preset`"),
    ({"preset": "camvid", "ignore_index": 3}, "sets the ignore label"),
    ({"classes": ["a", "b"]}, "give the `train` and `val` folders"),
    ({"classes": ["a", "b"], "train": "t", "val": "v", "augment": {"scale": [0.5, 1.0]}}, "scale"),
    ({"classes": ["a", "b"], "train": "t", "val": "v", "augment": {"zoom": 2}}, "unknown key"),
    ({"classes": ["a", "b"], "train": "t", "val": "v", "bad_images": "drop"}, "bad_images"),
])
def test_recipe_section_errors(tmp_path: Path, data: dict, match: str) -> None:
    with pytest.raises(EdgeVitError, match=match) as e:
        parse_recipe({"name": "seg", "model": {"source": "builtin"}, "data": {"source": "segmentation", **data}},
                     tmp_path, Registry())
    assert "\n" not in str(e.value) and str(e.value).startswith("recipe.data")


def test_camvid_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset's 11 classes with void 11 ignored, from the shared cache layout by default."""
    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path))
    root = tmp_path / "camvid"
    for split in ("train", "val"):
        img, mask = _pair(0)
        write_seg_pair(root / split, "0001TP_006690", img, np.where(mask == IGNORE, 11, mask * 8))  # void, sky, car
    cfg = SegmentationData.model_validate({"source": "segmentation", "preset": "camvid"})
    data = build_data(cfg, _spec(11), seed=0)
    assert data.num_classes == 11 and data.ignore_index == 11 and data.class_names[8] == "car"
    assert data.test is None and data.class_pixels()[[0, 8]].sum() == H * W - W
    with pytest.raises(EdgeVitError, match="preset camvid has 11 classes but the model outputs 2"):
        build_data(cfg, _spec(2), seed=0)
    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path / "elsewhere"))  # not unpacked there
    with pytest.raises(EdgeVitError, match="edgevit data unpack camvid"):
        build_data(cfg, _spec(11), seed=0)


@pytest.mark.parametrize("case", ["size", "label", "missing", "classes", "task"])
def test_bad_inputs_give_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    _dataset(tmp_path, n_train=3, n_val=2)
    img, mask = _pair(7)
    spec = _spec()
    if case == "size":
        write_seg_pair(tmp_path / "train", "bad", img, mask[:-4])
    elif case == "label":
        mask[3, 3] = 2  # neither a class (0, 1) nor the ignore label
        write_seg_pair(tmp_path / "train", "bad", img, mask)
    elif case == "missing":
        write_seg_pair(tmp_path / "train", "bad", img, None)
    elif case == "classes":
        spec = _spec(num_classes=3)
    else:
        spec = _spec(task="classification")
    with pytest.raises(EdgeVitError) as e:
        build_data(_cfg(tmp_path), spec, seed=0)
    msg = str(e.value)
    assert "\n" not in msg
    expected = {"size": "bad.png is 32x20 but its image is 32x24", "label": "bad.png has label 2",
                "missing": "bad.png has no mask", "classes": "data.classes has 2 classes but the model outputs 3",
                "task": "needs a segmentation model"}[case]
    assert expected in msg, msg
    if case in ("size", "label"):  # bad_images: skip leaves the pair out and lists it
        data = build_data(_cfg(tmp_path, bad_images="skip"), spec, seed=0)
        assert len(data.train) == 3 and [Path(p).name for p, _ in data.skipped] == ["bad.png"]


def test_a_classification_source_refuses_a_segmenter(tmp_path: Path) -> None:
    from edgevit.data.config import DigitsData

    with pytest.raises(EdgeVitError, match="use data.source: segmentation"):
        build_data(DigitsData(source="digits"), _spec(), seed=0)


class _Data:
    """The parts of a TaskData the task loss reads."""

    def __init__(self, task: str = "segmentation", num_classes: int = 3, pixels: list[float] | None = None) -> None:
        self.task, self.num_classes, self.ignore_index = task, num_classes, 9
        self.pixels = torch.tensor(pixels or [1.0] * num_classes)

    def class_pixels(self) -> torch.Tensor:
        return self.pixels


def test_pixel_loss_with_the_ignore_label_equals_a_hand_computation() -> None:
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    target = torch.tensor([[[0, 1], [2, 9]]])  # the last pixel is ignored
    nll = []
    for (i, j), c in zip([(0, 0), (0, 1), (1, 0)], [0, 1, 2], strict=True):
        z = logits[0, :, i, j]
        nll.append(-(float(z[c]) - math.log(float(z.exp().sum()))))
    loss = task_loss(_Data())
    assert loss(logits, target).item() == pytest.approx(sum(nll) / 3, rel=1e-6)
    # class weights: a weighted mean over the valid pixels
    w = [1.0, 2.0, 0.5]
    weighted = task_loss(_Data(), seg=SegLossConfig(class_weights=w))(logits, target).item()
    assert weighted == pytest.approx(sum(wi * n for wi, n in zip(w, nll, strict=True)) / sum(w), rel=1e-6)
    assert weighted != pytest.approx(sum(nll) / 3)
    # coarser logits are upsampled to the mask first
    coarse = torch.randn(1, 3, 1, 1)
    assert loss(coarse, target).item() == pytest.approx(loss(coarse.expand(1, 3, 2, 2), target).item(), rel=1e-6)


def test_median_frequency_weights() -> None:
    w = median_frequency_weights(torch.tensor([40.0, 10.0, 20.0, 0.0]))
    assert w.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(2.0), 1.0, 0.0])  # absent class: weight 0
    loss = task_loss(_Data(pixels=[40.0, 10.0, 20.0]), seg=SegLossConfig(class_weights="median_frequency"))
    assert loss.weight.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(2.0), 1.0])  # type: ignore[attr-defined]


def test_median_frequency_from_the_train_masks(tmp_path: Path) -> None:
    _dataset(tmp_path, n_train=3, n_val=1)
    data = build_data(_cfg(tmp_path), _spec(), seed=0)
    masks = [np.array(Image.open(p)) for p in sorted((tmp_path / "train" / "masks").iterdir())]
    counts = np.bincount(np.concatenate([m[m != IGNORE] for m in masks]), minlength=2)
    assert data.class_pixels().tolist() == counts.tolist()


def test_ohem_keeps_only_hard_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 9
    logits[:, :, 2:] = 0
    logits.scatter_(1, target.clamp(max=2)[:, None], 8.0)  # every pixel easy ...
    logits[:, :, :2] = torch.randn(2, 3, 2, 4)  # ... except the first two rows
    per_pixel = F.cross_entropy(logits, target, ignore_index=9, reduction="none")
    p_true = F.softmax(logits, 1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    hard = (p_true < 0.7) & (target != 9)
    assert 0 < hard.sum() < (target != 9).sum()
    got = task_loss(_Data(), seg=SegLossConfig(ohem=OhemConfig(thresh=0.7, min_kept=1)))(logits, target)
    assert got.item() == pytest.approx(per_pixel[hard].mean().item(), rel=1e-6)
    plain = task_loss(_Data())(logits, target)
    assert got.item() > plain.item()


def test_classification_keeps_label_smoothed_cross_entropy_and_refuses_seg_options() -> None:
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    got = task_loss(_Data("classification", 5), label_smoothing=0.1)(logits, labels)
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    with pytest.raises(EdgeVitError, match="segmentation loss options"):
        task_loss(_Data("classification", 5), seg=SegLossConfig(ohem=OhemConfig()), where="passes.adapt")


def test_adapt_config_takes_the_loss_options() -> None:
    cfg = AdaptConfig.model_validate({"class_weights": "median_frequency", "ohem": {"thresh": 0.6, "min_kept": 50}})
    assert cfg.ohem is not None and cfg.ohem.min_kept == 50
    for bad in ({"ohem": {"thresh": 1.5}}, {"ohem": {"keep": 3}}, {"class_weights": "inverse"}):
        with pytest.raises(ValidationError):
            AdaptConfig.model_validate(bad)
    ctx = RunContext(recipe=None, run_dir=Path("."), data=_Data(), device=torch.device("cpu"),  # type: ignore[arg-type]
                     console=Console(), registry=None)
    AdaptPass.preflight(AdaptConfig.model_validate({"class_weights": [1, 2, 3]}), ctx, "passes[0].adapt")
    with pytest.raises(EdgeVitError, match=r"passes\[0\].adapt.class_weights: 2 weights for 3 classes"):
        AdaptPass.preflight(AdaptConfig.model_validate({"class_weights": [1, 2]}), ctx, "passes[0].adapt")


class _Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_task_metric_dispatch_matches_hand_computed_miou() -> None:
    # 3 classes, ignore 9; predictions on a 1x2 grid upsampled to the 2x4 mask (each half one class)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 9, 9]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    logits = F.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 10
    loader = [(torch.zeros(1, 3, 2, 4), [target])]
    got = task_metric(_Fixed(logits), loader, "segmentation", 3, 9, class_names=["a", "b", "c"])
    # IoU: a 1/(2+2-1), b 2/(2+3-2), c 1/(2+1-1); pixel accuracy 4/6 (ignored pixels excluded)
    assert got["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert got["pixel_accuracy"] == pytest.approx(400 / 6)
    assert got["iou"] == pytest.approx({"a": 100 / 3, "b": 200 / 3, "c": 50.0})
    top = task_metric(_Fixed(torch.eye(3)), [(torch.zeros(3, 1), torch.tensor([0, 1, 1]))], "classification")
    assert top == {"top1": pytest.approx(200 / 3)}


def test_a_tiny_segmenter_trains_and_reports_miou(tmp_path: Path) -> None:
    _dataset(tmp_path / "data", n_train=12, n_val=4)
    data = build_data(_cfg(tmp_path / "data", batch_size=4), _spec(), seed=0)
    torch.manual_seed(0)
    model = TinySegmenter()
    ctx = RunContext(recipe=None, run_dir=tmp_path, data=data, device=torch.device("cpu"),  # type: ignore[arg-type]
                     console=Console(file=io.StringIO()), registry=None, seed=0)
    before = task_metric(model, data.val_loader(), "segmentation", 2, IGNORE)["miou"]
    cfg = TrainConfig(epochs=6, lr=0.05, warmup_epochs=0, label_smoothing=0.0, amp=False)
    out = train(model, TaskObjective(task_loss(data)), cfg, ctx, tmp_path / "work", description="adapt")
    log = out["log"]
    assert log[-1]["ce"] < 0.6 * log[0]["ce"]
    assert "val_top1" not in out and out["val_miou"] == log[-1]["val_miou"]
    assert out["val_miou"] > max(before, 80.0) and "val_pixel_accuracy" in log[-1]
    assert set(out["val_iou"]) == {"dark", "bright"}


def _distill(kd_loss: str, student: nn.Module, teacher: nn.Module) -> DistillObjective:
    cfg = LossConfig(ce=0.0, kd=1.0, kd_loss=kd_loss, temperature=2.0, feature=0.0, mgd=0.0)  # type: ignore[arg-type]
    return DistillObjective(cfg, student, _spec(), teacher, None, lambda x: x,
                            task_loss=task_loss(_Data(num_classes=2)))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_pixel_kd_through_the_distill_objective(kind: str) -> None:
    torch.manual_seed(0)
    student, teacher = TinySegmenter(), TinySegmenter(width=4)
    x = torch.randn(2, 3, *INPUT)
    labels = torch.randint(0, 2, (2, *INPUT))
    labels[:, :3] = 9  # ignored pixels are out of the KD term
    _, terms = _distill(kind, student, teacher)(student, x, labels)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    valid = labels != 9
    ref = pixel_kd_kl(s, t, 2.0, valid) if kind == "kl" else pixel_kd_mse(s, t, valid)
    assert terms["kd"] == pytest.approx(ref.item(), rel=1e-5)
    unmasked = pixel_kd_kl(s, t, 2.0) if kind == "kl" else pixel_kd_mse(s, t)
    assert terms["kd"] != pytest.approx(unmasked.item(), rel=1e-5)
    # identical logits: nothing to distil
    objective = _distill(kind, student, student)
    _, same = objective(student, x, labels)
    objective.close()  # gives the student (here also the teacher) its gradients back
    assert same["kd"] == pytest.approx(0.0, abs=1e-6)
    # any module giving (B, C, H, W) logits teaches, at its own resolution; the gradient reaches the student
    coarse = _Fixed(torch.randn(2, 2, 3, 4))
    loss, _ = _distill(kind, student, coarse)(student, x, labels)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_distill_refuses_teacher_logits_of_other_classes() -> None:
    student = TinySegmenter()
    with pytest.raises(EdgeVitError, match="same classes"):
        _distill("kl", student, TinySegmenter(num_classes=3))(student, torch.randn(1, 3, *INPUT),
                                                               torch.zeros(1, *INPUT, dtype=torch.long))


def test_taylor_scores_differentiate_the_task_loss() -> None:
    """Taylor pruning takes its loss from the task (per-pixel for segmentation): the scores are
    the squared first-order terms of whatever loss it is given."""
    from edgevit.graph import ModelGraph
    from edgevit.prune.importance import taylor_scores
    from tests.conftest import _timm_vit

    module, build = _timm_vit()
    g = ModelGraph.from_module(module.eval(), build)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    cpu = torch.device("cpu")
    default = taylor_scores(g, x, y, None, cpu)[0][0]
    ce = task_loss(_Data("classification", 5))
    assert torch.allclose(taylor_scores(g, x, y, None, cpu, loss_fn=ce)[0][0], default)
    doubled = taylor_scores(g, x, y, None, cpu, loss_fn=lambda lg, t: 2 * ce(lg, t))[0][0]
    assert torch.allclose(doubled, 4 * default, rtol=1e-4)
