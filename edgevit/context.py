"""What passes share but do not own."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import (
    Progress,
)

if TYPE_CHECKING:
    from edgevit.data import TaskData
    from edgevit.graph import ModelGraph
    from edgevit.recipe import Recipe


@dataclass(frozen=True)
class StageRecord:
    """A finished stage of this run, as the manifest lists it."""

    index: int
    name: str
    dir: Path
    seconds: float


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    data: TaskData
    device: torch.device
    console: Console
    registry: Any
    seed: int = 0
    stage_dir: Path = Path(".")
    stages: list[StageRecord] = field(default_factory=list)
    profile: Any = None  # a device profile, once profiles exist
    _teacher: Callable[[], ModelGraph] | None = None
    _calibration: tuple[torch.Tensor, torch.Tensor] | None = None

    def for_stage(self, stage_dir: Path, stages: list[StageRecord]) -> RunContext:
        return dataclasses.replace(self, stage_dir=stage_dir, stages=list(stages))

    @property
    def stage_name(self) -> str:
        """This stage's directory name once it is finished (it runs in ``.NN-pass.partial``)."""
        return self.stage_dir.name.removeprefix(".").removesuffix(".partial")

    @property
    def teacher(self) -> ModelGraph:
        """The model knowledge comes from: the latest ``adapt`` output, else the input model."""
        if self._teacher is None:
            raise RuntimeError("no teacher is available in this context")
        return self._teacher()

    def calibration(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recipe's calibration images (class-stratified, fixed by seed) and labels."""
        if self._calibration is None:
            c = self.recipe.calibration
            if c.manifest is not None:
                from edgevit.calib import load_manifest_images

                prep = self.data.prep or {}
                self._calibration = load_manifest_images(c.manifest, prep["img_size"], prep["mean"], prep["std"])
            else:
                self._calibration = self.data.sample(c.num_samples, self.seed, c.split)
        return self._calibration

    def progress(self) -> Progress:
        from edgevit.progress import make_progress  # log lines when the console is not a terminal

        return make_progress(self.console)  # type: ignore[return-value]


def resolve_device(name: str) -> torch.device:
    from edgevit.errors import EdgeVitError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgeVitError("device: cuda was asked for but no CUDA device is available; use device: auto or cpu")
    return torch.device(name)
