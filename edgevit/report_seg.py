"""The report's segmentation parts: the mIoU table, per-class IoU, and the overlay pictures.

A segmentation run's report shows mIoU where a classification run shows top-1 (the same
cells otherwise, ``report.host_cells``), each stage's mIoU also as a percentage of the
teacher's (what compression kept of it; the teacher is the one the passes learn from, the
latest ``adapt`` stage, else the input model), pixel accuracy, and a per-class IoU
table of the first and last stage. The overlays were drawn by the benchmark pass (it had the
images and predictions); the report copies them into ``plots/`` and only references them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgevit.report import DASH, HOST_COLUMNS, fmt, host_cells

SEG_COLUMNS = ["stage", "mIoU %", "of teacher %", "pixel acc %", *HOST_COLUMNS[2:]]


def relative(value: float | None, first: float | None) -> float | None:
    """``value`` as a percentage of ``first`` (None when either is missing or ``first`` is 0)."""
    if value is None or not first:
        return None
    return 100.0 * value / first


def seg_cells(s: dict[str, Any], teacher_miou: float | None) -> list[str]:
    return [s["stage"], fmt(s.get("miou"), ".2f"), fmt(relative(s.get("miou"), teacher_miou), ".1f"),
            fmt(s.get("pixel_accuracy"), ".2f"), *host_cells(s)[2:]]


def teacher_stage(report: dict[str, Any]) -> dict[str, Any] | None:
    """The stage everything is set against, as ``RunContext.teacher`` picks it: the latest
    ``adapt`` stage with an mIoU, else the first stage with one (the input model). An untrained
    input at chance level would make every later figure thousands of per cent."""
    scored = [s for s in report["stages"] if s.get("miou") is not None]
    adapted = [s for s in scored if s.get("name") == "adapt"]
    return adapted[-1] if adapted else (scored[0] if scored else None)


def teacher_note(report: dict[str, Any]) -> str | None:
    t = teacher_stage(report)
    if t is None:
        return None
    return (f"of teacher %: a stage's mIoU as a percentage of {t['stage']}'s ({t['miou']:.2f} %), the model the "
            "passes learn from (the latest adapt stage, else the input model).")


def seg_table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    t = teacher_stage(report)
    return list(SEG_COLUMNS), [seg_cells(s, t["miou"] if t else None) for s in report["stages"]]


def class_iou_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Per-class IoU of the first and the last stage that have it, and the change."""
    scored = [s for s in report["stages"] if s.get("iou")]
    if not scored:
        return None
    ends = [scored[0], scored[-1]] if len(scored) > 1 else [scored[0]]
    head = ["class", *(f"{s['stage']} IoU %" for s in ends)] + (["change"] if len(ends) > 1 else [])
    rows = []
    for name in ends[0]["iou"]:
        vals = [s["iou"].get(name) for s in ends]
        row = [name, *(fmt(v, ".2f") for v in vals)]
        if len(ends) > 1:
            a, b = vals
            row.append(fmt(b - a, "+.2f") if a is not None and b is not None else DASH)
        rows.append(row)
    return head, rows


def collect_overlays(run_dir: Path, bench_dir: Path, drawn: dict[str, Any] | None) -> dict[str, Any] | None:
    """The benchmark stage's overlay PNGs copied to ``plots/``; their entry with paths relative to
    the run dir (as ``plots`` has them), or None when the stage drew none."""
    if not drawn:
        return None
    src = bench_dir / "overlays"
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for f in drawn["frames"]:
        if (src / f["file"]).is_file():
            shutil.copyfile(src / f["file"], out_dir / f["file"])
            frames.append({**f, "file": f"plots/{f['file']}"})
    legend = None
    if (src / drawn["legend"]).is_file():
        shutil.copyfile(src / drawn["legend"], out_dir / drawn["legend"])
        legend = f"plots/{drawn['legend']}"
    return {**drawn, "frames": frames, "legend": legend} if frames else None


def overlay_caption(overlays: dict[str, Any]) -> str:
    panels = overlays["panels"]
    return (f"Validation frames at the masks' own resolution, left to right: {', '.join(panels)}; class colours "
            f"blended at {overlays['alpha']:.0%} over the image (ignored pixels uncoloured).")


def markdown_sections(report: dict[str, Any]) -> list[str]:
    """Per-class IoU and the overlays, as Markdown lines."""
    out: list[str] = []
    rows = class_iou_rows(report)
    if rows:
        head, body = rows
        out += ["", "## Per-class IoU", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in body]
    ov = report.get("overlays")
    if ov:
        out += ["", "## Overlays", "", overlay_caption(ov), ""]
        out += [f"![{f['frame']}]({f['file']})" for f in ov["frames"]]
        if ov.get("legend"):
            out += ["", f"![legend]({ov['legend']})"]
    return out
