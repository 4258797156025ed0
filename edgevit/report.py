"""The run report: one entry per stage, from the files the stages left (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgevit.fileio import read_json, write_json, write_text

DASH = "—"


def _stage_entry(run_dir: Path, st: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    d = run_dir / st["dir"]
    graph = read_json(d / "graph.json")
    metrics = read_json(d / "metrics.json") if (d / "metrics.json").is_file() else {}
    model = metrics.get("model", {})
    m = measured.get(st["dir"], {})
    onnx = graph.get("artifacts", {}).get("onnx")
    artifact = (d / onnx) if onnx else (d / graph["weights"])
    return {
        "stage": st["dir"],
        "name": st["name"],
        "top1": m.get("top1"),
        "params": model.get("params", graph.get("params")),
        "macs": model.get("macs"),
        "flops": model.get("flops"),
        "size_bytes": artifact.stat().st_size if artifact.is_file() else None,
        "artifact": str(artifact.relative_to(run_dir)) if artifact.is_file() else None,
        "latency_ms": m.get("latency_ms"),
        "throughput_ips": m.get("throughput_ips"),
        "peak_mem_mb": m.get("peak_rss_mb"),
        "model_mem_mb": m.get("model_mem_mb"),
        "seconds": st.get("seconds"),
        "predicted": None,  # filled from a device profile by later passes
        "metrics": metrics.get("metrics", {}),
    }


def build_report(run_dir: Path) -> dict[str, Any]:
    """Write ``report.json`` and ``report.md`` for a run dir and return the report."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "manifest.json")
    measured: dict[str, Any] = {}
    host = None
    for st in manifest["stages"]:  # the latest benchmark stage's measurements win
        bench = run_dir / st["dir"] / "benchmark.json"
        if bench.is_file():
            b = read_json(bench)
            host = b.get("host")
            measured = {x["stage"]: x for x in b["stages"]}
    stages = [_stage_entry(run_dir, st, measured) for st in manifest["stages"] if st["name"] != "benchmark"]
    report = {"run": manifest["recipe"], "host": host, "stages": stages}
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", render_markdown(report))
    return report


def fmt(value: Any, spec: str = "", scale: float = 1.0) -> str:
    if value is None:
        return DASH
    return format(value / scale, spec) if scale != 1.0 else format(value, spec)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["stage", "top-1 %", "params M", "GFLOPs", "size MB", "p50 ms", "p99 ms", "img/s", "mem MB"]
    rows = []
    for s in report["stages"]:
        lat = s.get("latency_ms") or {}
        rows.append([s["stage"], fmt(s.get("top1"), ".2f"), fmt(s.get("params"), ".3f", 1e6),
                     fmt(s.get("flops"), ".4f", 1e9), fmt(s.get("size_bytes"), ".2f", 1e6),
                     fmt(lat.get("median"), ".3f"), fmt(lat.get("p99"), ".3f"),
                     fmt(s.get("throughput_ips"), ".0f"), fmt(s.get("peak_mem_mb"), ".0f")])
    return head, rows


def render_markdown(report: dict[str, Any]) -> str:
    head, rows = table_rows(report)
    out = [f"# edgevit report: {report['run']}", ""]
    host = report.get("host")
    if host:
        out += [f"Host: {host['cpu']}, {host['cores']} cores; onnxruntime {host['onnxruntime']}, "
                f"torch {host['torch']}. p50/p99: latency at batch 1 with ONNX Runtime after warm-up; img/s: "
                "throughput at a larger batch; mem MB: peak RSS of the process that timed the model.", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", "— = not measured for this stage (add a `benchmark` pass to measure it)."]
    notes = stage_notes(report)
    if notes:
        out += ["", "## Stages", ""] + [f"- **{stage}**: {note}" for stage, note in notes]
    return "\n".join(out) + "\n"


def stage_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """One sentence per stage that built something worth explaining (e.g. how a student was made)."""
    notes = []
    for s in report["stages"]:
        m = s.get("metrics") or {}
        if "student" in m:
            ratio = m.get("flops_ratio")
            vs = f"; {ratio:.3f}× the teacher's FLOPs" if ratio is not None else ""
            notes.append((s["stage"], f"student {m['student']}{vs}; trained to {m.get('val_top1')}% "
                                      f"val top-1 in {m.get('epochs')} epochs"))
        if "flops_kept" in m and "method" in m:
            aim = m.get("aim") or {}
            goal = (f" (target: {aim['target_metric']} {aim['target_keep']})" if "target_metric" in aim else "")
            rec = m.get("recover")
            after = f"; recovered to {rec['val_top1']}% val top-1 in {rec['epochs']} epochs" if rec else "; one-shot"
            notes.append((s["stage"], f"{m['method']} pruning kept {m['flops_kept']:.3f} of the FLOPs and "
                                      f"{m['params_kept']:.3f} of the parameters{goal}; heads per block "
                                      f"{m['heads']}, MLP units {m['mlp_units']}{after}"))
    return notes
