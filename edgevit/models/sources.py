"""Where the input model comes from (the recipe's ``model:`` section), turned into a ModelGraph.

The input files are only ever read: the pipeline works on its own copy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.graph.weights import apply_state_dict, read_state_dict

Triple = tuple[float, float, float]


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: Triple | None = Field(None, description="input normalisation mean (overrides the model's)")
    std: Triple | None = None


class TimmSource(_Source):
    source: Literal["timm"]
    name: str | None = Field(None, description="a timm model name, e.g. deit_tiny_patch16_224")
    architecture: Literal["VisionTransformer", "VisionTransformerDistilled"] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
    pretrained: bool = False

    @model_validator(mode="after")
    def _name_or_architecture(self) -> TimmSource:
        if (self.name is None) == (self.architecture is None):
            raise ValueError("give exactly one of `name` (a timm model name) or `architecture`")
        if self.pretrained and self.checkpoint:
            raise ValueError("give `pretrained: true` or a `checkpoint`, not both")
        return self


class HFSource(_Source):
    source: Literal["hf"]
    path: Path = Field(description="a local directory saved with save_pretrained()")


class SavedSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["edgevit"]
    path: Path = Field(description="a stage directory of an earlier run (graph.json + weights)")


class BuiltinSource(_Source):
    source: Literal["builtin"]
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None


class DecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["linear", "mla"] = Field(description="linear: one Linear per patch token (Segmenter); "
                                                        "mla: several blocks' tokens, projected and summed")
    taps: list[int] | None = Field(None, description="mla: the blocks it reads (default 4 evenly spaced)")
    width: int | None = Field(None, ge=1, description="mla: the width of its projections (default 64)")

    @model_validator(mode="after")
    def _linear_has_no_options(self) -> DecoderConfig:
        if self.kind == "linear" and (self.taps is not None or self.width is not None):
            raise ValueError("the linear decoder reads the last block and has no `taps` or `width`")
        return self

    def recipe(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SegmenterSource(_Source):
    """A semantic segmentation model: a timm VisionTransformer backbone (under ``backbone.``) and a
    decode head (under ``head.``), e.g. the reference CamVid teacher."""

    source: Literal["segmenter"]
    backbone: dict[str, Any] = Field(default_factory=dict, description="timm VisionTransformer kwargs "
                                     "(num_classes 0 and global_pool '' unless given)")
    decoder: DecoderConfig = Field(default_factory=lambda: DecoderConfig(kind="linear"))
    num_classes: int = Field(ge=1)
    checkpoint: Path | None = Field(None, description="weights in the reference layout: backbone.*, head.*")


ModelSource = Annotated[TimmSource | HFSource | SavedSource | BuiltinSource | SegmenterSource,
                        Field(discriminator="source")]
AnySource = TimmSource | HFSource | SavedSource | BuiltinSource | SegmenterSource


def load_model(cfg: AnySource, registry: Any = None) -> ModelGraph:
    if isinstance(cfg, SavedSource):
        return ModelGraph.load(cfg.path, registry)
    if isinstance(cfg, SegmenterSource):
        return _load_segmenter(cfg, registry)
    if isinstance(cfg, TimmSource):
        return _load_timm(cfg, registry)
    if isinstance(cfg, HFSource):
        return _load_hf(cfg, registry)
    from edgevit.models.simple_vit import SimpleViT

    try:
        module = SimpleViT(**cfg.kwargs)
    except (TypeError, ValueError) as e:
        raise EdgeVitError(f"model.kwargs: {e}") from e
    if cfg.checkpoint:
        apply_state_dict(module, read_state_dict(cfg.checkpoint), str(cfg.checkpoint))
    return ModelGraph.from_module(module.eval(), {"kwargs": cfg.kwargs}, mean=cfg.mean, std=cfg.std, registry=registry)


def _load_segmenter(cfg: SegmenterSource, registry: Any) -> ModelGraph:
    from edgevit.graph.adapters.segmenter import SegmenterAdapter

    kwargs = {"num_classes": 0, "global_pool": "", **cfg.backbone}
    build = {"backbone": {"family": "timm", "architecture": "VisionTransformer", "kwargs": kwargs},
             "decoder": cfg.decoder.recipe(), "num_classes": cfg.num_classes}
    try:
        module = SegmenterAdapter().build(build)
    except EdgeVitError:
        raise
    except (TypeError, ValueError, AssertionError) as e:
        raise EdgeVitError(f"model.backbone: timm could not build the VisionTransformer: {e}") from e
    if cfg.checkpoint:
        apply_state_dict(module, read_state_dict(cfg.checkpoint), str(cfg.checkpoint))
    return ModelGraph.from_module(module.eval(), build, mean=cfg.mean, std=cfg.std, registry=registry)


def _load_timm(cfg: TimmSource, registry: Any) -> ModelGraph:
    module, build = _timm_module(cfg)
    return ModelGraph.from_module(module, build, mean=cfg.mean, std=cfg.std, registry=registry)


def _timm_module(cfg: TimmSource, where: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    """Any timm model (a ViT or not), built offline and loaded from ``checkpoint``, in eval mode."""
    import timm

    build: dict[str, Any] = {"kwargs": cfg.kwargs}
    try:
        if cfg.name:
            if not timm.is_model(cfg.name.split(".")[0]):
                raise EdgeVitError(f"{where}.name: timm has no model named {cfg.name!r}")
            build["name"] = cfg.name
            module = timm.create_model(cfg.name, pretrained=cfg.pretrained, **cfg.kwargs)
        else:
            build["architecture"] = cfg.architecture
            from edgevit.graph.adapters.timm_vit import TimmViTAdapter

            module = TimmViTAdapter().build(build)
    except EdgeVitError:
        raise
    except TypeError as e:
        raise EdgeVitError(f"{where}.kwargs: {e}") from e
    except Exception as e:
        if cfg.pretrained:
            raise EdgeVitError(
                f"{where}.pretrained: could not fetch pretrained weights for {cfg.name} "
                f"({type(e).__name__}); offline, download them elsewhere and set "
                f"{where}.checkpoint: path/to/weights.safetensors with pretrained: false"
            ) from e
        raise EdgeVitError(f"{where}: timm could not build the model: {e}") from e
    if cfg.checkpoint:
        apply_state_dict(module, read_state_dict(cfg.checkpoint), str(cfg.checkpoint))
    return module.eval(), build


@dataclass
class LoadedTeacher:
    """A teacher: any module returning logits. ``graph`` is set when it is a ViT edgevit
    understands (feature losses need its token features); otherwise only logits are used."""

    module: nn.Module
    graph: ModelGraph | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None


def load_teacher(cfg: AnySource, registry: Any = None,
                 where: str = "teacher") -> LoadedTeacher:
    """Like :func:`load_model`, but a timm model that is not a ViT (a CNN) is accepted too."""
    if isinstance(cfg, TimmSource):
        module, build = _timm_module(cfg, where)
        try:
            graph = ModelGraph.from_module(module, build, mean=cfg.mean, std=cfg.std, registry=registry)
        except EdgeVitError:
            pcfg = getattr(module, "pretrained_cfg", None) or {}
            mean = cfg.mean or (tuple(pcfg["mean"]) if "mean" in pcfg else None)
            std = cfg.std or (tuple(pcfg["std"]) if "std" in pcfg else None)
            return LoadedTeacher(module, None, mean, std)  # type: ignore[arg-type]
    else:
        graph = load_model(cfg, registry)
    return LoadedTeacher(graph.module, graph, graph.spec.mean, graph.spec.std)


def _load_hf(cfg: HFSource, registry: Any) -> ModelGraph:
    from edgevit.graph.adapters.hf_vit import HFImageClassifier, require_transformers

    transformers = require_transformers()
    if not (cfg.path / "config.json").is_file():
        raise EdgeVitError(f"model.path: {cfg.path} is not a Hugging Face model directory (no config.json)")
    try:
        hf = transformers.AutoModelForImageClassification.from_pretrained(
            str(cfg.path), local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise EdgeVitError(f"model.path: cannot load {cfg.path}: {str(e).splitlines()[0]}") from e
    mean, std = cfg.mean, cfg.std
    pre = cfg.path / "preprocessor_config.json"
    if pre.is_file() and mean is None:
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean"), p.get("image_std")
    return ModelGraph.from_module(
        HFImageClassifier(hf).eval(), {"config": hf.config.to_dict()}, mean=mean, std=std, registry=registry
    )
