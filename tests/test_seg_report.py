"""Benchmark and report for segmentation: mIoU per stage as seg/metrics computes it, the
per-class table, the plot in mIoU, and colour overlays of truth and predictions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgevit.report import SCHEMA_VERSION, SEG_STAGE_KEYS, read_report
from edgevit.seg.overlay import ALPHA, CAMVID_COLOURS, GENERIC_COLOURS, blend, palette
from tests.conftest import labels_by_hand, miou_by_hand, run_pipeline, write_seg_pair

H, W = 24, 32  # the frames and masks on disk
IGNORE = 255
CLASSES = ["left", "right"]


def _frame(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame whose left half is class 0 and right half class 1 (the image says which: dark
    left, bright right, plus noise); the top row is ignored."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    img[:, W // 2:] += 180
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2:] = 1
    mask[0] = IGNORE
    return img, mask


def _dataset(base: Path) -> Path:
    for split, n, off in (("train", 8, 0), ("val", 4, 100)):
        for i in range(n):
            write_seg_pair(base / split, f"f{i:02d}", *_frame(off + i))
    return base


def seg_recipe(base: Path) -> dict:
    """A tiny segmenter (a 2-block ViT, linear decoder) on the synthetic frames: source, one
    epoch of adapt (a torch stage), export (an ONNX stage), benchmark."""
    backbone = {"img_size": [16, 16], "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
                "mlp_ratio": 2.0, "class_token": False}
    return {
        "name": "segtiny", "seed": 0, "device": "cpu",
        "model": {"source": "segmenter", "backbone": backbone, "num_classes": 2},
        "data": {"source": "segmentation", "train": str(base / "train"), "val": str(base / "val"),
                 "classes": CLASSES, "ignore_index": IGNORE, "batch_size": 4},
        "calibration": {"num_samples": 4},
        "passes": [{"adapt": {"epochs": 2, "lr": 0.01, "warmup_epochs": 0}},
                   {"export": {"opset": 13, "parity_samples": 4, "min_agreement": 0.0}},
                   {"benchmark": {"runs": 2, "rounds": 1, "warmup": 0, "throughput_batch": 2, "overlays": 2}}],
    }


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("segreport")
    out = base / "run"
    run_pipeline(seg_recipe(_dataset(base / "data")), out)
    return out


def test_report_json_has_miou_per_stage_and_the_task(seg_run: Path) -> None:
    rep = read_report(seg_run / "report.json")
    assert rep["schema_version"] == SCHEMA_VERSION == 3 and rep["task"] == "segmentation"
    assert [s["stage"] for s in rep["stages"]] == ["00-source", "01-adapt", "02-export"]
    for s in rep["stages"]:
        assert set(SEG_STAGE_KEYS) <= set(s) and "top1" not in s
        assert 0 <= s["miou"] <= 100 and set(s["iou"]) == set(CLASSES)
    bench = json.loads((seg_run / "03-benchmark" / "benchmark.json").read_text())
    assert [b["miou_runtime"] for b in bench["stages"]] == ["torch", "torch", "onnxruntime"]
    assert rep["plots"]["accuracy_latency"] == "plots/accuracy_latency.png"


def _labels_of(predict, data, loader) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    """(truth, predicted labels) per validation frame at the mask's resolution, by hand."""
    out = []
    for images, masks in loader:
        logits = predict(images)
        out += [(m.numpy(), labels_by_hand(lg, tuple(m.shape))) for lg, m in zip(logits, masks, strict=True)]
    return out


def test_miou_in_the_report_equals_seg_metrics_on_the_same_predictions(seg_run: Path) -> None:
    """Torch stages through the module, the ONNX stage through ONNX Runtime: each stage's mIoU
    is what a hand count of its own predictions gives."""
    from edgevit.data import build_data
    from edgevit.graph import ModelGraph
    from edgevit.onnx_io import session
    from edgevit.recipe import parse_recipe
    from edgevit.registry import Registry
    from edgevit.seg.bench import onnx_predict, torch_predict
    from edgevit.seg.metrics import SegMeter

    reg = Registry()
    recipe, _ = parse_recipe(seg_recipe(seg_run.parent / "data"), seg_run.parent, reg)
    rep = read_report(seg_run / "report.json")
    rows = {s["stage"]: s for s in rep["stages"]}
    for stage in ("00-source", "01-adapt", "02-export"):
        g = ModelGraph.load(seg_run / stage, reg)
        data = build_data(recipe.data, g.spec, seed=0)
        onnx = g.artifacts.get("onnx")
        predict = onnx_predict(session(onnx, 1)) if onnx else torch_predict(g.module, torch.device("cpu"))
        pairs = _labels_of(predict, data, data.val_loader())
        miou, iou = miou_by_hand(pairs, 2, IGNORE)
        meter = SegMeter(2, IGNORE)
        for images, masks in data.val_loader():
            meter.update(predict(images), masks)
        assert rows[stage]["miou"] == pytest.approx(round(meter.scores().miou, 2), abs=1e-9)
        assert rows[stage]["miou"] == pytest.approx(miou, abs=0.006)
        for name, v in zip(CLASSES, iou, strict=True):
            got = rows[stage]["iou"][name]
            assert (got is None) == (v is None) and (v is None or got == pytest.approx(v, abs=0.006))


def test_markdown_and_html_show_miou_and_the_per_class_table(seg_run: Path) -> None:
    rep = read_report(seg_run / "report.json")
    md = (seg_run / "report.md").read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| stage"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:4] == ["stage", "mIoU %", "of teacher %", "pixel acc %"] and "top-1 %" not in cols
    first, teacher, last = rep["stages"][0], rep["stages"][1], rep["stages"][-1]
    assert teacher["stage"] == "01-adapt"  # the latest adapt stage: the untrained source is not the yardstick
    assert f"| {last['stage']} | {last['miou']:.2f} | {100 * last['miou'] / teacher['miou']:.1f} |" in md
    assert f"percentage of 01-adapt's ({teacher['miou']:.2f} %)" in md
    assert "## Per-class IoU" in md
    assert f"| class | {first['stage']} IoU % | {last['stage']} IoU % | change |" in md
    for name in CLASSES:
        assert re.search(rf"^\| {name} \| ", md, re.M)
    page = (seg_run / "report.html").read_text()
    html_cols = re.findall(r"<th>([^<]*)</th>", page)
    assert html_cols[:len(cols)] == cols  # the same columns as the Markdown
    assert "Per-class IoU" in page and f"<td>{last['miou']:.2f}</td>" in page
    assert "mIoU against batch-1 latency" in page


def test_overlays_carry_the_palette_colours_where_the_classes_are(seg_run: Path) -> None:
    rep = read_report(seg_run / "report.json")
    ov = rep["overlays"]
    assert ov["panels"] == ["ground truth", "00-source", "02-export"] and len(ov["frames"]) == 2
    colours = palette(CLASSES)
    assert colours == GENERIC_COLOURS[:2] and ov["palette"] == [list(c) for c in colours]
    for f in ov["frames"]:
        path = seg_run / f["file"]
        assert f["file"].startswith("plots/overlay_") and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        px = np.asarray(Image.open(path).convert("RGB")).astype(float)
        assert px.shape == (H, 3 * W, 3) and f["size"] == [W, H]  # three panels at the mask's resolution
        raw = np.asarray(Image.open(seg_run.parent / "data" / "val" / "images" / f["frame"])).astype(float)
        truth = px[:, :W]
        for (y, x), c in (((H // 2, 3), 0), ((H // 2, W - 3), 1)):  # left half class 0, right half class 1
            want = (1 - ALPHA) * raw[y, x] + ALPHA * np.array(colours[c])
            assert np.abs(truth[y, x] - want).max() <= 1, (y, x, truth[y, x], want)
        assert np.array_equal(truth[0], raw[0])  # the ignored row is left uncoloured
    legend = seg_run / ov["legend"]
    assert legend.is_file() and ov["legend"] == "plots/overlay_legend.png"
    page = (seg_run / "report.html").read_text()
    for f in ov["frames"]:
        assert f'alt="{f["file"]}"' in page  # inline, named by its file
    assert 'alt="plots/overlay_legend.png"' in page and "Overlays" in page
    md = (seg_run / "report.md").read_text()
    assert all(f"]({f['file']})" in md for f in ov["frames"]) and "](plots/overlay_legend.png)" in md


def test_blend_and_palette() -> None:
    img = np.full((2, 4, 3), 100, np.uint8)
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE]])
    out = blend(img, labels, [(0, 0, 0), (255, 255, 255)])
    assert out[0, 0].tolist() == [50, 50, 50] and out[0, 3].tolist() == [178, 178, 178]
    assert out[1, 3].tolist() == [100, 100, 100]  # ignore label: the image itself
    from edgevit.seg.data import PRESETS

    assert palette(list(PRESETS["camvid"].classes)) == CAMVID_COLOURS and CAMVID_COLOURS[3] == (128, 64, 128)
    assert len(set(palette([str(i) for i in range(20)]))) == 20


def test_a_classification_report_has_none_of_the_segmentation_parts(tmp_path: Path) -> None:
    from edgevit.report import HOST_COLUMNS, render_markdown, table_rows
    from edgevit.report_html import render_html

    stage = {"stage": "00-source", "name": "source", "top1": 75.0, "host_latency": {"median_ms": 1.0},
             "iou": None, "miou": None}
    report = {"schema_version": SCHEMA_VERSION, "run": "r", "task": "classification", "host": None,
              "stages": [stage], "devices": [], "plots": {}, "overlays": None}
    assert table_rows(report)[0] == HOST_COLUMNS and table_rows(report)[1][0][1] == "75.00"
    md, page = render_markdown(report), render_html(report, tmp_path)
    for text in ("mIoU", "Per-class IoU", "Overlays", "of teacher"):
        assert text not in md and text not in page


def test_the_accuracy_plot_is_in_miou(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgevit import report_plots

    labels: list[str] = []
    real = report_plots._save

    def spy(plt, fig, out):  # noqa: ANN001, ANN202
        labels.extend(ax.get_ylabel() for ax in fig.axes)
        return real(plt, fig, out)

    monkeypatch.setattr(report_plots, "_save", spy)
    stages = [{"stage": n, "miou": m, "host_latency": {"median_ms": ms}, "predicted": None}
              for n, m, ms in [("00-source", 61.0, 2.0), ("01-prune", 58.5, 1.2), ("02-export", 58.4, 0.9)]]
    assert report_plots.accuracy_latency({"run": "s", "task": "segmentation", "stages": stages}, tmp_path / "p.png")
    assert labels == ["mIoU %"]


def test_the_cli_rebuilds_and_prints_the_miou_table(seg_run: Path, tmp_path: Path) -> None:
    import shutil

    from tests.conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(seg_run, run)
    shutil.rmtree(run / "plots")  # rebuilt from the stage files: the overlays come back from the benchmark stage
    res = run_cli("report", str(run))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "mIoU %" in res.stdout and "of teacher %" in res.stdout and "top-1 %" not in res.stdout
    assert sorted(p.name for p in (run / "plots").glob("overlay_*.png")) == ["overlay_0.png", "overlay_1.png",
                                                                            "overlay_legend.png"]
