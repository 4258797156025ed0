"""The report's pictures (PNG): where each stage sits between accuracy and latency, and what
pruning removed layer by layer. matplotlib with the Agg backend; no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgevit.fileio import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def accuracy_latency(report: dict[str, Any], out: Path) -> Path | None:
    """Top-1 against host latency (and predicted device latency), stages joined in run order."""
    stages = [s for s in report["stages"] if s.get("top1") is not None]
    host = [(s["stage"], (s.get("latency_ms") or {}).get("median"), s["top1"]) for s in stages]
    host = [h for h in host if h[1] is not None]
    device = [(s["stage"], (s.get("predicted") or {}).get("latency_ms"), s["top1"]) for s in stages]
    device = [d for d in device if d[1] is not None]
    if not host:
        return None
    plt = _pyplot()
    panels = [("host (ONNX Runtime, batch 1, median ms)", host)]
    if device:
        profile = next(s["predicted"]["profile"] for s in stages if s.get("predicted"))
        panels.append((f"{profile} (predicted ms)", device))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels, strict=True):
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, "-", color="#9aa5b1", zorder=1)
        ax.scatter(xs, ys, c=range(len(pts)), cmap="viridis", s=48, zorder=2)
        for i, (name, x, y) in enumerate(pts):  # alternate above/below so neighbours do not overlap
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 6 if i % 2 else -12), fontsize=8)
        ax.set_xlabel(title)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['run']}: accuracy against latency, stage by stage")
    return _save(plt, fig, out)


def _block_flops(layers: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for x in layers:
        if x.get("block") is None:
            continue
        attn = x["kind"] == "attention" or ".attn" in x["name"] or ".attention" in x["name"]
        kind = "attention" if attn else "mlp"  # the MLP and everything else in the block
        out.setdefault(x["block"], {}).setdefault(kind, 0.0)
        out[x["block"]][kind] += x["flops"] / 1e6
    return out


def layer_costs(before: dict[str, Any], after: dict[str, Any], out: Path) -> Path | None:
    """Per-block MFLOPs (attention / MLP) of the model before and after a pruning stage."""
    b, a = _block_flops(before["layers"]), _block_flops(after["layers"])
    blocks = sorted(set(b) & set(a))
    if not blocks:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(blocks) + 2), 3.8))
    width = 0.38
    for j, (label, data, color) in enumerate(((before["stage"], b, "#9aa5b1"), (after["stage"], a, "#2a9d8f"))):
        xs = [i + (j - 0.5) * width for i in range(len(blocks))]
        att = [data[k].get("attention", 0) for k in blocks]
        mlp = [data[k].get("mlp", 0) for k in blocks]
        ax.bar(xs, att, width, color=color, alpha=0.55, label=f"{label}: attention")
        ax.bar(xs, mlp, width, bottom=att, color=color, label=f"{label}: MLP and the rest")
    ax.set_xticks(range(len(blocks)), [f"block {k}" for k in blocks])
    ax.set_ylabel("MFLOPs per image")
    ax.set_title(f"per-block cost before and after {after['stage']}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, out)
