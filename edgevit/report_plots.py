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


OFFSETS = [(6, 6), (6, -13), (-8, 8), (-8, -15), (6, 18), (6, -25), (-8, 20), (-8, -27), (6, 30), (6, -37)]


def _place_labels(fig: Any, ax: Any, pts: list[tuple[str, float, float]]) -> None:
    """Stage names beside their points, each at the first offset where it overlaps no label
    placed before it (stages with near-equal latency and accuracy sit on top of each other)."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for name, x, y in pts:
        for dx, dy in OFFSETS:
            ha = "left" if dx > 0 else "right"
            label = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=ha,
                                annotation_clip=False)
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            label.remove()
        else:  # every spot taken: the last one, so the name is still shown
            placed.append(ax.annotate(name, (x, y), textcoords="offset points", xytext=OFFSETS[-1],
                                      fontsize=8).get_window_extent(renderer))


def top1_limits(tops: list[float]) -> tuple[float, float] | None:
    """A y-range for the useful stages when the first (an untrained source at chance level, say)
    lies so far below them that including it would flatten them onto one line; else None."""
    if len(tops) < 3:
        return None
    rest = tops[1:]
    lo, hi = min(rest), max(rest)
    pad = max(1.0, 0.25 * (hi - lo))
    if tops[0] >= lo - 4 * pad:
        return None
    return lo - pad, hi + pad


def accuracy_latency(report: dict[str, Any], out: Path) -> Path | None:
    """Top-1 (segmentation: mIoU) against host latency (and predicted device latency), stages
    joined in run order."""
    from edgevit.report import metric_of

    key, label = metric_of(report)
    stages = [s for s in report["stages"] if s.get(key) is not None]
    host = [(s["stage"], (s.get("host_latency") or {}).get("median_ms"), s[key]) for s in stages]
    host = [h for h in host if h[1] is not None]
    device = [(s["stage"], (s.get("predicted") or {}).get("latency_ms"), s[key]) for s in stages]
    device = [d for d in device if d[1] is not None]
    if not host:
        return None
    plt = _pyplot()
    panels = [("host (ONNX Runtime, batch 1, median ms)", host)]
    if device:
        profile = next(s["predicted"]["profile"] for s in stages if s.get("predicted"))
        panels.append((f"{profile} (predicted ms)", device))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels, strict=True):
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        limits = top1_limits(ys)
        shown = list(pts)
        if limits is not None:  # the first stage goes below the axis, drawn as an arrow at its edge
            first = pts[0]
            right = first[1] > (min(xs) + max(xs)) / 2  # keep the text inside the panel
            ax.annotate(f"{first[0]}: {first[2]:.2f} % (below)", (first[1], limits[0]), xytext=(0, 14),
                        textcoords="offset points", ha="right" if right else "left", fontsize=8, color="#52606d",
                        arrowprops={"arrowstyle": "->", "color": "#9aa5b1"})
            shown = pts[1:]
            xs_line, ys_line = [p[1] for p in shown], [p[2] for p in shown]
        else:
            xs_line, ys_line = xs, ys
        ax.plot(xs_line, ys_line, "-", color="#9aa5b1", zorder=1)
        ax.scatter(xs_line, ys_line, c=range(len(shown)), cmap="viridis", s=48, zorder=2)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.set_xlabel(title)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15)
    fig.suptitle(f"{report['run']}: accuracy against latency, stage by stage")
    fig.tight_layout()
    for ax, (_, pts) in zip(axes[0], panels, strict=True):
        limits = top1_limits([p[2] for p in pts])
        _place_labels(fig, ax, pts[1:] if limits is not None else pts)
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
