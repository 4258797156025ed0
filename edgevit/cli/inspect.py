"""``edgevit inspect MODEL``: the structural spec and per-layer cost of a model.

MODEL is whatever a recipe's ``model:`` can name: a timm model name (with ``--kwargs``), a
recipe (its ``model:`` section), a Hugging Face directory, a stage directory of a run, or an
exported ``.onnx`` file. The per-block table is built from every field of the block spec, so
a field an adapter adds (layer scale, q/k norms, ...) shows up without changes here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgevit.cli.console import name_column, stdout_console
from edgevit.errors import EdgeVitError


def inspect(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="a timm model name, a recipe .yaml, a Hugging Face directory, a stage "
                                "directory, or an .onnx file"),
    kwargs: str | None = typer.Option(None, "--kwargs", metavar="JSON",
                                      help='timm constructor arguments, e.g. \'{"img_size": 32, "num_classes": 10}\''),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="show the per-layer table"),
) -> None:
    """Show a model's spec (every field of every block) and per-layer MACs, parameters, activations."""
    console = stdout_console()
    path = Path(model).expanduser()
    if kwargs is not None and (path.exists() or path.suffix in (".onnx", ".yaml", ".yml")):
        raise EdgeVitError("inspect: --kwargs is for a timm model name; a recipe, directory or ONNX file "
                           "carries its own construction")
    if path.suffix == ".onnx":
        if not path.is_file():
            raise EdgeVitError(f"inspect: file not found: {path}")
        if path.stat().st_size == 0:
            raise EdgeVitError(f"inspect: {path} is empty (0 bytes), not an ONNX model; export it again")
        _inspect_onnx(path, console, layers)
        return
    _inspect_graph(_load(model, path, kwargs), console, layers)


def _load(model: str, path: Path, kwargs: str | None) -> Any:
    from edgevit.graph import ModelGraph
    from edgevit.models.sources import HFSource, TimmSource, load_model
    from edgevit.registry import Registry

    registry = Registry()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise EdgeVitError(f"inspect: recipe not found: {path}")
        from edgevit.recipe import load_recipe

        rec, _ = load_recipe(path, [], registry)
        return load_model(rec.model, registry)
    if path.is_dir():
        if (path / "graph.json").is_file():
            return ModelGraph.load(path, registry, where="inspect")
        if (path / "config.json").is_file():
            return load_model(HFSource(source="hf", path=path), registry)
        raise EdgeVitError(f"inspect: {path} is neither a stage directory (graph.json) nor a Hugging Face "
                           "directory (config.json)")
    if path.exists():
        raise EdgeVitError(f"inspect: {path} is not a recipe (.yaml), a directory or an .onnx file")
    try:
        kw = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as e:
        raise EdgeVitError(f"inspect: --kwargs is not JSON ({e.msg}); write it like '{{\"num_classes\": 10}}'") from e
    if not isinstance(kw, dict):
        raise EdgeVitError("inspect: --kwargs must be a JSON object of constructor arguments")
    return load_model(TimmSource(source="timm", name=model, kwargs=kw), registry)


def flat_fields(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested spec fields as dotted keys: {"attn.num_heads": 3, ...}."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def block_fields(spec: Any) -> tuple[list[str], list[dict[str, str]], dict[str, str]]:
    """(columns that differ between blocks, one row per block, fields every block shares).
    Paths are shown relative to their block, so ``blocks.3.attn.qkv`` reads ``attn.qkv``."""
    rows = []
    for b in spec.blocks:
        fields = flat_fields(b.model_dump(mode="json"))
        prefix = f"{b.path}."
        rows.append({k: (v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else
                         "—" if v is None else str(v)) for k, v in fields.items() if k != "path"})
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    same = {k: rows[0].get(k, "—") for k in keys if k != "index" and len({r.get(k, "—") for r in rows}) == 1}
    return [k for k in keys if k not in same], rows, same


def _inspect_graph(graph: Any, console: Console, layers: bool) -> None:
    s = graph.spec
    cost = graph.cost()
    console.print(
        f"[bold]{graph.describe_build()}[/bold] ({s.family}): {s.img_size[0]}x{s.img_size[1]} input, patch "
        f"{s.patch_size[0]}, embed {s.embed_dim}, {s.depth} blocks, {s.num_tokens} tokens, {s.num_classes} classes\n"
        f"{cost.params / 1e6:.3f} M params, {cost.macs / 1e6:.2f} M MACs, {cost.flops / 1e9:.4f} GFLOPs at batch 1"
    )
    model_fields = {k: v for k, v in flat_fields(s.model_dump(mode="json", exclude={"blocks"})).items()}
    console.print("model: " + ", ".join(f"{k} {v}" for k, v in model_fields.items()), soft_wrap=True)
    columns, rows, same = block_fields(s)
    if same:
        console.print("every block: " + ", ".join(f"{k} {v}" for k, v in same.items()), soft_wrap=True)
    if columns == ["index"]:
        console.print(f"all {len(rows)} blocks alike")
    blocks = Table()
    for col in columns:
        if col == "index":
            name_column(blocks, "block", justify="right")
        else:
            blocks.add_column(col, justify="right", overflow="fold")
    for r in rows:
        blocks.add_row(*(r.get(c, "—") for c in columns))
    if columns != ["index"]:
        console.print("blocks: the fields that differ")  # not a table title: that wraps to the table's width
        console.print(blocks)
    if layers:
        t = Table(title="per-layer cost (batch 1, fp32)", title_justify="left")
        name_column(t, "layer")
        t.add_column("kind")
        for col in ("MMACs", "params", "out KB", "scratch KB"):
            t.add_column(col, justify="right")
        for x in cost.layers:
            t.add_row(x.name, x.kind, f"{x.macs / 1e6:.3f}", str(x.params), f"{x.output_bytes / 1024:.1f}",
                      f"{x.scratch_bytes / 1024:.1f}")
        console.print(t)


def _inspect_onnx(path: Path, console: Console, layers: bool) -> None:
    from edgevit.onnx_cost import onnx_summary

    s = onnx_summary(path)
    console.print(f"[bold]{path.name}[/bold]: opset {s['opset']}, inputs {s['inputs']}, outputs {s['outputs']}\n"
                  f"{s['params'] / 1e6:.3f} M params, {s['macs'] / 1e6:.2f} M MACs at batch 1")
    console.print("ops: " + ", ".join(f"{k} {v}" for k, v in s["ops"].items()), soft_wrap=True)
    if layers:
        t = Table(title="matrix work (batch 1)", title_justify="left")
        name_column(t, "node")
        t.add_column("op")
        t.add_column("MMACs", justify="right")
        for x in s["layers"]:
            t.add_row(x["name"], x["op"], f"{x['macs'] / 1e6:.3f}")
        console.print(t)
