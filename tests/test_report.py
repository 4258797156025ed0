"""The run report: one table across stages, pictures, a self-contained HTML page, and "—" for
whatever a stage did not measure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgevit.report import REPORT_KEYS, STAGE_KEYS, build_report
from tests.conftest import run_cli, run_pipeline, tiny_recipe_data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    data = tiny_recipe_data(profile="jetson-nano")
    data["passes"] = [{"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
                      {"prune": {"method": "magnitude", "mlp": 0.5}},
                      {"export": {"parity_samples": 16}},
                      {"benchmark": {"runs": 3, "warmup": 1, "throughput_batch": 4}}]
    run_pipeline(data, out)
    return out


def test_report_has_every_stage_pictures_and_a_self_contained_html(tiny_run: Path) -> None:
    rep = json.loads((tiny_run / "report.json").read_text())
    assert [s["stage"] for s in rep["stages"]] == ["00-source", "01-adapt", "02-prune", "03-export"]
    assert set(rep["plots"]) == {"accuracy_latency", "layers_02-prune"}
    for rel in rep["plots"].values():
        assert (tiny_run / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tiny_run / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') == 2  # images inline: the page travels alone
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    for text in ("02-prune", "device, predicted", "deployable", "host", "Pictures"):
        assert text in page
    md = (tiny_run / "report.md").read_text()
    assert "![accuracy_latency](plots/accuracy_latency.png)" in md
    assert rep["schema_version"] == 3 and set(rep) == set(REPORT_KEYS)
    assert rep["task"] == "classification" and rep["overlays"] is None
    for s in rep["stages"]:
        assert set(STAGE_KEYS) <= set(s) and "latency_ms" not in s


def test_html_table_has_the_markdown_columns(tiny_run: Path) -> None:
    md = (tiny_run / "report.md").read_text()
    md_head = next(ln for ln in md.splitlines() if ln.startswith("| stage"))
    md_cols = [c.strip() for c in md_head.strip("|").split("|")]
    page = (tiny_run / "report.html").read_text()
    html_cols = re.findall(r"<th>([^<]*)</th>", page)
    assert "img/s" in md_cols and "spread ms" in md_cols
    assert html_cols[:len(md_cols)] == md_cols
    rep = json.loads((tiny_run / "report.json").read_text())
    export = next(s for s in rep["stages"] if s["stage"] == "03-export")
    assert f"<td>{export['throughput_ips']:.0f}</td>" in page  # the img/s figure itself, not only its header


def test_report_reader_refuses_a_future_schema(tiny_run: Path, tmp_path: Path) -> None:
    from edgevit.errors import EdgeVitError
    from edgevit.report import SCHEMA_VERSION, read_report

    assert read_report(tiny_run / "report.json")["schema_version"] == SCHEMA_VERSION
    future = tmp_path / "report.json"
    future.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "stages": []}))
    with pytest.raises(EdgeVitError, match=r"schema version 4; this edgevit reads up to 3: upgrade edgevit"):
        read_report(future)
    old = tmp_path / "v1.json"
    old.write_text(json.dumps({"run": "r", "stages": []}))  # version 1 had no key
    assert read_report(old)["run"] == "r"


def test_chance_level_source_does_not_squash_the_y_axis() -> None:
    from edgevit.report_plots import top1_limits

    lo, hi = top1_limits([10.0, 96.39, 97.78, 98.06, 98.06, 98.06])
    assert 94 < lo < 96.39 and 98.06 < hi < 100.5
    assert top1_limits([75.87, 74.85, 74.26, 74.28]) is None  # a real teacher first: keep it on the axis


def test_plot_labels_do_not_overlap(tmp_path: Path) -> None:
    """Stages at near-equal latency and accuracy (export and its FP16 copy) get separate labels."""
    from edgevit import report_plots

    stages = [{"stage": n, "top1": t, "host_latency": {"median_ms": ms}, "predicted": None}
              for n, t, ms in [("00-source", 10.0, 0.355), ("01-adapt", 96.39, 0.366), ("02-distill", 97.78, 0.186),
                               ("03-prune", 98.06, 0.116), ("04-export", 98.06, 0.167),
                               ("05-quantize", 98.06, 0.198)]]
    boxes: list = []
    real_place = report_plots._place_labels

    def spy(fig, ax, pts):  # noqa: ANN001
        real_place(fig, ax, pts)
        r = fig.canvas.get_renderer()
        boxes.extend(t.get_window_extent(r) for t in ax.texts if t.get_text() in {p[0] for p in pts})

    report_plots._place_labels = spy
    try:
        assert report_plots.accuracy_latency({"run": "demo", "stages": stages}, tmp_path / "p.png")
    finally:
        report_plots._place_labels = real_place
    assert len(boxes) == 5  # 00-source is drawn below the axis with its own arrow label
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two stage labels overlap"


def test_a_stage_missing_a_metric_renders_as_a_dash(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    bench = run / "04-benchmark" / "benchmark.json"
    b = json.loads(bench.read_text())
    del b["stages"][1]["top1"]  # 01-adapt lost its top-1
    b["stages"][1]["host_latency"] = None
    b["stages"][2]["predicted"] = None
    bench.write_text(json.dumps(b))
    (run / "02-prune" / "metrics.json").unlink()  # and the prune stage its metrics file
    rep = build_report(run)
    rows = {s["stage"]: s for s in rep["stages"]}
    assert rows["01-adapt"]["top1"] is None and rows["02-prune"]["flops"] is None
    md = (run / "report.md").read_text()
    assert "| 01-adapt | — |" in md
    page = (run / "report.html").read_text()
    assert "<td>—</td>" in page and "01-adapt" in page
    # the CLI builds it too, and says which stage files no longer match their recorded sha256s
    res = run_cli("report", str(run))
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert "benchmark.json" in res.stderr and "metrics.json" in res.stderr


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no headless Chromium on this machine (apt install chromium to run this check)")
def test_html_report_renders_in_headless_chromium(tiny_run: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                          "--window-size=1280,1600", (tiny_run / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 1600)
    # a rendered page, not a blank one: the table and the plots put plenty of non-white pixels on it
    import numpy as np

    dark = int((np.asarray(img) < 200).sum())
    assert dark > 20_000, dark


def test_measured_device_latency_is_the_same_figure_in_markdown_and_html(tmp_path: Path) -> None:
    """The board script times with and without host copies; every rendering sets the one
    with copies beside the prediction (the predictor's fit points include copies)."""
    from edgevit.report import prediction_rows
    from edgevit.report_html import render_html

    stage = {"stage": "01-export", "name": "export", "top1": 90.0,
             "predicted": {"profile": "jetson-nano", "precision": "fp16", "latency_ms": 6.0, "memory_mb": 1100,
                           "verdict": "deployable"},
             "measured_on_device": [{"latency_ms": {"median": 10.0}, "latency_with_copies_ms": {"median": 12.0},
                                     "top1": 89.5}]}
    report = {"schema_version": 2, "run": "r", "host": None, "stages": [stage], "devices": []}
    md_row = prediction_rows(report)[1][0]
    assert "12.00" in md_row and "10.00" not in md_row
    page = render_html(report, tmp_path)
    assert "<td>12.00</td>" in page and "<td>10.00</td>" not in page
