"""export: ONNX with a parity check against the torch model on real inputs."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from edgevit.context import RunContext
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.onnx_io import export_onnx, op_counts, run_batches, session, simplify_onnx
from edgevit.passes.base import Pass, PassConfig


class ExportConfig(PassConfig):
    opset: int | None = Field(None, ge=11, le=21, description="ONNX opset; default: what the recipe's profile "
                              "parses (Jetson Nano: 13, LayerNorm decomposed), else 17")
    dynamic_batch: bool | None = Field(None, description="batch axis left symbolic; false fixes it to 1; "
                                       "default: what the recipe's profile asks for, else symbolic")
    simplify: bool = Field(True, description="fold constants and drop redundant nodes (ONNX Runtime basic "
                           "level, standard ops only), then onnx.checker")
    parity_samples: int = Field(64, ge=1, description="validation images compared torch vs ONNX Runtime")
    atol: float = Field(1e-3, gt=0, description="largest allowed |logit difference|")
    min_agreement: float = Field(0.99, ge=0, le=1, description="smallest allowed top-1 agreement")


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
        got = run_batches(session(path), images.numpy())
        diff = float(np.abs(ref - got).max())
        agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
        self.metrics = {
            "opset": opset,
            "dynamic_batch": dynamic,
            "simplified": simplified,
            "onnx_bytes": path.stat().st_size,
            "parity_max_abs_diff": diff,
            "parity_top1_agreement": agree,
            "parity_samples": len(images),
            "ops": op_counts(path),
        }
        if diff > cfg.atol or agree < cfg.min_agreement:
            raise EdgeVitError(
                f"export: ONNX output differs from torch (max |diff| {diff:.2e} > atol {cfg.atol:g} or "
                f"top-1 agreement {agree:.3f} < {cfg.min_agreement}); raise passes.export.atol only if "
                "that difference is acceptable"
            )
        graph.artifacts["onnx"] = path
        return graph
