"""Device profiles (``profiles/*.yaml``): what a target runs and supports. The quantize
pass reads ``precisions``; export and the latency predictor read the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgevit.errors import EdgeVitError, did_you_mean

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"

Precision = Literal["fp32", "fp16", "int8"]


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    runtime: Literal["tensorrt", "onnxruntime"] = "onnxruntime"
    tensorrt: str | None = Field(None, description="TensorRT version on the device, e.g. '8.2'")
    compute_capability: str | None = None
    max_opset: int = Field(17, ge=11)
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32"])
    memory_mb: int | None = Field(None, ge=1)
    python: str | None = None

    def supports(self, precision: str) -> bool:
        return precision in self.precisions


def available() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []


def load_profile(name_or_path: str, where: str = "profile") -> DeviceProfile:
    """A profile by name (``profiles/<name>.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = available()
            raise EdgeVitError(f"{where}: unknown device profile {name_or_path!r}{did_you_mean(name_or_path, names)}; "
                               f"available: {', '.join(names) or 'none'}")
    try:
        return DeviceProfile.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as e:
        raise EdgeVitError(f"{where}: {path} is not a valid device profile: {str(e).splitlines()[0]}") from e
