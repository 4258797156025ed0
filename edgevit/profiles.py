"""Device profiles (package data ``edgevit/device_profiles/*.yaml``): what a target runs and
supports. The quantize pass reads ``precisions``; export and the latency predictor read the rest.
They are read through importlib.resources so a non-editable install has them."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgevit.errors import EdgeVitError, did_you_mean
from edgevit.predict.roofline import RooflineFit

PROFILES_DIR: Traversable = resources.files("edgevit") / "device_profiles"

Precision = Literal["fp32", "fp16", "int8"]


class DeviceProfile(BaseModel):
    """Facts about a target; ``sources`` says where each fact comes from."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    runtime: Literal["tensorrt", "onnxruntime"] = "onnxruntime"
    gpu: str | None = None
    compute_capability: str | None = None
    gpu_clock_mhz: dict[str, float] = Field(default_factory=dict, description="per power mode")
    peak_gflops: dict[Precision, float] = Field(default_factory=dict)
    memory_mb: int | None = Field(None, ge=1)
    memory_bandwidth_gbps: float | None = Field(None, gt=0)
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32"])
    dla: bool | None = None
    jetpack: str | None = None
    l4t: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    tensorrt: str | None = Field(None, description="TensorRT version on the device, e.g. '8.2'")
    python: str | None = None
    usable_memory_mb: int | None = Field(None, ge=1, description="what one process can use once the OS runs")
    runtime_memory_mb: float | None = Field(None, ge=0, description="the inference runtime's own footprint "
                                            "(CUDA context, cuBLAS/cuDNN/TensorRT libraries)")
    workspace_mb: int = Field(256, ge=0, description="TensorRT builder workspace the deploy bundle asks for")
    max_opset: int = Field(17, ge=11)
    static_batch: bool = Field(False, description="export with batch fixed to 1 (engines built for one shape)")
    layernorm_op: bool = Field(True, description="the runtime has a LayerNormalization op (TensorRT >= 8.6)")
    cpu_form: bool = Field(False, description="export hands on the ONNX Runtime CPU form (edgevit.ort_fusion: "
                           "contrib ops, so onnxruntime profiles only)")
    roofline: RooflineFit | None = Field(None, description="latency model fitted to published measurements "
                                         "(bench/predict.py --write)")
    caveats: list[str] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict, description="fact name → where it comes from")

    @model_validator(mode="after")
    def _sources_name_facts(self) -> DeviceProfile:
        unknown = [k for k in self.sources if k not in type(self).model_fields]
        if unknown:
            raise ValueError(f"sources names {unknown[0]!r}, which is not a profile fact")
        if self.cpu_form and self.runtime != "onnxruntime":
            raise ValueError(f"cpu_form needs runtime onnxruntime (ONNX Runtime contrib ops), not {self.runtime}")
        return self

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def deploy_precision(self) -> str:
        """The float precision an engine is built at: FP16 where the device has it."""
        return "fp16" if "fp16" in self.precisions else "fp32"

    def export_opset(self, wanted: int | None = None) -> int:
        """The opset to export at: what the runtime parses, never above ``wanted``."""
        opset = min(self.max_opset, wanted or self.max_opset)
        if not self.layernorm_op:
            opset = min(opset, 16)  # below 17 the exporter writes LayerNorm as primitive ops
        return opset


def available() -> list[str]:
    if not PROFILES_DIR.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in PROFILES_DIR.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str, where: str = "profile") -> DeviceProfile:
    """A profile by name (``edgevit/device_profiles/<name>.yaml``) or by path to a YAML file."""
    path: Path | Traversable = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = available()
            raise EdgeVitError(f"{where}: unknown device profile {name_or_path!r}{did_you_mean(name_or_path, names)}; "
                               f"available: {', '.join(names) or 'none'}")
    try:
        return DeviceProfile.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "profile"
        raise EdgeVitError(f"{where}: {path} is not a valid device profile: {loc}: "
                           f"{err['msg'].removeprefix('Value error, ')}") from e
    except yaml.YAMLError as e:
        raise EdgeVitError(f"{where}: {path} is not valid YAML: {str(e).splitlines()[0]}") from e
