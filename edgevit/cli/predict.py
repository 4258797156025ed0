"""``edgevit predict MODEL.onnx --profile jetson-nano``: how any ONNX file (a ViT, a CNN) would run
on a device: the predicted latency with its interval, the memory, and the verdict with its
reasons. Imports no torch: the prediction reads the ONNX file only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from edgevit.errors import EdgeVitError

PRECISIONS = ("fp32", "fp16", "int8")


def predict(
    model: Path = typer.Argument(..., help="an .onnx file"),
    profile: str = typer.Option("jetson-nano", "--profile", help="a device profile name or a profile YAML path"),
    precision: str | None = typer.Option(None, "--precision", help="fp16 | fp32 | int8 (default: the file's own, "
                                          "else the precision the device builds engines at)"),
    max_latency_ms: float | None = typer.Option(None, "--max-latency-ms", min=0.0,
                                                help="a latency limit the verdict checks, interval included"),
    as_json: bool = typer.Option(False, "--json", help="print the prediction as JSON"),
) -> None:
    """Predict latency (with its interval), memory and deployability of an ONNX file on a device."""
    from edgevit.predict.device import predict_onnx
    from edgevit.profiles import load_profile

    if precision is not None and precision not in PRECISIONS:
        raise EdgeVitError(f"predict: --precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if model.suffix != ".onnx":
        raise EdgeVitError(f"predict: {model} is not an .onnx file; export the model first (edgevit compress "
                           "with an export pass writes one)")
    if not model.is_file():
        raise EdgeVitError(f"predict: file not found: {model}")
    dev = load_profile(profile, where="predict")
    out = predict_onnx(model, dev, precision, latency_limit_ms=max_latency_ms)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    _show(model, out, Console())


def _show(model: Path, p: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{model.name}[/bold] on {p['profile']} at {p['precision']} ({p['kernels']} kernels, "
                  f"{p['gflops']} GFLOPs)")
    if p["latency_ms"] is None:
        console.print(f"latency: not predicted ({p['fit']})")
    else:
        lo, hi = p["latency_interval_ms"]
        console.print(f"latency: {p['latency_ms']:.1f} ms predicted, {lo:.1f}-{hi:.1f} ms interval")
        console.print(f"  fit: {p['fit']}", soft_wrap=True)
        if p.get("interval_from"):
            console.print(f"  interval: {p['interval_from']}", soft_wrap=True)
    if p["memory_mb"] is not None:
        b = p["memory_breakdown_mb"]
        console.print(f"memory: {p['memory_mb']:.0f} MB (weights {b['weights']:.1f}, activations "
                      f"{b['activations']:.1f}, workspace {b['workspace']}, runtime {b['runtime']})")
    console.print(f"verdict: [bold]{p['verdict']}[/bold]")
    for r in p["reasons"]:
        console.print(f"  - {r}", soft_wrap=True)
    for n in p["notes"]:
        console.print(f"  note: {n}", soft_wrap=True)
