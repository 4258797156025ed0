"""quantize: post-training FP16 or INT8 (calibrated, QDQ) of the exported ONNX model.

A segmenter is judged by mIoU (``edgevit.seg.metrics``) of both ONNX files on validation frames
at their masks' own resolution: ``miou``, ``float_miou``, ``miou_drop`` (points) and
``pixel_agreement`` with the float model, instead of top-1.

The target profile decides what is possible: INT8 asked for a device without INT8 kernels
(the Jetson Nano) becomes FP16 with one warning, or an error under ``strict``. The
quantized ONNX becomes the stage's ``onnx`` artifact, so ``benchmark`` measures it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgevit.context import RunContext
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx, op_counts, parity_metrics
from edgevit.passes.base import Pass, PassConfig
from edgevit.quantize.cpu_features import int8_weights_need_reduced_range
from edgevit.quantize.fp16 import KEEP_FP32, convert_fp16
from edgevit.quantize.int8 import (
    activation_matmuls,
    compute_activation_ranges,
    preprocess,
    quantizable_nodes,
    quantize_dynamic_int8,
    quantize_int8,
    quantized_nodes,
)
from edgevit.quantize.sensitivity import keep_in_float, logits, node_sensitivity, top1_score
from edgevit.seg.deploy import compare_onnx, onnx_miou, val_frames


class QuantizeConfig(PassConfig):
    precision: Literal["int8", "fp16"] = "int8"
    strict: bool = Field(False, description="fail instead of falling back when the profile lacks the precision")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "percentile", description="how activation ranges are chosen from the calibration images (static INT8)")
    percentile: float = Field(99.999, gt=50, le=100, description="percentile calibration: the kept range")
    layout: Literal["auto", "tensorrt", "ort_cpu", "ort_cpu_dynamic"] = Field(
        "auto", description="tensorrt: static QDQ, s8/s8 symmetric, zero point 0, float bias; ort_cpu: static QDQ "
        "with u8 activations; ort_cpu_dynamic: int8 weights, activations quantized at run time (no calibration; on "
        "the fused CPU form attention's projection too, as QAttention); auto: tensorrt for a TensorRT profile, "
        "else ort_cpu")
    reduce_range: bool | None = Field(
        None, description="ort_cpu layouts: 7-bit weights, which x86 CPUs without VNNI need (their u8×s8 kernels "
        "saturate with 8-bit weights); default: whether this host's CPU lacks VNNI")
    quantize_attention: bool | None = Field(
        None, description="also quantize attention's activation×activation MatMuls (q·kᵀ, attn·v); default: "
        "not for ort_cpu layouts (see the README's INT8 figures), yes otherwise")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm", "Conv"],
                                description="op types quantized (LayerNorm, Softmax, GELU, Add stay float)")
    exclude_op_types: list[str] = Field(default_factory=list)
    include_nodes: list[str] | None = Field(None, description="quantize only these node names")
    exclude_nodes: list[str] = Field(default_factory=list, description="node names kept in float")
    accuracy_budget: float | None = Field(
        None, ge=0, description="INT8: keep the most sensitive layers in float until top-1 (a segmenter: "
        "mIoU, masks at their own resolution) is within this many points of the float model's (on eval_samples "
        "validation images)")
    eval_samples: int = Field(500, ge=10, description="validation images used to check the budget and parity")
    keep_fp32: list[str] = Field(default_factory=lambda: list(KEEP_FP32), description="FP16: op types kept in FP32")
    opset: int | None = Field(None, ge=11, le=21, description="export opset when no earlier stage exported "
                              "(default: the profile's max_opset, else 17)")


class QuantizePass(Pass):
    name = "quantize"
    Config = QuantizeConfig
    summary = "post-training INT8 (QDQ, minmax/percentile/entropy calibration, accuracy budget) or FP16 ONNX"
    modifies_weights = False

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        precision = self._precision(cfg, ctx)
        src = graph.artifacts.get("onnx")
        if src is not None and any(t == "QuantizeLinear" for t in op_counts(src)):
            raise EdgeVitError("passes.quantize: the model is already quantized by an earlier stage")
        if src is None:
            opset = ctx.profile.export_opset(cfg.opset) if ctx.profile is not None else (cfg.opset or 17)
            src = ctx.stage_dir / "model.fp32.onnx"
            export_onnx(graph, src, opset=opset)
        self.metrics = {"precision": precision, "requested": cfg.precision}
        seg = graph.spec.task == "segmentation"
        if seg:  # mIoU on validation frames at their masks' own resolution
            eval_x, masks = val_frames(ctx.data, cfg.eval_samples, ctx.seed + 1)
            classes, ignore = ctx.data.num_classes, ctx.data.ignore_index

            def score(path: Path) -> float:
                return onnx_miou(path, eval_x, masks, classes, ignore)
        else:
            eval_x, eval_y = (t.numpy() for t in ctx.data.sample(cfg.eval_samples, ctx.seed + 1, "val"))
            score = top1_score(eval_x, eval_y)
        if precision == "fp16":
            out = ctx.stage_dir / "model.fp16.onnx"
            convert_fp16(src, out, cfg.keep_fp32)
            self.metrics["kept_fp32_ops"] = cfg.keep_fp32
        else:
            out = self._int8(cfg, ctx, src, score)
        sizes = {"size_bytes": out.stat().st_size, "float_size_bytes": src.stat().st_size}
        mb = f"{out.stat().st_size / 1e6:.2f} MB (float {src.stat().st_size / 1e6:.2f} MB)"
        if seg:
            cmp = compare_onnx(src, out, eval_x, masks, classes, ignore)
            self.metrics.update({"eval_samples": len(eval_x), **cmp, **sizes})
            ctx.console.print(f"  {precision}: mIoU {cmp['miou']} vs float {cmp['float_miou']} (drop "
                              f"{cmp['miou_drop']} points, pixel agreement {cmp['pixel_agreement']:.4f}) on "
                              f"{len(eval_x)} validation frames, {mb}")
        else:
            ref, q = logits(src, eval_x), logits(out, eval_x)
            self.metrics.update({
                "eval_samples": len(eval_y),
                "float_top1": round(100.0 * float((ref.argmax(1) == eval_y).mean()), 2),
                "quantized_top1": round(100.0 * float((q.argmax(1) == eval_y).mean()), 2),
                "parity": parity_metrics(ref, q),  # against the float model it quantized
                **sizes,
            })
            ctx.console.print(f"  {precision}: top-1 {self.metrics['quantized_top1']}% vs float "
                              f"{self.metrics['float_top1']}% on {len(eval_y)} validation images, {mb}")
        graph.artifacts["onnx"] = out
        return graph

    @classmethod
    def preflight(cls, config: PassConfig, ctx: RunContext, where: str) -> None:
        cfg: QuantizeConfig = config  # type: ignore[assignment]
        p = ctx.profile
        if p is not None and not p.supports(cfg.precision) and (cfg.strict or not p.supports("fp16")):
            raise EdgeVitError(f"{where}.precision: {p.name} does not support {cfg.precision} "
                               f"(it supports {', '.join(p.precisions)}); change the precision or the profile")

    def _precision(self, cfg: QuantizeConfig, ctx: RunContext) -> str:
        p = ctx.profile
        if p is None or p.supports(cfg.precision):
            return cfg.precision
        if cfg.precision == "int8" and p.supports("fp16") and not cfg.strict:
            ctx.console.print(f"[yellow]warning:[/yellow] {p.name} has no INT8 support ({', '.join(p.precisions)}); "
                              "quantizing to FP16 instead (set strict: true to fail)")
            return "fp16"
        raise EdgeVitError(f"passes.quantize.precision: {p.name} does not support {cfg.precision} "
                           f"(it supports {', '.join(p.precisions)})")

    def _int8(self, cfg: QuantizeConfig, ctx: RunContext, src: Path, score: Callable[[Path], float]) -> Path:
        layout = cfg.layout
        if layout == "auto":
            layout = "tensorrt" if ctx.profile is not None and ctx.profile.runtime == "tensorrt" else "ort_cpu"
        pre = ctx.stage_dir / "model.pre.onnx"
        preprocess(src, pre)
        op_types = [t for t in cfg.op_types if t not in cfg.exclude_op_types]
        attention = cfg.quantize_attention if cfg.quantize_attention is not None else layout == "tensorrt"
        skip = [] if attention else activation_matmuls(pre)
        candidates = [n for n in quantizable_nodes(pre, op_types) if n not in skip]
        nodes = cfg.include_nodes or candidates
        unknown = [n for n in (cfg.include_nodes or []) + cfg.exclude_nodes if n not in candidates]
        if unknown:
            raise EdgeVitError(f"passes.quantize: no quantizable node named {unknown[0]!r}; names look like "
                               f"{', '.join(candidates[:3])}")
        reduce_range = layout != "tensorrt" and (
            cfg.reduce_range if cfg.reduce_range is not None else int8_weights_need_reduced_range())
        self.metrics["reduce_range"] = reduce_range
        if layout == "ort_cpu_dynamic":
            if cfg.accuracy_budget is not None:
                raise EdgeVitError("passes.quantize.accuracy_budget: works with static layouts (tensorrt, ort_cpu)")
            out = ctx.stage_dir / "model.int8.onnx"
            fused = ["Attention"] if "Attention" in op_counts(pre) else []  # the CPU form: → QAttention
            quantize_dynamic_int8(pre, out, op_types + fused, cfg.exclude_nodes + skip, reduce_range)
            pre.unlink()
            self.metrics.update({"layout": layout, "calibration_method": None, "kept_float": cfg.exclude_nodes + skip})
            return out
        calibration_images = ctx.calibration()[0].numpy()
        ranges = compute_activation_ranges(pre, calibration_images, ctx.stage_dir / "calibration.ranges.json",
                                           cfg.calibration_method, cfg.percentile, layout, op_types)
        qargs = dict(calibration_method=cfg.calibration_method, layout=layout, op_types=op_types, ranges=ranges,
                     reduce_range=reduce_range)
        out = ctx.stage_dir / "model.int8.onnx"
        kept: list[str] = []
        if cfg.accuracy_budget is not None:
            with ctx.progress() as progress:
                task = progress.add_task("sensitivity", total=len(nodes), info="")
                sens = node_sensitivity(pre, ctx.stage_dir, nodes, calibration_images, qargs,
                                        lambda: progress.advance(task))
            ranked = sorted(sens, key=sens.__getitem__, reverse=True)
            outside = [n for n in candidates if n not in nodes]  # include_nodes limits what is quantized at all
            kept, _ = keep_in_float(pre, out, score, score(src), ranked, cfg.accuracy_budget, qargs,
                                    cfg.exclude_nodes + skip + outside)
            self.metrics["sensitivity"] = {k: round(v, 6) for k, v in sorted(sens.items(), key=lambda kv: -kv[1])}
            if kept:
                ctx.console.print(f"  kept in float to stay within {cfg.accuracy_budget} points: {', '.join(kept)}")
        else:
            quantize_int8(pre, out, nodes_to_quantize=cfg.include_nodes, nodes_to_exclude=cfg.exclude_nodes + skip,
                          **qargs)
        pre.unlink()
        self.metrics.update({"layout": layout, "calibration_method": cfg.calibration_method,
                             "calibration_images": len(calibration_images),
                             "quantized_nodes": len(quantized_nodes(out, op_types)),
                             "kept_float": kept + cfg.exclude_nodes + skip})
        return out
