"""report.html: one self-contained page (CSS and PNGs inline) with every stage in one table."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from edgevit.report import (
    DASH,
    dash_note,
    device_median_ms,
    fmt,
    host_line,
    interval_text,
    metric_of,
    stage_notes,
    table_rows,
)

CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1180px;
color:#1f2933;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #e4e7eb}
.sub{color:#52606d;font-size:.92rem}
table{border-collapse:collapse;width:100%;font-size:.88rem;margin-top:.6rem}
th,td{padding:.38rem .55rem;border-bottom:1px solid #e4e7eb;text-align:right;white-space:nowrap}
th{background:#f5f7fa;font-weight:600}td:first-child,th:first-child{text-align:left}
tr:hover td{background:#fafbfc}.ok{color:#1e7b34;font-weight:600}.bad{color:#b42318;font-weight:600}
.group{text-align:center;background:#eef2f6}figure{margin:1.2rem 0}img{max-width:100%;border:1px solid #e4e7eb}
figcaption{color:#52606d;font-size:.85rem}ul{padding-left:1.2rem}li{margin:.25rem 0}
"""


HOST_SPAN = 5  # p50, spread, p99, img/s, mem: the table's last columns, measured on the host


def _cell(value: str, cls: str = "") -> str:
    return f'<td class="{cls}">{html.escape(value)}</td>' if cls else f"<td>{html.escape(value)}</td>"


def _rows(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    measured = any(s.get("measured_on_device") for s in report["stages"])
    predicted = any(s.get("predicted") for s in report["stages"])
    head, host_rows = table_rows(report)  # the same columns as report.md and the CLI
    groups = [f'<th colspan="{len(head) - HOST_SPAN}" class="group">model</th>',
              f'<th colspan="{HOST_SPAN}" class="group">host</th>']
    if predicted:
        groups.append('<th colspan="4" class="group">device, predicted</th>')
        head += ["precision", "latency ms (interval)", "memory MB", "verdict"]
    if measured:
        groups.append('<th colspan="3" class="group">device, measured</th>')
        head += ["p50 ms", "top-1 %", "RAM MB"]
    rows = []
    for s, host in zip(report["stages"], host_rows, strict=True):
        cells = [_cell(c) for c in host]
        if predicted:
            p = s.get("predicted") or {}
            verdict = p.get("verdict")
            iv = f" ({interval_text(p)})" if p.get("latency_interval_ms") else ""
            cells += [_cell(p.get("precision") or DASH), _cell(fmt(p.get("latency_ms"), ".2f") + iv),
                      _cell(fmt(p.get("memory_mb"), ".0f")),
                      _cell(verdict or DASH, "ok" if verdict == "deployable" else "bad" if verdict else "")]
        if measured:
            m = (s.get("measured_on_device") or [{}])[-1]
            cells += [_cell(fmt(device_median_ms(m), ".2f")), _cell(fmt(m.get("top1"), ".2f")),
                      _cell(fmt(m.get("peak_mem_mb"), ".0f"))]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ["<tr>" + "".join(groups) + "</tr>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"], rows


def _image(run_dir: Path, rel: str) -> str:
    data = base64.b64encode((run_dir / rel).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{data}">'


def _caption(name: str, report: dict[str, Any]) -> str:
    if name == "accuracy_latency":
        metric = "mIoU" if metric_of(report)[0] == "miou" else "top-1"
        return (f"Each stage as a point on the path from the input model to the final one: {metric} against "
                "batch-1 latency on this machine and, when the recipe names a device, predicted there.")
    return "Per-block cost of the model before and after pruning (MFLOPs per image)."


# overlays are at the masks' resolution (small masks make small PNGs): drawn page-wide, pixels kept sharp
OVERLAY_STYLE = "width:100%;image-rendering:pixelated"


def _seg_parts(report: dict[str, Any], run_dir: Path) -> list[str]:
    """Per-class IoU of the first and last stage, and the overlays (segmentation runs)."""
    from edgevit.report_seg import class_iou_rows, overlay_caption, teacher_note

    note = teacher_note(report)
    parts = [f'<p class="sub">{html.escape(note)}</p>'] if note else []
    rows = class_iou_rows(report)
    if rows:
        head, body = rows
        parts += ["<h2>Per-class IoU</h2>", "<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                  + "</tr>"] + ["<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in body] + ["</table>"]
    ov = report.get("overlays")
    if ov:
        parts.append("<h2>Overlays</h2>")
        for f in ov["frames"]:
            if (run_dir / f["file"]).is_file():
                img = _image(run_dir, f["file"]).replace("<img ", f'<img style="{OVERLAY_STYLE}" ', 1)
                parts.append(f"<figure>{img}<figcaption>{html.escape(f['frame'])}: "
                             f"{html.escape(overlay_caption(ov))}</figcaption></figure>")
        if ov.get("legend") and (run_dir / ov["legend"]).is_file():
            parts.append(f"<figure>{_image(run_dir, ov['legend'])}<figcaption>class colours</figcaption></figure>")
    return parts


def render_html(report: dict[str, Any], run_dir: Path) -> str:
    head, rows = _rows(report)
    sub = html.escape(host_line(report) or "No benchmark stage in this run: host figures are not measured.")
    parts = [f"<h1>edgevit report: {html.escape(report['run'])}</h1>",
             f'<p class="sub">{sub} {html.escape(dash_note(report))}</p>', "<h2>Stages</h2>", "<table>", *head, *rows,
             "</table>"]
    reasons = [(s["stage"], r) for s in report["stages"] for r in
               [*(s.get("predicted") or {}).get("reasons", []), *(s.get("predicted") or {}).get("notes", [])]]
    notes = stage_notes(report) + reasons
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>"] + [f"<li><b>{html.escape(st)}</b>: {html.escape(n)}</li>"
                                               for st, n in notes] + ["</ul>"]
    plots = report.get("plots") or {}
    if plots:
        parts.append("<h2>Pictures</h2>")
        for name, rel in plots.items():
            if (run_dir / rel).is_file():
                cap = _caption(name, report)
                parts.append(f"<figure>{_image(run_dir, rel)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    if report.get("task") == "segmentation":
        parts += _seg_parts(report, run_dir)
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>edgevit report: {html.escape(report["run"])}'
            f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
