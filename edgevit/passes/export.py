"""export: ONNX with a parity check against the torch model on real inputs.

With ``cpu_fusion`` (by default where the profile says ``cpu_form``: the host CPU) the stage
also writes the ONNX Runtime CPU form (``model.cpu.onnx``, see :mod:`edgevit.ort_fusion`),
gated by the same parity check, and hands it on as the stage's ``onnx``; the plain export
stays as ``onnx_portable``. TensorRT profiles (the Jetson path)
get the plain export only: no contrib ops.

A segmenter exports at its input size (the Resize of its upsample included) and is gated per
pixel (:mod:`edgevit.seg.deploy`): the fraction of pixels whose argmax class agrees must reach
``min_agreement``, and the max |logit difference| stay within ``atol``."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from edgevit.context import RunContext
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx, op_counts, parity_metrics, run_batches, session, simplify_onnx
from edgevit.ort_fusion import fuse_for_cpu
from edgevit.passes.base import Pass, PassConfig
from edgevit.seg.deploy import seg_parity


class ExportConfig(PassConfig):
    opset: int | None = Field(None, ge=11, le=21, description="ONNX opset; default: what the recipe's profile "
                              "parses (Jetson Nano: 13, LayerNorm decomposed), else 17")
    dynamic_batch: bool | None = Field(None, description="batch axis left symbolic; false fixes it to 1; "
                                       "default: what the recipe's profile asks for, else symbolic")
    simplify: bool = Field(True, description="fold constants and drop redundant nodes (ONNX Runtime basic "
                           "level, standard ops only), then onnx.checker")
    parity_samples: int = Field(64, ge=1, description="validation images compared torch vs ONNX Runtime")
    atol: float = Field(1e-3, gt=0, description="largest allowed |logit difference|")
    min_agreement: float = Field(0.99, ge=0, le=1, description="smallest allowed top-1 agreement; a segmenter: "
                                 "the smallest fraction of pixels whose argmax class agrees")
    cpu_fusion: bool | None = Field(None, description="also write the ONNX Runtime CPU form (edgevit.ort_fusion: "
                                    "attention fused, patch embedding as a MatMul, tanh GELU) and hand it on; "
                                    "ONNX Runtime profiles only (not TensorRT); default: the profile's cpu_form "
                                    "(host: yes)")
    cpu_attention: bool = Field(True, description="CPU form: attention as com.microsoft.Attention (QAttention "
                                "under dynamic INT8), each region checked against the unfused graph")
    approximate_gelu: bool = Field(True, description="CPU form: GELU as its tanh approximation (FastGelu, "
                                   "|error| < 5e-4), gated by the same parity check")
    head_tokens_only: bool = Field(True, description="CPU form: where the head reads one token (the class "
                                   "token), the last block computes that token alone (edgevit.unread_tokens; "
                                   "the same sums)")


class ExportPass(Pass):
    name = "export"
    Config = ExportConfig
    summary = "ONNX export (the profile's opset and batch shape), simplified, onnx.checker, parity vs torch"
    modifies_weights = False

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: ExportConfig = self.config  # type: ignore[assignment]
        path = ctx.stage_dir / "model.onnx"
        opset = cfg.opset or 17
        if ctx.profile is not None:
            opset = ctx.profile.export_opset(cfg.opset)
            if cfg.opset is not None and opset != cfg.opset:
                ctx.console.print(f"[yellow]warning:[/yellow] {ctx.profile.name} parses ONNX up to opset {opset}"
                                  f"{'' if ctx.profile.layernorm_op else ' without LayerNormalization'}; "
                                  f"exporting at {opset} instead of {cfg.opset}")
        dynamic = cfg.dynamic_batch
        if dynamic is None:
            dynamic = not (ctx.profile is not None and ctx.profile.static_batch)
        export_onnx(graph, path, opset=opset, dynamic_batch=dynamic)
        simplified = simplify_onnx(path) if cfg.simplify else None
        images, _ = ctx.data.sample(cfg.parity_samples, ctx.seed, "val")
        with torch.no_grad():
            ref = graph.module.cpu().eval()(images).numpy()
        parity = self._parity(cfg, path, images.numpy(), ref, graph.spec.task)
        self.metrics = {
            "opset": opset,
            "dynamic_batch": dynamic,
            "simplified": simplified,
            "onnx_bytes": path.stat().st_size,
            "parity": parity,
            "ops": op_counts(path),
        }
        graph.artifacts["onnx"] = path
        cpu_form = cfg.cpu_fusion if cfg.cpu_fusion is not None else (ctx.profile is not None
                                                                        and ctx.profile.cpu_form)
        if cpu_form:
            if ctx.profile is not None and ctx.profile.runtime == "tensorrt":
                raise EdgeVitError(f"passes.export.cpu_fusion: {ctx.profile.name} runs TensorRT, which has no "
                                   "ONNX Runtime contrib ops; set cpu_fusion: false")
            fused = ctx.stage_dir / "model.cpu.onnx"
            result, cpu_parity = self._cpu_form(cfg, ctx, path, fused, images.numpy(), ref, graph.spec.task)
            self.metrics["cpu_form"] = {"rewrites": result.rewrites, "attention_fused": result.attention_fused,
                                        "attention_regions": result.attention_regions,
                                        "unfused_regions": result.unfused_regions, "fused_ops": result.ops,
                                        "parity": cpu_parity}
            graph.artifacts["onnx_portable"] = path
            graph.artifacts["onnx"] = fused
        return graph

    def _cpu_form(self, cfg: ExportConfig, ctx: RunContext, path, fused, images: np.ndarray,  # noqa: ANN001
                  ref: np.ndarray, task: str) -> tuple:
        """The CPU form through the parity gate; where the tanh GELU alone fails it (a model whose
        logits amplify its error), exact GELU instead, with a warning."""
        approximate = cfg.approximate_gelu
        while True:
            result = fuse_for_cpu(path, fused, images[:4], cfg.cpu_attention, approximate,
                                  unread_tokens=cfg.head_tokens_only)
            try:
                return result, self._parity(cfg, fused, images, ref, task)
            except EdgeVitError as e:
                if not (approximate and result.rewrites.get("fast_gelu")):
                    raise
                ctx.console.print(f"[yellow]warning:[/yellow] the CPU form with tanh GELU failed parity "
                                  f"({str(e).split(';')[0]}); using exact GELU")
                approximate = False

    @staticmethod
    def _parity(cfg: ExportConfig, path, images: np.ndarray, ref: np.ndarray,  # noqa: ANN001
                task: str = "classification") -> dict:
        """ONNX Runtime's logits against torch's; raises past the configured bounds."""
        got = run_batches(session(path), images)
        if task == "segmentation":
            parity = seg_parity(ref, got)
            if parity["max_abs_diff"] > cfg.atol or parity["pixel_agreement"] < cfg.min_agreement:
                raise EdgeVitError(
                    f"export: {path.name} differs from torch on {len(images)} images (max |logit diff| "
                    f"{parity['max_abs_diff']:.2e} > atol {cfg.atol:g} or pixel agreement "
                    f"{parity['pixel_agreement']:.4f} < {cfg.min_agreement}; mean |diff| "
                    f"{parity['mean_abs_diff']:.2e}); raise passes.export.atol or lower min_agreement only if "
                    "that difference is acceptable")
            return parity
        parity = parity_metrics(ref, got)
        if parity["max_abs_diff"] > cfg.atol or parity["top1_agreement"] < cfg.min_agreement:
            raise EdgeVitError(
                f"export: {path.name} differs from torch (max |diff| {parity['max_abs_diff']:.2e} > atol "
                f"{cfg.atol:g} or top-1 agreement {parity['top1_agreement']:.3f} < {cfg.min_agreement}); raise "
                "passes.export.atol only if that difference is acceptable"
            )
        return parity
