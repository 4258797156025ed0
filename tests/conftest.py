"""Shared fixtures: tiny models of every supported family, and a tiny recipe on digits."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml

if TYPE_CHECKING:
    from edgevit.graph import ModelGraph

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TIMM_KWARGS = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # One worker per core (scripts/test): each worker, and every process it starts, uses one
    # thread. More would spin-wait on the other workers' cores, and a count chosen from the
    # load (edgevit.threads) could differ between two runs a test compares bit for bit.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # no model hub in tests: fail fast instead of retrying a network that is not there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**TIMM_KWARGS), {"architecture": "VisionTransformer", "kwargs": TIMM_KWARGS}


def _timm_deit_distilled():
    from timm.models.deit import VisionTransformerDistilled
    kw = dict(TIMM_KWARGS, qkv_bias=False)
    return VisionTransformerDistilled(**kw), {"architecture": "VisionTransformerDistilled", "kwargs": kw}


def _timm_no_cls():
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(TIMM_KWARGS, class_token=False, global_pool="avg")
    return VisionTransformer(**kw), {"architecture": "VisionTransformer", "kwargs": kw}


def _builtin():
    from edgevit.models.simple_vit import SimpleViT
    kw = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    return SimpleViT(**kw), {"kwargs": kw}


def _hf():
    pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
    from transformers import ViTConfig, ViTForImageClassification

    from edgevit.graph.adapters.hf_vit import HFImageClassifier
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=5)
    model = HFImageClassifier(ViTForImageClassification(cfg))
    return model, {"config": cfg.to_dict()}


MODEL_FACTORIES: dict[str, Callable] = {
    "timm": _timm_vit,
    "timm_deit_distilled": _timm_deit_distilled,
    "timm_no_cls_token": _timm_no_cls,
    "builtin": _builtin,
    "hf": _hf,
}


def _segmenter(decoder: dict):
    from edgevit.graph.adapters.segmenter import SegmenterAdapter
    kw = dict(TIMM_KWARGS, num_classes=0, global_pool="", class_token=False)
    build = {"backbone": {"family": "timm", "architecture": "VisionTransformer", "kwargs": kw},
             "decoder": dict(decoder), "num_classes": TIMM_KWARGS["num_classes"]}
    return SegmenterAdapter().build(build), build


# the timm backbone of TIMM_KWARGS with a decode head: (B, 5, H, W) logits
SEGMENTER_FACTORIES: dict[str, Callable] = {
    "segmenter_linear": lambda: _segmenter({"kind": "linear"}),
    "segmenter_mla": lambda: _segmenter({"kind": "mla", "width": 16}),
}


def randomised_graph(module: torch.nn.Module, build: dict) -> ModelGraph:
    """``module`` as a ModelGraph in eval mode, every weight (zero-initialised tokens too) nudged
    at random so that tests of equal outputs can fail."""
    from edgevit.graph import ModelGraph

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ModelGraph.from_module(module.eval(), build)


@pytest.fixture(params=list(MODEL_FACTORIES))
def tiny_graph(request: pytest.FixtureRequest):
    """A ModelGraph of each supported family, in eval mode, with non-trivial weights."""
    return randomised_graph(*MODEL_FACTORIES[request.param]())


def write_seg_pair(split: Path, name: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    """One frame of a paired segmentation folder (``seg/data.py``'s layout): ``split/images/<name>.png``
    and, unless ``mask`` is None, ``split/masks/<name>.png`` as 8-bit labels."""
    from PIL import Image

    (split / "images").mkdir(parents=True, exist_ok=True)
    (split / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(split / "images" / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8)).save(split / "masks" / f"{name}.png")


def labels_by_hand(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One frame's (C, h, w) logits as classes at a mask's ``size``, with torch directly (bilinear,
    align_corners=False), not through ``seg/metrics.py``."""
    import torch.nn.functional as F

    up = F.interpolate(logits[None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy()


def miou_by_hand(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
                 ignore_index: int) -> tuple[float, list[float | None]]:
    """mIoU and per-class IoU (0-100) of (truth, predicted labels) pairs counted pixel by pixel,
    independently of ``seg/metrics.py``: ignored pixels out, a class never seen has no IoU."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for truth, pred in pairs:
        keep = truth != ignore_index
        t, p = truth[keep], pred[keep]
        for c in range(num_classes):
            inter[c] += ((t == c) & (p == c)).sum()
            union[c] += ((t == c) | (p == c)).sum()
    iou = [100 * i / u if u else None for i, u in zip(inter, union, strict=True)]
    present = [v for v in iou if v is not None]
    return sum(present) / len(present), iou


def tiny_recipe_data(**overrides) -> dict:
    """A recipe that runs every built-in pass on a slice of digits in seconds."""
    data = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "model": {"source": "builtin", "kwargs": {"img_size": 16, "patch_size": 4, "num_classes": 10,
                                                   "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "data": {"source": "digits", "batch_size": 32, "limit_train": 640, "limit_val": 96},
        "calibration": {"num_samples": 16},
        "passes": [
            {"adapt": {"epochs": 4, "lr": 0.003, "warmup_epochs": 0}},
            {"export": {"opset": 13, "parity_samples": 16}},
            {"benchmark": {"runs": 3, "warmup": 1, "throughput_batch": 4}},
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    def write(data: dict | None = None, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data or tiny_recipe_data()))
        return path
    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``edgevit`` console entry point in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "edgevit.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)


def run_pipeline(data: dict, out: Path) -> tuple[dict, str]:
    """Run a recipe mapping in-process; returns the report and everything the run printed."""
    import io

    from rich.console import Console

    from edgevit.pipeline import Pipeline
    from edgevit.recipe import parse_recipe
    from edgevit.registry import Registry

    reg = Registry()
    recipe, steps = parse_recipe(data, out.parent, reg)
    buf = io.StringIO()
    report = Pipeline(recipe, steps, out, reg, Console(file=buf, width=200)).run()
    return report, buf.getvalue()


def outputs_in_a_fresh_process(stages: list[Path], x: torch.Tensor, tmp: Path,
                               show: str = "") -> tuple[list[torch.Tensor], list[str]]:
    """Load each saved stage in a new Python process and run it on ``x``: what a later run or
    another machine gets. Same thread count as this process (bit-identical needs the same
    reduction order). ``show`` is an expression of ``g`` printed per stage (e.g. its spec)."""
    torch.save(x, tmp / "fresh_x.pt")
    outs = [tmp / f"fresh_y{i}.pt" for i in range(len(stages))]
    code = (
        "import sys, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from edgevit.graph import ModelGraph\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "for d, o in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    g = ModelGraph.load(d)\n"
        "    with torch.no_grad(): torch.save(g.module.eval()(x), o)\n"
        f"    print({show or repr('')})\n"
    )
    args = [a for d, o in zip(stages, outs, strict=True) for a in (str(d), str(o))]
    res = subprocess.run([sys.executable, "-c", code, str(tmp / "fresh_x.pt"), *args], capture_output=True,
                         text=True, cwd=REPO, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return [torch.load(o, weights_only=True) for o in outs], res.stdout.splitlines()
