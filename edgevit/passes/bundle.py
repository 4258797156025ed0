"""bundle: a deploy bundle of the previous stage's ONNX for the recipe's device profile, with
a prediction, a validation subset and the Jetson-side script (see edgevit.deploy.bundle).

A segmenter's bundle ships its validation frames with the masks at their own resolution and
``task``, ``classes``, ``num_classes`` and ``ignore_index`` in bundle.json, so the board's
script scores the same mIoU the host does."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from edgevit.context import RunContext
from edgevit.deploy.bundle import write_bundle
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.onnx_io import INPUT, export_onnx
from edgevit.passes.base import Pass, PassConfig
from edgevit.predict.device import onnx_precision, predict_onnx
from edgevit.predict.kernels import kernel_graph
from edgevit.seg.deploy import pack_masks, val_frames

# How edgevit's data pipeline (edgevit.data.task_data) brings an image to the model's input: a client
# scoring images of another size must do the same (tests/test_deploy.py checks this against it).
RESIZE = {"to": "img_size (height, width)", "interpolation": "bilinear", "antialias": True, "keeps_aspect": False,
          "crop": None, "library": "torchvision.transforms.v2.Resize"}


def batch_note(input_shape: list[int], static: bool) -> dict[str, object]:
    how = ("the ONNX input is fixed to batch 1 (the profile builds engines for one shape)" if static else
           "the ONNX input has a dynamic batch, but the board's engine is built for batch 1")
    return {"size": input_shape[0], "note": f"{how}; to score many images, run them one at a time (the Jetson "
            "script does so for val.npz), or export without static_batch and build an engine with an "
            "optimisation profile for the batch you need"}


class BundleConfig(PassConfig):
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="engine precision on the board; auto: the ONNX's own (INT8 Q/DQ) or the "
        "profile's float precision (FP16 on a Jetson)")
    validation_samples: int = Field(256, ge=1, description="validation images shipped to score top-1 (a "
                                    "segmenter: mIoU, masks at their own resolution) on the board")
    workspace_mb: int | None = Field(None, ge=16, description="TensorRT builder workspace; default: the profile's")
    build_engine: bool = Field(False, description="also build a TensorRT engine here and check it against ONNX "
                               "Runtime (only when this machine is the target and has TensorRT)")


class BundlePass(Pass):
    name = "bundle"
    Config = BundleConfig
    summary = "deploy bundle: ONNX, preprocessing, labels, validation subset, sha256s, Jetson script, prediction"
    modifies_weights = False

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: BundleConfig = self.config  # type: ignore[assignment]
        p = ctx.profile
        onnx_path = graph.artifacts.get("onnx")
        if onnx_path is None or not onnx_path.is_file():
            onnx_path = ctx.stage_dir / "model.onnx"
            export_onnx(graph, onnx_path, opset=p.export_opset() if p is not None else 17,
                        dynamic_batch=not (p is not None and p.static_batch))
        kg = kernel_graph(onnx_path, 4)
        own = onnx_precision(kg, onnx_path)
        precision = cfg.precision if cfg.precision != "auto" else (
            own or (p.deploy_precision() if p is not None else "fp32"))
        if p is not None and not p.supports(precision):
            raise EdgeVitError(f"passes.bundle.precision: {p.name} has no {precision} kernels (it runs "
                               f"{', '.join(p.precisions)}); use precision: {p.deploy_precision()}")
        if precision == "int8" and own != "int8":
            raise EdgeVitError("passes.bundle.precision: int8 on the board needs a model with Q/DQ nodes; put a "
                               "quantize pass with precision: int8 (layout: tensorrt) before bundle")
        seg = graph.spec.task == "segmentation"
        val_extra: dict[str, np.ndarray] = {}
        task_meta: dict[str, object] = {}
        if seg:  # masks at their own resolution: the board scores mIoU where the host does
            x, masks = val_frames(ctx.data, cfg.validation_samples, ctx.seed)
            ignore = ctx.data.ignore_index if ctx.data.ignore_index is not None else 255
            y, val_extra["mask_hw"] = pack_masks(masks, ignore)
            task_meta = {"task": "segmentation", "classes": list(ctx.data.class_names),
                         "num_classes": ctx.data.num_classes, "ignore_index": ignore,
                         "validation_masks": "y: masks at their own resolution, padded with ignore_index to "
                         "N,Hmax,Wmax; mask_hw: each mask's (h, w); logits are upsampled bilinearly "
                         "(align_corners=False) to it before the argmax, as edgevit.seg.metrics does"}
        else:
            xt, yt = ctx.data.sample(cfg.validation_samples, ctx.seed, "val")
            x, y = xt.numpy(), yt.numpy()
            task_meta = {"task": "classification"}
        prep = ctx.data.prep or {}
        h, w = graph.spec.img_size
        predicted = predict_onnx(onnx_path, p, precision, kg=kg) if p is not None else None
        stage = ctx.stages[-1].dir.name if ctx.stages else "source"
        extra = {}
        manifest = ctx.recipe.calibration.manifest
        if manifest is not None:
            extra["calibration/manifest.json"] = manifest
        ranges = onnx_path.parent / "calibration.ranges.json"
        if ranges.is_file():
            extra["calibration/ranges.json"] = ranges
        workspace = cfg.workspace_mb or (p.workspace_mb if p is not None else 512)
        out = write_bundle(
            ctx.stage_dir / "bundle", onnx_path=onnx_path, stage=stage, precision=precision,
            workspace_mb=workspace, input_name=INPUT, input_shape=[1, graph.spec.in_chans, h, w],
            val_x=x.astype(np.float32), val_y=y, labels=list(ctx.data.class_names), val_extra=val_extra,
            preprocess={"img_size": [h, w], "mean": prep.get("mean"), "std": prep.get("std"), "resize": RESIZE,
                        "layout": "NCHW, RGB, resized, scaled to [0, 1] then (x - mean) / std"},
            profile=p.name if p is not None else None, predicted=predicted, extra_files=extra,
            meta={"onnx_precision": own or "fp32", "engine_precision": precision,
                  "batch": batch_note([1, graph.spec.in_chans, h, w], p is not None and p.static_batch),
                  **task_meta})
        shown = f"{ctx.stage_name}/{out.name}"
        self.metrics = {"bundle": shown, "stage": stage, "precision": precision, "onnx_precision": own or "fp32",
                        "files": len(list(out.iterdir())), "predicted": predicted}
        if cfg.build_engine:
            from edgevit.deploy.tensorrt_engine import build_engine, parity

            engine = build_engine(onnx_path, ctx.stage_dir / f"model.{precision}.engine", precision, workspace,
                                  timing_cache=ctx.run_dir / "tensorrt.timing.cache")
            self.metrics["engine_parity"] = parity(engine, onnx_path, x[:64], graph.spec.task)
        graph.artifacts["bundle"] = out
        on = (f"ONNX {own or 'fp32'}, {p.name} builds {precision}: predicted {predicted['latency_ms']} ms, "
              f"{predicted['verdict']}" if predicted else "")
        ctx.console.print(f"  bundle {shown} from {stage}. {on}")
        return graph
