"""The distillation loss: cross-entropy + logit KD (KL of softened outputs, or the MSE of
logits as Youn et al. 2023 use) + feature mimicking (shallow blocks) + masked generative
distillation (deep blocks) + an optional DeiT distillation-token term.

Every term has its own weight (0 = off). Projectors and generators are built here, trained
with the student through :meth:`DistillObjective.modules` and never become part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgevit.distill.taps import FeatureTap
from edgevit.errors import EdgeVitError
from edgevit.graph.spec import GraphSpec
from edgevit.seg.losses import pixel_kd_kl, pixel_kd_mse


class LossConfig(BaseModel):
    """Loss weights and layer maps (student block → teacher block)."""

    model_config = ConfigDict(extra="forbid")
    ce: float = Field(1.0, ge=0, description="cross-entropy on the labels")
    kd: float = Field(1.0, ge=0, description="logit KD weight (the loss is `kd_loss`)")
    kd_loss: Literal["kl", "mse"] = Field(
        "kl", description="kl: KL of temperature-softened outputs × T² (Hinton et al.); mse: mean squared error "
        "of the logits (Youn et al. 2023; temperature unused)")
    temperature: float = Field(4.0, gt=0, description="kd_loss kl: softening temperature")
    feature: float = Field(1.0, ge=0, description="feature mimicking: token MSE on shallow blocks")
    feature_layers: dict[int, int] | None = Field(
        None, description="student block → teacher block; default: the first half of the student's blocks, "
        "each to the teacher block at the same relative depth")
    mgd: float = Field(1e-4, ge=0, description="masked generative distillation (sum of squared errors / batch)")
    mgd_layers: dict[int, int] | None = Field(
        None, description="default: the last student block → the last teacher block")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="fraction of student patch tokens masked for MGD")
    dist_token: Literal["none", "hard", "soft"] = Field(
        "none", description="DeiT distillation token: its head learns the teacher's argmax (hard) or soft logits")


def relative_block(i: int, student_depth: int, teacher_depth: int) -> int:
    """The teacher block at the same relative depth as student block ``i``."""
    return max(0, round((i + 1) * teacher_depth / student_depth) - 1)


def default_layers(student_depth: int, teacher_depth: int, which: str) -> dict[int, int]:
    if which == "deep":
        return {student_depth - 1: teacher_depth - 1}
    return {i: relative_block(i, student_depth, teacher_depth) for i in range(max(1, student_depth // 2))}


def _check_map(layers: dict[int, int], sd: int, td: int, where: str) -> dict[int, int]:
    for s, t in layers.items():
        if not (0 <= s < sd and 0 <= t < td):
            raise EdgeVitError(
                f"{where}: {s}: {t} is out of range; the student has blocks 0..{sd - 1}, the teacher 0..{td - 1}"
            )
    return dict(sorted(layers.items()))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: KL(teacher‖student) of softened distributions, × T² to keep gradient scale."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Youn et al. 2023: the mean squared error between student and teacher logits."""
    return F.mse_loss(student.float(), teacher.float())


def logit_distillation(cfg: LossConfig, student: torch.Tensor, teacher: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """The configured logit KD term (unweighted). Dense (B, C, H, W) logits distil per pixel
    (``seg/losses.py``: the student upsampled to the teacher's size; ``valid`` (B, H, W) masks
    ignored pixels out); one vector per image distils as a whole."""
    if student.shape[1] != teacher.shape[1] or (student.ndim == 4) != (teacher.ndim == 4):
        raise EdgeVitError(f"distill: the teacher gives logits {tuple(teacher.shape[1:])} per image and the student "
                           f"{tuple(student.shape[1:])}; logit KD needs the same classes and both per image or both "
                           "per pixel")
    if student.ndim == 4:
        s, t = student.float(), teacher.float()
        return pixel_kd_mse(s, t, valid) if cfg.kd_loss == "mse" else pixel_kd_kl(s, t, cfg.temperature, valid)
    return logit_mse(student, teacher) if cfg.kd_loss == "mse" else kd_loss(student, teacher, cfg.temperature)


class MaskedGenerator(nn.Module):
    """MGD on patch maps: align width, zero a fresh random set of the student's patch positions,
    rebuild the teacher's whole map with two 3×3 convolutions over the patch grid (so a masked
    position is rebuilt from its neighbours), then resample to the teacher's grid if it differs."""

    def __init__(self, student_dim: int, teacher_dim: int, mask_ratio: float) -> None:
        super().__init__()
        self.align = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1),
        )
        self.mask_ratio = mask_ratio

    def mask(self, b: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """1 = kept, 0 = masked; drawn anew at every call."""
        return (torch.rand(b, 1, *grid, device=device) >= self.mask_ratio).float()

    def forward(self, student_map: torch.Tensor, teacher_grid: tuple[int, int]) -> torch.Tensor:
        x = channels_last_linear(self.align, student_map)  # B, C_t, h, w
        x = x * self.mask(x.shape[0], tuple(x.shape[-2:]), x.device).to(x.dtype)
        return resample(self.generator(x), teacher_grid)


def channels_last_linear(layer: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """A Linear over the channels of a (B, C, h, w) map (a 1×1 convolution)."""
    if isinstance(layer, nn.Identity):
        return fmap
    return layer(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def resample(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (B, C, h, w) map at another patch grid (bilinear): blocks of other token grids compare."""
    if tuple(fmap.shape[-2:]) == tuple(grid):
        return fmap
    return F.interpolate(fmap, size=tuple(grid), mode="bilinear", align_corners=False)


def _block_dim(spec: GraphSpec, i: int) -> int:
    return spec.block(i).dim or spec.embed_dim


def _default_map(output: torch.Tensor, _blk: object, spec: GraphSpec, batch: int) -> torch.Tensor:
    from edgevit.graph.adapters.base import token_map

    return token_map(output, spec, batch)


class DistillObjective:
    """The loop's Objective for distillation; call :meth:`close` when training ends."""

    def __init__(
        self,
        cfg: LossConfig,
        student: nn.Module,
        student_spec: GraphSpec,
        teacher: nn.Module,
        teacher_spec: GraphSpec | None,
        teacher_input: Callable[[torch.Tensor], torch.Tensor],
        label_smoothing: float = 0.0,
        where: str = "distill",
        student_adapter: Any = None,
        teacher_adapter: Any = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``student_adapter`` / ``teacher_adapter`` (the graphs' adapters) turn block outputs into
        patch maps (:meth:`Adapter.feature_map`); without one the output is read as a token sequence.
        ``task_loss`` is the data's loss (``training/task.py``; default: cross-entropy with
        ``label_smoothing``); when it has an ``ignore_index``, those pixels are out of the KD term too."""
        self.cfg = cfg
        self.teacher = teacher.eval()
        self._teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
        teacher.requires_grad_(False)  # restored by close(): the caller's module is not changed for good
        self.teacher_input = teacher_input
        self.ce = task_loss or nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.ignore_index: int | None = getattr(task_loss, "ignore_index", None)
        self.projectors = nn.ModuleDict()
        self.generators = nn.ModuleDict()
        self.feature_layers: dict[int, int] = {}
        self.mgd_layers: dict[int, int] = {}
        s = student_spec
        if cfg.dist_token != "none" and len(s.classifiers) < 2:
            raise EdgeVitError(
                f"{where}.dist_token: the student has no distillation token/head; use a DeiT-distilled "
                "student (timm VisionTransformerDistilled) or set dist_token: none"
            )
        if cfg.feature > 0 or cfg.mgd > 0:
            if teacher_spec is None:
                raise EdgeVitError(
                    f"{where}: feature mimicking and MGD need a ViT teacher whose token features edgevit can "
                    f"read; {type(teacher).__name__} gives logits only. Set feature: 0 and mgd: 0 (logit KD works)"
                )
            t = teacher_spec
            self.s_spec, self.t_spec = s, t
            self.s_map = student_adapter.feature_map if student_adapter is not None else _default_map
            self.t_map = teacher_adapter.feature_map if teacher_adapter is not None else _default_map
            self.cls_pair = all(x.plain and x.pool == "token" and x.num_prefix_tokens >= 1 for x in (s, t))
            if cfg.feature > 0:
                self.feature_layers = _check_map(
                    cfg.feature_layers or default_layers(s.depth, t.depth, "shallow"), s.depth, t.depth,
                    f"{where}.feature_layers")
                for si, ti in self.feature_layers.items():
                    sd, td = _block_dim(s, si), _block_dim(t, ti)
                    self.projectors[str(si)] = nn.Linear(sd, td) if sd != td else nn.Identity()
            if cfg.mgd > 0:
                self.mgd_layers = _check_map(cfg.mgd_layers or default_layers(s.depth, t.depth, "deep"),
                                             s.depth, t.depth, f"{where}.mgd_layers")
                for si, ti in self.mgd_layers.items():
                    self.generators[str(si)] = MaskedGenerator(_block_dim(s, si), _block_dim(t, ti), cfg.mask_ratio)
            s_paths = [s.block(i).path for i in (*self.feature_layers, *self.mgd_layers)]
            t_paths = [t.block(i).path for i in (*self.feature_layers.values(), *self.mgd_layers.values())]
            self.t_tap = FeatureTap(self.teacher, t_paths)
        else:
            s_paths = []
            self.t_tap = None
        self.s_blocks = {i: s.block(i).path for i in (*self.feature_layers, *self.mgd_layers)}
        self.t_blocks = {i: teacher_spec.block(i).path for i in (*self.feature_layers.values(),
                                                                 *self.mgd_layers.values())} if teacher_spec else {}
        self.head_paths = s.classifiers[:2] if cfg.dist_token != "none" else []
        self.s_tap = FeatureTap(student, s_paths + self.head_paths)

    def modules(self) -> list[nn.Module]:
        return [self.projectors, self.generators]

    def close(self) -> None:
        for p, flag in self._teacher_flags:
            p.requires_grad_(flag)
        self.s_tap.remove()
        if self.t_tap is not None:
            self.t_tap.remove()

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        self.teacher.eval()
        with torch.no_grad():
            t_logits = self.teacher(self.teacher_input(images))
        logits = model(images)
        self._batch = images.shape[0]
        terms: dict[str, torch.Tensor] = {}
        if self.head_paths:  # DeiT: class head learns the labels, distillation head the teacher
            cls_logits, dist_logits = (self.s_tap.take(p) for p in self.head_paths)
            if cfg.ce > 0:
                terms["ce"] = cfg.ce * self.ce(cls_logits, labels)
            if cfg.kd > 0:
                terms["kd"] = cfg.kd * (F.cross_entropy(dist_logits, t_logits.argmax(-1)) if cfg.dist_token == "hard"
                                        else logit_distillation(cfg, dist_logits, t_logits))
        else:
            if cfg.ce > 0:
                terms["ce"] = cfg.ce * self.ce(logits, labels)
            if cfg.kd > 0:
                valid = labels != self.ignore_index if self.ignore_index is not None and labels.ndim == 3 else None
                terms["kd"] = cfg.kd * logit_distillation(cfg, logits, t_logits, valid)
        if self.feature_layers:
            losses = [self._mimic(si, ti) for si, ti in self.feature_layers.items()]
            terms["feat"] = cfg.feature * torch.stack(losses).mean()
        if self.mgd_layers:
            losses = [self._mgd(si, ti) for si, ti in self.mgd_layers.items()]
            terms["mgd"] = cfg.mgd * torch.stack(losses).mean()
        self.s_tap.clear()
        if self.t_tap is not None:
            self.t_tap.clear()
        if not terms:
            raise EdgeVitError("distill: every loss weight is 0; turn at least one term on")
        loss = torch.stack(list(terms.values())).sum()
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def _pair(self, si: int, ti: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.t_tap is not None
        return self.s_tap.take(self.s_blocks[si]), self.t_tap.take(self.t_blocks[ti])

    def _maps(self, si: int, ti: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw outputs and (B, C, h, w) patch maps of student block ``si`` and teacher block ``ti``."""
        s, t = self._pair(si, ti)
        b = self._batch
        return (s, t, self.s_map(s, self.s_spec.block(si), self.s_spec, b),
                self.t_map(t, self.t_spec.block(ti), self.t_spec, b))

    def _mimic(self, si: int, ti: int) -> torch.Tensor:
        s, t, s_map, t_map = self._maps(si, ti)
        proj = self.projectors[str(si)]
        s_map = resample(channels_last_linear(proj, s_map), tuple(t_map.shape[-2:]))
        loss = F.mse_loss(s_map.float(), t_map.float())
        if self.cls_pair:
            loss = loss + F.mse_loss(proj(s[:, 0]).float(), t[:, 0].float())
        return loss

    def _mgd(self, si: int, ti: int) -> torch.Tensor:
        _, _, s_map, t_map = self._maps(si, ti)
        rebuilt = self.generators[str(si)](s_map, tuple(t_map.shape[-2:]))
        return (rebuilt.float() - t_map.float()).pow(2).sum() / s_map.shape[0]


def teacher_input(data_spec: GraphSpec, mean: tuple | None, std: tuple | None,
                  size: tuple[int, int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a batch prepared for the student (its size, mean/std) into what the teacher expects."""
    m0, s0 = torch.tensor(data_spec.mean).view(1, 3, 1, 1), torch.tensor(data_spec.std).view(1, 3, 1, 1)
    renorm = mean is not None and std is not None and (tuple(mean), tuple(std)) != (data_spec.mean, data_spec.std)
    m1 = torch.tensor(mean).view(1, 3, 1, 1) if renorm else None
    s1 = torch.tensor(std).view(1, 3, 1, 1) if renorm else None
    resize = size is not None and tuple(size) != tuple(data_spec.img_size)

    def convert(x: torch.Tensor) -> torch.Tensor:
        if renorm:
            x = ((x * s0.to(x) + m0.to(x)) - m1.to(x)) / s1.to(x)  # type: ignore[union-attr]
        if resize:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)  # type: ignore[arg-type]
        return x

    return convert
