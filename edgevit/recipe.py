"""Recipes: one YAML file says which model, which data, which passes in which order.

Validation is strict everywhere (unknown keys are errors naming their path), pass configs
are validated by each pass's own ``Config`` (a tuner inside one by the registered tuner's
``Config``) and paths resolve against the recipe's folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgevit.data.config import DataConfig
from edgevit.errors import EdgeVitError, did_you_mean
from edgevit.models.sources import ModelSource

DEMO_RECIPE = "demo"


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(64, ge=1, description="class-stratified images drawn by seed")
    split: Literal["train", "val"] = "train"
    manifest: Path | None = Field(None, description="a manifest from `edgevit calib build` (overrides the sampling)")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="every random choice derives from it")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSource
    data: DataConfig
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    profile: str | None = None
    threads: int | None = Field(None, ge=1, description="CPU threads (default: one per idle core; edgevit.threads)")
    passes: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("passes")
    @classmethod
    def _one_key_each(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(value):
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"passes[{i}] must be a mapping with one key, the pass name: `- adapt: {{...}}`")
        return value


@dataclass(frozen=True)
class PassStep:
    """One resolved entry of ``passes``: the pass class and its validated config."""

    index: int
    name: str
    cls: Any
    config: BaseModel

    def config_hash(self) -> str:
        return stable_hash({"pass": self.name, "config": self.config.model_dump(mode="json")})


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# discriminator values
_UNION_TAGS = {"timm", "hf", "edgevit", "builtin", "imagefolder", "digits", "npz", "segmentation"}


def _format_error(err: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
    path = ".".join(x for x in (prefix, _loc(loc)) if x)
    if e["type"] == "extra_forbidden":
        hint = ""
        if model is not None and len(loc) == 1:
            hint = did_you_mean(str(loc[-1]), model.model_fields)
        return f"{path}: unknown key{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}"


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make the recipe's relative paths relative to the recipe file, not the shell's cwd
    (also model sources nested in pass configs, e.g. a distillation teacher's checkpoint)."""
    for section, keys in (("model", ("checkpoint", "path")), ("data", ("train", "val", "test", "path")),
                          ("calibration", ("manifest",))):
        _resolve(data.get(section), keys, base)
    steps = data.get("passes")
    for step in steps if isinstance(steps, list) else []:  # not a list: validation says so
        if isinstance(step, dict):
            for cfg in step.values():
                _resolve_nested(cfg, base)


def _resolve(sec: Any, keys: tuple[str, ...], base: Path) -> None:
    if isinstance(sec, dict):
        for k in keys:
            if isinstance(sec.get(k), str) and not Path(sec[k]).expanduser().is_absolute():
                sec[k] = str((base / sec[k]).resolve())
            elif isinstance(sec.get(k), str):
                sec[k] = str(Path(sec[k]).expanduser())


def _resolve_nested(node: Any, base: Path) -> None:
    """Inside pass configs, a mapping with a ``source:`` key is a model source."""
    if isinstance(node, dict):
        if "source" in node:
            _resolve(node, ("checkpoint", "path"), base)
        for v in node.values():
            _resolve_nested(v, base)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """``--set a.b=value``: values parse as YAML (numbers, booleans, lists); in ``passes``
    a step is addressed by index or by pass name (``passes.adapt.epochs=3``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise EdgeVitError(f"--set {item!r}: expected KEY=VALUE, e.g. --set passes.adapt.epochs=3")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            reason = " ".join(str(e).split())[:120]
            raise EdgeVitError(f"--set {key}: the value is not plain YAML ({reason}); quote it as a string, "
                               "e.g. --set 'name=\"my run\"'") from e
        parts = key.split(".")
        node: Any = data
        for j, part in enumerate(parts[:-1]):
            if not isinstance(node, (dict, list)):
                raise EdgeVitError(f"--set {key}: {'.'.join(parts[:j])} is not a section")
            if isinstance(node, list):
                node = _list_step(node, part, key)
            else:
                if not isinstance(node.get(part, {}), (dict, list)):
                    raise EdgeVitError(f"--set {key}: {'.'.join(parts[: j + 1])} is not a section")
                node = node.setdefault(part, {})
        last = parts[-1]
        if not isinstance(node, (dict, list)):
            raise EdgeVitError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
        if isinstance(node, list):
            raise EdgeVitError(f"--set {key}: name a key inside the pass, e.g. passes.adapt.epochs=3")
        node[last] = value


def _list_step(steps: list, part: str, key: str) -> Any:
    if part.isdigit():
        i = int(part)
        if i >= len(steps):
            raise EdgeVitError(f"--set {key}: the recipe has {len(steps)} passes")
        item = steps[i]
        return item
    matches = [s for s in steps if isinstance(s, dict) and part in s]
    if not matches:
        names = [next(iter(s)) for s in steps if isinstance(s, dict) and s]
        raise EdgeVitError(f"--set {key}: the recipe has no pass '{part}'{did_you_mean(part, names)}")
    if len(matches) > 1:
        raise EdgeVitError(f"--set {key}: the recipe has several '{part}' passes; address one by index")
    step = matches[0]
    if step[part] is None:
        step[part] = {}
    return step[part]


def load_recipe_data(path: Path | None) -> tuple[dict[str, Any], Path]:
    """The raw mapping and its base directory; ``None`` means the embedded demo recipe."""
    if path is None:
        text = resources.files("edgevit.recipes").joinpath(f"{DEMO_RECIPE}.yaml").read_text()
        base = Path.cwd()
        where = f"embedded {DEMO_RECIPE} recipe"
    else:
        path = Path(path)
        if not path.is_file():
            raise EdgeVitError(f"recipe: file not found: {path}")
        try:
            text, base, where = path.read_text(encoding="utf-8"), path.resolve().parent, str(path)
        except UnicodeDecodeError as e:
            raise EdgeVitError(f"recipe: {path} is not a text file (byte {e.start} is not UTF-8); give a YAML "
                               "recipe") from e
        except OSError as e:
            raise EdgeVitError(f"recipe: cannot read {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EdgeVitError(f"recipe: {where} is not valid YAML: {' '.join(str(e).split())[:160]}") from e
    if not isinstance(data, dict):
        raise EdgeVitError(f"recipe: {where} must be a mapping with model, data and passes")
    return data, base


def parse_recipe(data: dict[str, Any], base: Path, registry: Any) -> tuple[Recipe, list[PassStep]]:
    resolve_paths(data, base)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgeVitError(_format_error(e, "recipe", Recipe)) from e
    steps = []
    for i, item in enumerate(recipe.passes):
        name, raw = next(iter(item.items()))
        cls = registry.get("passes", name, where=f"passes[{i}]")
        try:
            # nested fields that name registry entries (a tuner) resolve in this run's registry
            config = cls.Config.model_validate(raw or {}, context={"registry": registry})
        except ValidationError as e:
            raise EdgeVitError(_format_error(e, f"passes[{i}].{name}", cls.Config)) from e
        steps.append(PassStep(i, name, cls, config))
    return recipe, steps


def load_recipe(path: Path | None, overrides: list[str], registry: Any) -> tuple[Recipe, list[PassStep]]:
    data, base = load_recipe_data(path)
    apply_overrides(data, overrides)
    return parse_recipe(data, base, registry)
