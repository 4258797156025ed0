"""Published latencies of real models on a device, and those models as edgevit exports them.

Each point names an architecture (timm or torchvision), an input size, a family and a measured
batch-1 latency with its source (``edgevit/device_profiles/measurements/<profile>.yaml``). The
architectures are rebuilt with random weights (latency does not depend on their values) and
exported the way edgevit exports its own models for that profile, then turned into kernels.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from edgevit.errors import EdgeVitError
from edgevit.predict.kernels import KernelGraph, kernel_graph
from edgevit.predict.roofline import PRECISION_BYTES
from edgevit.profiles import PROFILES_DIR, DeviceProfile

MEASUREMENTS_DIR = PROFILES_DIR / "measurements"


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="architecture name in `builder`")
    builder: Literal["timm", "torchvision"] = "timm"
    num_classes: int | None = Field(None, ge=1, description="classifier width the source measured (default: 1000)")
    family: str = Field(description="architecture family; validation leaves one family out at a time")
    img_size: int = Field(ge=16)
    latency_ms: float = Field(gt=0)
    precision: str = "fp16"
    runtime: str = "tensorrt"
    batch: int = Field(1, ge=1)
    heldout: bool = Field(False, description="kept out of every fit (uncertain setup); reported separately")
    source: str

    @property
    def label(self) -> str:
        return f"{self.model} {self.img_size}px {self.precision}"


class Measurements(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: str
    points: list[Point]


def load_measurements(profile: str) -> Measurements:
    path = MEASUREMENTS_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise EdgeVitError(f"predict: no published measurements for {profile} (looked for {path})")
    return Measurements.model_validate(yaml.safe_load(path.read_text()))


def _build(point: Point) -> Any:
    kwargs = {} if point.num_classes is None else {"num_classes": point.num_classes}
    if point.builder == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(point.model, weights=None, **kwargs).eval()
        except ValueError as e:
            raise EdgeVitError(f"predict: torchvision has no architecture {point.model!r}: {e}") from e
    import timm

    try:
        return timm.create_model(point.model, pretrained=False, **kwargs).eval()
    except RuntimeError as e:
        raise EdgeVitError(f"predict: timm has no architecture {point.model!r}: {e}") from e


def export_point(point: Point, profile: DeviceProfile) -> Any:
    """The point's model as ONNX, exported as edgevit's export pass would for ``profile``: the
    adapter's export mode and :func:`edgevit.onnx_io.export_onnx` where an adapter knows the
    family, otherwise the same exporter call (opset, batch, folding) with attention unfused."""
    import tempfile
    from pathlib import Path

    import onnx
    import torch

    from edgevit.graph import ModelGraph
    from edgevit.onnx_io import INPUT, OUTPUT, export_onnx

    module = _build(point)
    opset, dynamic = profile.export_opset(), not profile.static_batch
    try:
        graph = ModelGraph.from_module(module, {"architecture": point.model})
    except EdgeVitError:
        graph = None
    if graph is not None:
        with tempfile.TemporaryDirectory(prefix="edgevit-fit-") as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(graph, path, opset=opset, dynamic_batch=dynamic, batch=point.batch)
            return onnx.load(str(path))
    x = torch.zeros(point.batch, 3, point.img_size, point.img_size)
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic else None
    buf = io.BytesIO()
    from edgevit.graph.adapters.timm_attention import unfused_attention

    with unfused_attention(module), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, opset_version=opset, dynamo=False, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def point_kernels(point: Point, profile: DeviceProfile) -> KernelGraph:
    """Kernels of the point's architecture with random weights, at the point's precision."""
    return kernel_graph(None, PRECISION_BYTES[point.precision], model=export_point(point, profile))
