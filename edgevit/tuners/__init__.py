"""Tuners: which parameters a training pass trains and which extra modules exist.

``tuner:`` in adapt, distill and prune's ``recover`` picks one: ``full`` (default),
``slicefine``, ``losa`` or ``disentangled``; a string is shorthand for ``{name: <it>}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from edgevit.errors import EdgeVitError
from edgevit.graph.extension import SideModule
from edgevit.graph.spec import GraphSpec
from edgevit.tuners.base import Tuner
from edgevit.tuners.disentangled import DisentangledConfig, DisentangledTuner, QueryExtraction
from edgevit.tuners.full import FullConfig, FullTuner
from edgevit.tuners.losa import LoSAConfig, LoSATuner, SideNetwork
from edgevit.tuners.slicefine import SliceFineConfig, SliceFineTuner

TUNERS: dict[str, tuple[type, type[Tuner]]] = {
    "full": (FullConfig, FullTuner),
    "slicefine": (SliceFineConfig, SliceFineTuner),
    "losa": (LoSAConfig, LoSATuner),
    "disentangled": (DisentangledConfig, DisentangledTuner),
}
SIDES: dict[str, type[SideModule]] = {"losa": SideNetwork, "disentangled": QueryExtraction}


def check_tuner_task(tuner: Any, task: str, where: str) -> None:
    """Before any stage runs: LoSA and disentangled add a side module that predicts one class per
    image, which a segmenter cannot use (``ModelGraph._attach_side`` refuses it too, later)."""
    if task == "segmentation" and tuner.name in SIDES:
        raise EdgeVitError(f"{where}.tuner: {tuner.name}'s side module predicts one class per image; a "
                           "segmenter's decode head reads the backbone's tokens itself; use tuner full or slicefine")


def _shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


TunerConfig = Annotated[
    FullConfig | SliceFineConfig | LoSAConfig | DisentangledConfig,
    BeforeValidator(_shorthand),
    Field(discriminator="name"),
]


def make_tuner(cfg: Any) -> Tuner:
    return TUNERS[cfg.name][1](cfg)


def build_side(config: dict[str, Any], spec: GraphSpec) -> SideModule:
    """Rebuild a saved side module from ``graph.json``'s ``build.side``."""
    kind = config["kind"]
    return SIDES[kind].from_config({k: v for k, v in config.items() if k != "kind"}, spec)


__all__ = ["FullConfig", "TunerConfig", "Tuner", "make_tuner", "build_side", "TUNERS"]
