"""``edgevit inspect MODEL``: the structural spec and per-layer cost of a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgevit.errors import EdgeVitError


def inspect(
    model: str = typer.Argument(..., help="a timm model name, a saved stage directory, or an .onnx file"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="show the per-layer table"),
) -> None:
    """Show a model's spec (blocks, heads, MLP units) and per-layer MACs, parameters, activations."""
    console = Console()
    path = Path(model)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise EdgeVitError(f"inspect: file not found: {path}")
        if path.stat().st_size == 0:
            raise EdgeVitError(f"inspect: {path} is empty (0 bytes), not an ONNX model; export it again")
        _inspect_onnx(path, console, layers)
        return
    from edgevit.graph import ModelGraph
    from edgevit.models.sources import TimmSource, load_model

    if path.is_dir():
        graph = ModelGraph.load(path, where="inspect")
    elif path.exists():
        raise EdgeVitError(f"inspect: {path} is neither a stage directory nor an .onnx file")
    else:
        graph = load_model(TimmSource(source="timm", name=model))
    s = graph.spec
    cost = graph.cost()
    console.print(
        f"[bold]{graph.describe_build()}[/bold] ({s.family}): {s.img_size[0]}x{s.img_size[1]} input, patch "
        f"{s.patch_size[0]}, embed {s.embed_dim}, {s.depth} blocks, {s.num_tokens} tokens, {s.num_classes} classes\n"
        f"{cost.params / 1e6:.3f} M params, {cost.macs / 1e6:.2f} M MACs, {cost.flops / 1e9:.4f} GFLOPs at batch 1"
    )
    blocks = Table(title="blocks")
    for col in ("block", "heads x head_dim", "attention", "MLP hidden"):
        blocks.add_column(col, justify="right" if col != "attention" else "left")
    for b in s.blocks:
        kind = "fused qkv" if b.attn.fused else "q/k/v"
        blocks.add_row(str(b.index), f"{b.attn.num_heads} x {b.attn.head_dim}", kind, str(b.mlp.hidden))
    console.print(blocks)
    if layers:
        t = Table(title="per-layer cost (batch 1, fp32)")
        for col in ("layer", "kind", "MMACs", "params", "out KB", "scratch KB"):
            t.add_column(col, justify="left" if col in ("layer", "kind") else "right")
        for x in cost.layers:
            t.add_row(x.name, x.kind, f"{x.macs / 1e6:.3f}", str(x.params), f"{x.output_bytes / 1024:.1f}",
                      f"{x.scratch_bytes / 1024:.1f}")
        console.print(t)


def _inspect_onnx(path: Path, console: Console, layers: bool) -> None:
    from edgevit.onnx_cost import onnx_summary

    s = onnx_summary(path)
    console.print(f"[bold]{path.name}[/bold]: opset {s['opset']}, inputs {s['inputs']}, outputs {s['outputs']}\n"
                  f"{s['params'] / 1e6:.3f} M params, {s['macs'] / 1e6:.2f} M MACs at batch 1")
    console.print("ops: " + ", ".join(f"{k} {v}" for k, v in s["ops"].items()))
    if layers:
        t = Table(title="matrix work (batch 1)")
        for col in ("node", "op", "MMACs"):
            t.add_column(col, justify="right" if col == "MMACs" else "left")
        for x in s["layers"]:
            t.add_row(x["name"], x["op"], f"{x['macs'] / 1e6:.3f}")
        console.print(t)
