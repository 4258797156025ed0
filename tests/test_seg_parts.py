"""Segmentation building blocks: mIoU, OHEM, pixel KD, paired data with joint augmentation."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgevit.errors import EdgeVitError
from edgevit.seg.data import JointTransform, SegmentationFolder, collate_segmentation
from edgevit.seg.losses import ohem_cross_entropy, pixel_kd_kl, pixel_kd_mse
from edgevit.seg.metrics import SegMeter, SegScores, confusion_matrix
from tests.conftest import SHARED_DATA, write_seg_pair


def test_miou_matches_a_hand_computed_example() -> None:
    # 3 classes, ignore label 9; a 2x4 image
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 9, 9]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, target, 3, ignore_index=9)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = SegScores.from_confusion(cm)
    # IoU: class 0: 1/(2+2-1)=1/3; class 1: 2/(2+3-2)=2/3; class 2: 1/(2+1-1)=1/2
    assert s.iou == pytest.approx([100 / 3, 200 / 3, 50])
    assert s.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert s.pixel_accuracy == pytest.approx(4 / 6 * 100)  # ignored pixels excluded
    # a class absent from truth and prediction is left out of the mean, not counted as 0
    s4 = SegScores.from_confusion(confusion_matrix(pred, target, 4, ignore_index=9))
    assert s4.iou[3] is None and s4.miou == pytest.approx(s.miou)


def test_meter_scores_at_each_masks_own_resolution() -> None:
    # logits at 2x2 upsampled to a 4x4 mask: each quadrant one class
    logits = torch.zeros(1, 4, 2, 2)
    for c, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        logits[0, c, i, j] = 10.0
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    meter = SegMeter(4, ignore_index=255)
    meter.update(logits, [mask])
    assert meter.scores().miou == pytest.approx(100.0)


def test_ohem_keeps_only_hard_pixels_with_a_floor() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0, 0] = 255
    logits[0, :, 1] = 0
    logits[0, target[0, 1], 1, torch.arange(4)] = 10  # row 1: easy (p_true ~ 1)
    p_true = F.softmax(logits, 1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    hard = (p_true < 0.7) & (target != 255)
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    got = ohem_cross_entropy(logits, target, ignore_index=255, thresh=0.7, min_kept=1)
    assert got == pytest.approx(per_pixel[hard].mean().item())
    assert got != pytest.approx(per_pixel[target != 255].mean().item())
    # the floor: with min_kept = every valid pixel, it is the plain cross-entropy
    allk = ohem_cross_entropy(logits, target, ignore_index=255, thresh=0.7, min_kept=10_000)
    assert allk == pytest.approx(per_pixel[target != 255].mean().item())


def test_pixel_kd_losses() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 5, 8, 8)
    assert pixel_kd_kl(t, t, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 5, 4, 4, requires_grad=True)  # coarser student: upsampled to the teacher's size
    kl = pixel_kd_kl(s, t, temperature=2.0)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    ref = F.kl_div(F.log_softmax(up / 2, 1), F.log_softmax(t / 2, 1), log_target=True, reduction="none").sum(1)
    assert kl.item() == pytest.approx((ref.mean() * 4).item(), rel=1e-5)
    mse = pixel_kd_mse(s, t)
    assert mse.item() == pytest.approx(F.mse_loss(up, t).item(), rel=1e-6)
    mse.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :4] = True
    assert pixel_kd_mse(s, t, valid).item() == pytest.approx(((up - t) ** 2).mean(1)[:, :4].mean().item(), rel=1e-5)


def _blocks(seed: int, h: int = 48, w: int = 64, block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """An image of flat coloured blocks whose mask is a function of the pixels (red > 127);
    red is 20 or 235, so only block edges blur towards the threshold."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (h // block, w // block, 3), dtype=np.uint8)
    cells[..., 0] = rng.choice(np.array([20, 235], dtype=np.uint8), size=cells.shape[:2])
    img = cells.repeat(block, 0).repeat(block, 1)
    return img, (img[..., 0] > 127).astype(np.uint8)


def test_joint_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    for i in range(4):
        write_seg_pair(tmp_path, f"f{i}", *_blocks(i))
    tf = JointTransform((32, 40), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True, scale=(1.0, 2.0))
    ds = SegmentationFolder(tmp_path, "data.train", tf, num_classes=2, ignore_index=255, seed=3)
    flips = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 40) and y.shape == (32, 40)
            sure = (x[0] - 0.5).abs() > 0.25  # away from blurred block edges
            agree = ((x[0] > 0.5).long() == y)[sure].float().mean().item()
            assert sure.float().mean() > 0.5 and agree > 0.99, f"image and mask drifted apart (agreement {agree:.3f})"
            # the same item twice in one epoch gives the same crop (resumable)
            assert torch.equal(ds[i][1], y)
            flips += int(not torch.equal(ds[i][1], y.flip(-1)))
    assert flips > 0
    # evaluation keeps the mask's own resolution
    ev = SegmentationFolder(tmp_path, "data.val", JointTransform((32, 40), (0, 0, 0), (1, 1, 1), train=False),
                            num_classes=2, ignore_index=255)
    x, y = ev[0]
    assert x.shape == (3, 32, 40) and y.shape == (48, 64)
    images, masks = collate_segmentation([ev[0], ev[1]])
    assert images.shape == (2, 3, 32, 40) and masks.shape == (2, 48, 64)


def test_a_misaligned_flip_is_caught() -> None:
    """The alignment check above is sharp: flipping only the image breaks it."""
    img, mask = _blocks(0)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    agree = ((x[0].flip(-1) > 0.5).long() == torch.from_numpy(mask).long()).float().mean().item()
    assert agree < 0.9


@pytest.mark.parametrize("case", ["size", "label", "missing"])
def test_bad_pairs_name_the_file(tmp_path: Path, case: str) -> None:
    img, mask = _blocks(0)
    write_seg_pair(tmp_path, "good", img, mask)
    if case == "size":
        write_seg_pair(tmp_path, "bad", img, mask[:-8])
    elif case == "label":
        m = mask.copy()
        m[0, 0] = 7
        write_seg_pair(tmp_path, "bad", img, m)
    else:
        write_seg_pair(tmp_path, "bad", img, mask)
        (tmp_path / "masks" / "bad.png").unlink()
    tf = JointTransform((32, 40), (0, 0, 0), (1, 1, 1), train=False)
    with pytest.raises(EdgeVitError, match="bad") as e:
        SegmentationFolder(tmp_path, "data.train", tf, num_classes=2, ignore_index=255)
    assert "\n" not in str(e.value)
    # the ignore label itself is fine
    m = mask.copy()
    m[0, 0] = 255
    write_seg_pair(tmp_path, "bad", img, m)
    SegmentationFolder(tmp_path, "data.train", tf, num_classes=2, ignore_index=255)


@pytest.mark.slow
@pytest.mark.data
def test_reference_camvid_teacher_scores_its_card_miou(tmp_path: Path) -> None:
    """edgevit's metric and eval data path reproduce the shared teacher's published test mIoU."""
    tar, card_path = SHARED_DATA / "camvid-jpg.tar.gz", SHARED_DATA / "vit_camvid_teacher.json"
    if not tar.is_file() or not card_path.is_file():
        pytest.skip(f"{SHARED_DATA} has no camvid-jpg.tar.gz / vit_camvid_teacher.json")
    import safetensors.torch
    from timm.models.vision_transformer import VisionTransformer

    with tarfile.open(tar) as t:
        t.extractall(tmp_path, members=[m for m in t.getmembers() if "/test/" in m.name or m.isdir()],
                     filter="data")
    card = json.loads(card_path.read_text())
    kwargs = {**card["kwargs"], "img_size": tuple(card["kwargs"]["img_size"])}

    class SegViT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = VisionTransformer(**kwargs)
            self.head = torch.nn.Linear(kwargs["embed_dim"], len(card["classes"]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tok = self.backbone.forward_features(x)
            grid = (x.shape[-2] // 16, x.shape[-1] // 16)
            return self.head(tok).transpose(1, 2).reshape(x.shape[0], -1, *grid)

    model = SegViT()
    model.load_state_dict(safetensors.torch.load_file(str(SHARED_DATA / "vit_camvid_teacher.safetensors")))
    root = next(tmp_path.rglob("test"))
    # the card's input: PIL's bilinear downscale, which filters like antialias=True
    tf = JointTransform(tuple(card["input_size_hw"]), tuple(card["mean"]), tuple(card["std"]), train=False)
    ds = SegmentationFolder(root, "data.test", tf, num_classes=11, ignore_index=card["void_label"])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate_segmentation)
    meter = SegMeter(11, card["void_label"])
    with torch.no_grad():
        for x, y in loader:
            meter.update(model(x), y)
    got = meter.scores()
    assert got.miou == pytest.approx(card["test_miou"] * 100, abs=0.5), got
