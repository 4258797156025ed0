"""How many heads and MLP units each block keeps: per-layer ratios, per-block overrides, or
a FLOPs/params target met by searching one uniform ratio (cost is linear in both counts,
so the search uses exact per-block slopes measured on the graph)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph


class BlockRatio(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: float | None = Field(None, ge=0, lt=1)
    mlp: float | None = Field(None, ge=0, lt=1)


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Literal["flops", "params", "latency"] = Field(
        "flops", description="latency: predicted batch-1 latency on the recipe's device profile")
    keep: float = Field(gt=0, le=1, description="the pruned model's cost as a fraction of the incoming model's")
    prune: Literal["both", "heads", "mlp"] = Field("both", description="which groups the uniform ratio applies to")


class PlanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed in each block")
    mlp: float = Field(0.0, ge=0, lt=1, description="fraction of MLP hidden units removed in each block")
    blocks: dict[int, BlockRatio] | None = Field(None, description="per-block ratios overriding heads/mlp")
    target: Target | None = Field(None, description="prune until flops/params reach this fraction (overrides ratios)")
    allocation: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: every block loses the same fraction; global: the fraction is over the "
        "whole model and blocks lose what ranks lowest (magnitude/taylor scores, normalised per block)")
    min_keep: float = Field(0.1, gt=0, le=1, description="global: the fraction of each block's groups that stays")
    round_to: int = Field(8, ge=1, description="kept MLP units are a multiple of this (aligned shapes run faster)")
    min_heads: int = Field(1, ge=1, description="heads every block keeps at least")


def _keep_units(hidden: int, ratio: float, round_to: int) -> int:
    if ratio <= 0:
        return hidden
    step = min(round_to, hidden)
    k = int(round(hidden * (1 - ratio) / step)) * step
    return max(step, min(hidden, k))


def _keep_heads(heads: int, ratio: float, floor: int) -> int:
    """Nearest count, halves rounded towards keeping (6 heads at 25 % keep 5, not 4)."""
    return heads if ratio <= 0 else max(min(floor, heads), min(heads, math.floor(heads * (1 - ratio) + 0.5)))


def counts_for(graph: ModelGraph, cfg: PlanConfig, heads: float, mlp: float) -> list[tuple[int, int]]:
    out = []
    for blk in graph.spec.blocks:
        r = (cfg.blocks or {}).get(blk.index)
        h = r.heads if r is not None and r.heads is not None else heads
        m = r.mlp if r is not None and r.mlp is not None else mlp
        out.append((_keep_heads(blk.attn.num_heads, h, cfg.min_heads), _keep_units(blk.mlp.hidden, m, cfg.round_to)))
    return out


Slopes = tuple[float, list[float], list[float]]


def _slopes(graph: ModelGraph, metric: str) -> Slopes:
    """Cost of the graph, and per block the cost of one head and of one MLP unit."""
    def per_block(g: ModelGraph) -> list[float]:
        rep = g.cost()
        return [sum(getattr(x, metric) for x in rep.layers if x.block == b.index) for b in g.spec.blocks]

    total = getattr(graph.cost(), metric)
    base = per_block(graph)
    h_g, u_g = graph.clone(), graph.clone()
    for b in graph.spec.blocks:
        if b.attn.num_heads > 1:
            h_g.keep_heads(b.index, range(b.attn.num_heads - 1))
        if b.mlp.hidden > 1:
            u_g.keep_mlp_units(b.index, range(b.mlp.hidden - 1))
    dh = [x - y for x, y in zip(base, per_block(h_g), strict=True)]
    du = [x - y for x, y in zip(base, per_block(u_g), strict=True)]
    return total, dh, du


def predicted(graph: ModelGraph, counts: list[tuple[int, int]], slopes: Slopes) -> float:
    total, dh, du = slopes
    for blk, (h, u), a, b in zip(graph.spec.blocks, counts, dh, du, strict=True):
        total -= (blk.attn.num_heads - h) * a + (blk.mlp.hidden - u) * b
    return total


def _predicted_ms(graph: ModelGraph, profile: Any) -> float:
    """Predicted batch-1 latency of ``graph`` on ``profile`` at the precision it deploys at:
    exported as the export pass would, one kernel graph (one ONNX Runtime shape probe)."""
    import tempfile
    from pathlib import Path

    from edgevit.onnx_io import export_onnx
    from edgevit.predict.kernels import kernel_graph
    from edgevit.predict.roofline import PRECISION_BYTES, latency_ms

    precision = profile.deploy_precision()
    peak = profile.peak_gflops.get(precision) or profile.peak_gflops.get("fp16")
    if not peak or not profile.memory_bandwidth_gbps:
        raise EdgeVitError(f"passes.prune.target: {profile.name} has no peak FLOPs or memory bandwidth for "
                           f"{precision}; a latency target needs both")
    with tempfile.TemporaryDirectory(prefix="edgevit-prune-probe-") as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(graph, path, opset=profile.export_opset(), dynamic_batch=not profile.static_batch)
        kg = kernel_graph(path, PRECISION_BYTES[precision])
    return round(latency_ms(kg, peak, profile.memory_bandwidth_gbps, profile.roofline).total_ms, 3)  # as predicted


def _latency_plan(graph: ModelGraph, cfg: PlanConfig, profile: Any) -> tuple[list[tuple[int, int]], dict]:
    """The smallest uniform ratio whose predicted latency reaches the goal, by bisection
    (latency falls as the ratio grows). Each distinct pruned shape is exported and predicted
    once (one shape probe), however many ratios round to it."""
    t = cfg.target
    assert t is not None
    if profile is None or profile.roofline is None:
        raise EdgeVitError("passes.prune.target: metric latency needs a recipe profile with a fitted latency "
                           "model (e.g. profile: jetson-nano)")

    def counts(r: float) -> list[tuple[int, int]]:
        return counts_for(graph, cfg, r if t.prune != "mlp" else 0.0, r if t.prune != "heads" else 0.0)

    probes: dict[tuple[tuple[int, int], ...], float] = {}

    def latency(r: float) -> float:
        key = tuple(counts(r))
        if key not in probes:
            g = graph.clone()
            for blk, (h, u) in zip(list(g.spec.blocks), key, strict=True):
                g.keep_heads(blk.index, range(h))
                g.keep_mlp_units(blk.index, range(u))
            probes[key] = _predicted_ms(g, profile)
        return probes[key]

    probes[tuple((b.attn.num_heads, b.mlp.hidden) for b in graph.spec.blocks)] = base = _predicted_ms(graph, profile)
    goal = t.keep * base
    hi = 0.999
    floor = latency(hi)
    if floor > goal:
        raise EdgeVitError(
            f"passes.prune.target: latency keep {t.keep} is out of reach on {profile.name}; pruning every block to "
            f"its floor leaves {floor / base:.3f} of the predicted {base:.2f} ms (the rest is the kernels "
            "pruning cannot remove)")
    lo = 0.0
    for _ in range(10):
        mid = (lo + hi) / 2
        if latency(mid) <= goal:
            hi = mid
        else:
            lo = mid
    after = latency(hi)
    return counts(hi), {"target_metric": "latency", "target_keep": t.keep, "uniform_ratio": round(hi, 4),
                        "profile": profile.name, "predicted_ms_before": round(base, 3),
                        "predicted_ms_after": round(after, 3),  # the estimate is what the plan aims at
                        "predicted_interval_ms_after": [round(x, 3) for x in profile.roofline.interval(after)],
                        "latency_probes": len(probes)}


def plan(graph: ModelGraph, cfg: PlanConfig, profile: Any = None) -> tuple[list[tuple[int, int]], dict]:
    """Per block (heads kept, units kept), and what the plan aimed at."""
    for b in cfg.blocks or {}:
        if not 0 <= b < graph.spec.depth:
            raise EdgeVitError(
                f"passes.prune.blocks: block {b} does not exist; the model has 0..{graph.spec.depth - 1}")
    if cfg.target is None:
        return counts_for(graph, cfg, cfg.heads, cfg.mlp), {"heads": cfg.heads, "mlp": cfg.mlp}
    t = cfg.target
    if t.metric == "latency":
        return _latency_plan(graph, cfg, profile)
    slopes = _slopes(graph, t.metric)
    goal = t.keep * slopes[0]
    best = None
    for i in range(0, 1000):  # the smallest uniform ratio that reaches the goal
        r = i / 1000
        counts = counts_for(graph, cfg, r if t.prune != "mlp" else 0.0, r if t.prune != "heads" else 0.0)
        if predicted(graph, counts, slopes) <= goal + 1e-6:
            best = (r, counts)
            break
    if best is None:
        floor = predicted(graph, counts_for(graph, cfg, 0.999, 0.999), slopes) / slopes[0]
        raise EdgeVitError(
            f"passes.prune.target: {t.metric} keep {t.keep} is out of reach; pruning every block to its floor "
            f"(min_heads {cfg.min_heads}, round_to {cfg.round_to}) leaves {math.ceil(floor * 1000) / 1000:.3f}"
        )
    return best[1], {"target_metric": t.metric, "target_keep": t.keep, "uniform_ratio": best[0]}


def global_counts(graph: ModelGraph, cfg: PlanConfig, scores: list[tuple[torch.Tensor, torch.Tensor]],
                  heads: float, mlp: float) -> list[tuple[int, int]]:
    """Remove ``heads``/``mlp`` of all heads/units in the model, lowest score first (each block's
    scores divided by their mean so blocks compare), never below ``min_keep`` of a block."""
    out = [[b.attn.num_heads, b.mlp.hidden] for b in graph.spec.blocks]
    for k, ratio in ((0, heads), (1, mlp)):
        if ratio <= 0:
            continue
        sizes = [len(s[k]) for s in scores]
        norm = [s[k].double() / s[k].double().mean().clamp_min(1e-30) for s in scores]
        floors = [max(cfg.min_heads if k == 0 else 1, math.ceil(cfg.min_keep * n)) for n in sizes]
        order = sorted((float(v), b) for b, vals in enumerate(norm) for v in vals)
        to_remove = int(round(ratio * sum(sizes)))
        for _, b in order:
            if to_remove == 0:
                break
            if out[b][k] > floors[b]:
                out[b][k] -= 1
                to_remove -= 1
    counts = []
    for (h, u), blk in zip(out, graph.spec.blocks, strict=True):
        step = min(cfg.round_to, blk.mlp.hidden)
        counts.append((h, u if u == blk.mlp.hidden else max(step, int(round(u / step)) * step)))
    return counts
