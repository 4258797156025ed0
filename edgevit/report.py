"""The run report: one entry per stage, from the files the stages left (no torch needed).

report.json is a versioned schema (``SCHEMA_VERSION``; the keys are ``REPORT_KEYS`` and
``STAGE_KEYS``, documented in docs/design.md). Version 2 renamed version 1's ``latency_ms``
dict of a stage to ``host_latency`` (``median_ms``, ``p90_ms``, ``p99_ms``, ``spread_ms``,
``round_medians_ms``): ``latency_ms`` now only ever means one number of milliseconds (the
device prediction's). Version 3 added the run's ``task`` (classification | segmentation) and
``overlays``; a segmentation stage has ``miou``, ``pixel_accuracy`` and ``iou`` (per class)
where a classification stage has ``top1`` (``SEG_STAGE_KEYS``). ``read_report`` refuses a
version newer than this code knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgevit.errors import EdgeVitError
from edgevit.fileio import read_json, write_json, write_text

DASH = "—"
MEASURED_FORMAT = "edgevit.measured/1"  # what deploy/jetson/edgevit_jetson_bench.py writes
SCHEMA_VERSION = 3
REPORT_KEYS = ("schema_version", "run", "task", "host", "stages", "comparisons", "devices", "plots", "overlays")
STAGE_KEYS = ("stage", "name", "top1", "params", "macs", "flops", "size_bytes", "artifact", "host_latency",
              "throughput_ips", "throughput_batch", "peak_mem_mb", "model_mem_mb", "seconds", "predicted", "layers",
              "metrics")  # + "measured_on_device" once `edgevit report --measured` added a board's result
SEG_STAGE_KEYS = tuple(k for key in STAGE_KEYS for k in (("miou", "pixel_accuracy", "iou") if key == "top1"
                                                          else (key,)))


def accuracy_of(m: dict[str, Any], task: str) -> dict[str, Any]:
    """A stage's accuracy keys for the task: ``top1``, or ``miou``, ``pixel_accuracy``, ``iou``."""
    if task == "segmentation":
        return {"miou": m.get("miou"), "pixel_accuracy": m.get("pixel_accuracy"), "iou": m.get("iou")}
    return {"top1": m.get("top1")}


def metric_of(report: dict[str, Any]) -> tuple[str, str]:
    """The headline accuracy's key and label: ("top1", "top-1 %") or ("miou", "mIoU %")."""
    return ("miou", "mIoU %") if report.get("task") == "segmentation" else ("top1", "top-1 %")


def _stage_entry(run_dir: Path, st: dict[str, Any], measured: dict[str, Any], task: str) -> dict[str, Any]:
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
        **accuracy_of(m, task),
        "params": model.get("params", graph.get("params")),
        "macs": model.get("macs"),
        "flops": model.get("flops"),
        "size_bytes": artifact.stat().st_size if artifact.is_file() else None,
        "artifact": str(artifact.relative_to(run_dir)) if artifact.is_file() else None,
        "host_latency": m.get("host_latency"),
        "throughput_ips": m.get("throughput_ips"),
        "throughput_batch": m.get("throughput_batch"),
        "peak_mem_mb": m.get("peak_rss_mb"),
        "model_mem_mb": m.get("model_mem_mb"),
        "seconds": st.get("seconds"),
        "predicted": m.get("predicted"),  # the recipe's device profile, from the benchmark pass
        "layers": model.get("layers"),
        "metrics": metrics.get("metrics", {}),
    }


def build_report(run_dir: Path) -> dict[str, Any]:
    """Write ``report.json`` and ``report.md`` for a run dir and return the report."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "manifest.json")
    measured: dict[str, Any] = {}
    host, comparisons, bench_dir, b = None, [], None, {}
    for st in manifest["stages"]:  # the latest benchmark stage's measurements win
        bench = run_dir / st["dir"] / "benchmark.json"
        if bench.is_file():
            b = read_json(bench)
            host, comparisons, bench_dir = b.get("host"), b.get("comparisons", []), bench.parent
            measured = {x["stage"]: x for x in b["stages"]}
    task = b.get("task") or _graph_task(run_dir, manifest)
    stages = [_stage_entry(run_dir, st, measured, task) for st in manifest["stages"] if st["name"] != "benchmark"]
    devices = _attach_device_measurements(run_dir, stages)
    report = {"schema_version": SCHEMA_VERSION, "run": manifest["recipe"], "task": task, "host": host,
              "stages": stages, "comparisons": comparisons, "devices": devices}
    report["plots"] = _plots(run_dir, report)
    from edgevit.report_seg import collect_overlays

    report["overlays"] = collect_overlays(run_dir, bench_dir, b.get("overlays")) if bench_dir else None
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", render_markdown(report))
    from edgevit.report_html import render_html

    write_text(run_dir / "report.html", render_html(report, run_dir))
    return report


def _graph_task(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The model's task when no benchmark stage recorded it: the first stage's spec says."""
    for st in manifest["stages"]:
        path = run_dir / st["dir"] / "graph.json"
        if path.is_file():
            return read_json(path).get("spec", {}).get("task", "classification")
    return "classification"


def _plots(run_dir: Path, report: dict[str, Any]) -> dict[str, str]:
    """PNG files under ``run_dir/plots``, by name, relative to the run dir."""
    from edgevit.report_plots import accuracy_latency, layer_costs

    out: dict[str, str] = {}
    if accuracy_latency(report, run_dir / "plots" / "accuracy_latency.png"):
        out["accuracy_latency"] = "plots/accuracy_latency.png"
    stages = report["stages"]
    for before, after in zip(stages, stages[1:], strict=False):
        if after["name"] == "prune" and before.get("layers") and after.get("layers"):
            name = f"layers_{after['stage']}"
            if layer_costs(before, after, run_dir / "plots" / f"{name}.png"):
                out[name] = f"plots/{name}.png"
    return out


def read_report(path: Path) -> dict[str, Any]:
    """A report.json this code can read: same schema version or older (version 1 had no key)."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise EdgeVitError(f"report: cannot read {path} as JSON: {e}") from e
    version = data.get("schema_version", 1) if isinstance(data, dict) else None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise EdgeVitError(f"report: {path} has report schema version {version!r}; this edgevit reads up to "
                           f"{SCHEMA_VERSION}: upgrade edgevit, or rebuild it with `edgevit report RUN_DIR`")
    return data


def read_measured(path: Path) -> dict[str, Any]:
    """A Jetson-side result file, checked enough to say clearly when it is something else."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise EdgeVitError(f"report: cannot read {path} as JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != MEASURED_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EdgeVitError(f"report: {path} is not a device measurement (format {got!r}, expected "
                           f"{MEASURED_FORMAT!r}); pass the JSON edgevit_jetson_bench.py wrote")
    if not isinstance(data.get("stages"), list) or not all(isinstance(s, dict) and "stage" in s
                                                           for s in data["stages"]):
        raise EdgeVitError(f"report: {path} has no list of stages with a 'stage' name each")
    return data


def _attach_device_measurements(run_dir: Path, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every file under ``run_dir/measured/`` (added by ``edgevit report --measured``)."""
    devices = []
    by_stage = {s["stage"]: s for s in stages}
    for path in sorted((run_dir / "measured").glob("*.json")):
        data = read_measured(path)
        devices.append({"file": str(path.relative_to(run_dir)), **(data.get("device") or {})})
        for m in data["stages"]:
            entry = by_stage.get(m["stage"])
            if entry is not None:
                entry.setdefault("measured_on_device", []).append({"device": data.get("device"), **m})
    return devices


def fmt(value: Any, spec: str = "", scale: float = 1.0) -> str:
    if value is None:
        return DASH
    return format(value / scale, spec) if scale != 1.0 else format(value, spec)


HOST_COLUMNS = ["stage", "top-1 %", "params M", "GFLOPs", "size MB", "p50 ms", "spread ms", "p99 ms", "img/s",
                "mem MB"]  # the host table, alike in the CLI, report.md and report.html


def host_cells(s: dict[str, Any]) -> list[str]:
    lat = s.get("host_latency") or {}
    return [s["stage"], fmt(s.get("top1"), ".2f"), fmt(s.get("params"), ".3f", 1e6),
            fmt(s.get("flops"), ".4f", 1e9), fmt(s.get("size_bytes"), ".2f", 1e6),
            fmt(lat.get("median_ms"), ".3f"), fmt(lat.get("spread_ms"), ".3f"), fmt(lat.get("p99_ms"), ".3f"),
            fmt(s.get("throughput_ips"), ".0f"), fmt(s.get("peak_mem_mb"), ".0f")]


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The host table of the run's task (segmentation: ``report_seg.SEG_COLUMNS``)."""
    if report.get("task") == "segmentation":
        from edgevit.report_seg import seg_table_rows

        return seg_table_rows(report)
    return list(HOST_COLUMNS), [host_cells(s) for s in report["stages"]]


def host_line(report: dict[str, Any]) -> str | None:
    """What the host figures mean, and on what they were measured."""
    host = report.get("host")
    if not host:
        return None
    threads = host.get("threads")
    rounds = next((s["host_latency"].get("round_medians_ms") for s in report["stages"] if s.get("host_latency")), [])
    load = host.get("load_average")
    busy = f", load average {load}" if load is not None else ""
    return (f"Host: {host['cpu']}, {host['cores']} cores, {threads} thread{'s' if threads != 1 else ''}{busy}; "
            f"onnxruntime {host['onnxruntime']}, torch {host['torch']}. p50/p99: latency at batch 1 with ONNX "
            f"Runtime after warm-up, the median over {len(rounds) or 'the'} interleaved rounds (every model once "
            "per round); spread: the largest minus the smallest round median; img/s: throughput at a larger batch; "
            "mem MB: peak RSS of the process that timed the model.")


def dash_note(report: dict[str, Any]) -> str:
    if report.get("host"):
        return (f"{DASH} = not measured for this stage (the benchmark times each ONNX file once: a bundle ships the "
                "model of the stage before it).")
    return f"{DASH} = not measured (add a `benchmark` pass to measure every stage)."


def comparison_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """One line per compared pair whose latency difference is within the measurements' spread."""
    out = []
    for c in report.get("comparisons") or []:
        if c.get("within_spread"):
            lo, hi = c["speedup_range"]
            out.append((f"{c['from']} → {c['to']}",
                        f"batch-1 latency {c['difference_ms']:.3f} ms apart, within the {c['spread_ms']:.3f} ms "
                        f"spread between rounds (speed-up ×{c['speedup']:.2f}, ×{lo:.2f}–×{hi:.2f} over the rounds): "
                        "not a measured difference on this machine now; re-run on idle cores or with more rounds"))
    return out


def render_markdown(report: dict[str, Any]) -> str:
    head, rows = table_rows(report)
    out = [f"# edgevit report: {report['run']}", ""]
    line = host_line(report)
    if line:
        out += [line, ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", dash_note(report)]
    if report.get("task") == "segmentation":
        from edgevit.report_seg import teacher_note

        out += [note] if (note := teacher_note(report)) else []
    device_rows = prediction_rows(report)
    if device_rows:
        p_head, p_rows = device_rows
        profile = next(s["predicted"]["profile"] for s in report["stages"] if s.get("predicted"))
        out += ["", f"## Predicted on {profile}", "",
                "Batch-1 latency from a per-kernel roofline fitted to published measurements on the device, "
                "memory of one inference process, and whether the stage deploys as it is.", ""]
        out += ["| " + " | ".join(p_head) + " |", "|" + "---|" * len(p_head)]
        out += ["| " + " | ".join(r) + " |" for r in p_rows]
        reasons = [(s["stage"], r) for s in report["stages"] for r in
                   [*(s.get("predicted") or {}).get("reasons", []), *(s.get("predicted") or {}).get("notes", [])]]
        out += [""] + [f"- **{stage}**: {r}" for stage, r in reasons] if reasons else []
    notes = stage_notes(report)
    if notes:
        out += ["", "## Stages", ""] + [f"- **{stage}**: {note}" for stage, note in notes]
    for name, path in (report.get("plots") or {}).items():
        out += ["", f"![{name}]({path})"]
    if report.get("task") == "segmentation":
        from edgevit.report_seg import markdown_sections

        out += markdown_sections(report)
    return "\n".join(out) + "\n"


def device_median_ms(m: dict[str, Any]) -> float | None:
    """Median device latency of a measured stage, host<->device copies included when the
    board script timed them: the predictor's published fit points include copies, so this is
    the figure to set beside a prediction (in every rendering of the report)."""
    return (m.get("latency_with_copies_ms") or m.get("latency_ms") or {}).get("median")


def interval_text(p: dict[str, Any]) -> str:
    """The predicted latency's interval (from the fit's leave-one-family-out errors), as "a–b"."""
    iv = p.get("latency_interval_ms")
    return f"{iv[0]:.2f}–{iv[1]:.2f}" if iv else "—"


def prediction_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Predicted vs (when a device result was added) measured, one row per stage."""
    if not any(s.get("predicted") for s in report["stages"]):
        return None
    measured = any(s.get("measured_on_device") for s in report["stages"])
    head = ["stage", "precision", "pred ms", "interval ms", "pred MB", "verdict"]
    if measured:
        head += ["device ms (p50)", "error %", "device top-1 %", "device RAM MB"]  # ms: copies included
    rows = []
    for s in report["stages"]:
        p = s.get("predicted")
        if not p:
            continue
        row = [s["stage"], p["precision"], fmt(p.get("latency_ms"), ".2f"), interval_text(p),
               fmt(p.get("memory_mb"), ".0f"), p["verdict"]]
        if measured:
            m = (s.get("measured_on_device") or [{}])[-1]
            got = device_median_ms(m)
            err = (100 * (p["latency_ms"] - got) / got) if got and p.get("latency_ms") is not None else None
            row += [fmt(got, ".2f"), fmt(err, "+.1f"), fmt(m.get("top1"), ".2f"), fmt(m.get("peak_mem_mb"), ".0f")]
        rows.append(row)
    return head, rows


def _val(m: dict[str, Any]) -> str:
    """A training stage's validation figure: its mIoU when it has one (segmentation), else top-1."""
    if m.get("val_miou") is not None:
        return f"{m['val_miou']:.2f}% val mIoU"
    return f"{m.get('val_top1')}% val top-1"


def stage_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """One sentence per stage that built something worth explaining (e.g. how a student was made)."""
    notes = []
    for s in report["stages"]:
        m = s.get("metrics") or {}
        tuner = m.get("tuner") or (m.get("recover") or {}).get("tuner")
        if tuner:
            extra = f", {tuner['added_params']:,} added" if tuner.get("added_params") else ", none added"
            notes.append((s["stage"], f"tuner {tuner['name']}: {tuner['trainable_params']:,} parameters "
                                      f"trained{extra}"))
        if "student" in m:
            ratio = m.get("flops_ratio")
            vs = f"; {ratio:.3f}× the teacher's FLOPs" if ratio is not None else ""
            notes.append((s["stage"], f"student {m['student']}{vs}; trained to {_val(m)} in "
                                      f"{m.get('epochs')} epochs"))
        if "flops_kept" in m and "method" in m:
            aim = m.get("aim") or {}
            goal = (f" (target: {aim['target_metric']} {aim['target_keep']})" if "target_metric" in aim else "")
            rec = m.get("recover")
            after = f"; recovered to {_val(rec)} in {rec['epochs']} epochs" if rec else "; one-shot"
            notes.append((s["stage"], f"{m['method']} pruning kept {m['flops_kept']:.3f} of the FLOPs and "
                                      f"{m['params_kept']:.3f} of the parameters{goal}; heads per block "
                                      f"{m['heads']}, MLP units {m['mlp_units']}{after}"))
    return notes + comparison_notes(report)
