"""distill: teacher → smaller student, on the shared training loop.

Youn et al. 2023's first compression step distils logits only (the MSE of the logits beside
the task loss: ``kd_loss: mse``). Feature mimicking on shallow blocks and masked generative
distillation (Yang et al. 2022) on deep blocks are edgevit's additions, not the paper's;
each has its own weight and can be turned off (``feature: 0``, ``mgd: 0``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgevit.context import RunContext
from edgevit.distill import DistillObjective, LossConfig, ShrinkConfig, shrink
from edgevit.distill.objective import teacher_input
from edgevit.distill.student import build_student
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.models.sources import LoadedTeacher, ModelSource, load_model, load_teacher
from edgevit.passes.base import Pass, PassConfig
from edgevit.training.loop import TrainConfig
from edgevit.training.task import SegLossConfig, check_seg_loss, task_loss
from edgevit.training.tuned import train_tuned
from edgevit.tuners import FullConfig, TunerConfig, check_tuner_task, tuner_class


class StudentConfig(BaseModel):
    """Exactly one: ``shrink`` the incoming model, or build ``model`` from a source."""

    model_config = ConfigDict(extra="forbid")
    shrink: ShrinkConfig | None = None
    model: ModelSource | None = None

    @model_validator(mode="after")
    def _one(self) -> StudentConfig:
        if (self.shrink is None) == (self.model is None):
            raise ValueError("give exactly one of `shrink` (derive from the teacher) or `model` (a model source)")
        return self


class DistillConfig(PassConfig, TrainConfig, LossConfig, SegLossConfig):
    student: StudentConfig = Field(description="shrink: {depth, num_heads, mlp_ratio} or model: <model source>")
    teacher: ModelSource | None = Field(
        None, description="default: the run's teacher (the latest adapt output, else the input model)")
    teacher_img_size: tuple[int, int] | None = Field(
        None, description="input size of a non-ViT teacher (default: the data's size)")
    tuner: TunerConfig = Field(
        default_factory=FullConfig, description="which student parameters train: a registered tuner (full | "
        "slicefine | losa | disentangled, or a plugin's); one with a side module (losa, disentangled) freezes the "
        "student's blocks: logit KD only")


class DistillPass(Pass):
    name = "distill"
    Config = DistillConfig
    summary = "train a smaller student from the teacher: CE + logit KD + feature mimicking + MGD"
    distributed = True

    @classmethod
    def preflight(cls, config: PassConfig, ctx: RunContext, where: str) -> None:
        check_seg_loss(config, ctx.data, where)  # type: ignore[arg-type]
        check_tuner_task(config.tuner, ctx.data.task, where, ctx.registry)  # type: ignore[attr-defined]

    def run(self, graph: ModelGraph, ctx: RunContext) -> ModelGraph:
        cfg: DistillConfig = self.config  # type: ignore[assignment]
        teacher = self._teacher(cfg, graph, ctx)
        if cfg.student.shrink is not None:  # from the incoming model (the teacher, unless `teacher:` is set)
            student, how = shrink(graph, cfg.student.shrink)
        else:
            assert cfg.student.model is not None
            student, how = build_student(graph, load_model(cfg.student.model, ctx.registry), ctx.data.num_classes)
        ctx.console.print(f"  student: {how}")
        t_spec = teacher.graph.spec if teacher.graph is not None else None
        size = t_spec.img_size if t_spec is not None else (cfg.teacher_img_size or graph.spec.img_size)
        losses = cfg
        if tuner_class(cfg.tuner.name, ctx.registry).side is not None and (cfg.feature or cfg.mgd):
            ctx.console.print(f"  tuner {cfg.tuner.name} freezes the student's blocks, so feature mimicking and MGD "
                              "are off; distilling logits only")
            losses = cfg.model_copy(update={"feature": 0.0, "mgd": 0.0})
        layers: dict[str, dict[int, int]] = {}
        loss = task_loss(ctx.data, cfg.label_smoothing, cfg, "passes.distill")  # once: class weights read the masks

        def objective(g: ModelGraph) -> DistillObjective:
            o = DistillObjective(losses, g.module, g.spec, teacher.module, t_spec,
                                 teacher_input(graph.spec, teacher.mean, teacher.std, size),
                                 label_smoothing=cfg.label_smoothing, where="passes.distill",
                                 student_adapter=g.adapter,
                                 teacher_adapter=teacher.graph.adapter if teacher.graph else None,
                                 task_loss=loss)
            layers.update(feature=o.feature_layers, mgd=o.mgd_layers)
            return o

        self.metrics = train_tuned(student, objective, cfg, cfg.tuner, ctx, "distill")
        t_cost, s_cost = (teacher.graph.cost() if teacher.graph else None), student.cost()
        self.metrics.update({
            "student": how,
            "feature_layers": layers.get("feature", {}),
            "mgd_layers": layers.get("mgd", {}),
            "student_params": student.num_params(),
            "teacher_params": sum(p.numel() for p in teacher.module.parameters()),
            "student_flops": s_cost.flops,
            "teacher_flops": t_cost.flops if t_cost else None,
            "flops_ratio": round(s_cost.flops / t_cost.flops, 4) if t_cost else None,
        })
        student.module.cpu().eval()
        return student

    def _teacher(self, cfg: DistillConfig, graph: ModelGraph, ctx: RunContext) -> LoadedTeacher:
        if cfg.teacher is not None:
            t = load_teacher(cfg.teacher, ctx.registry, where="passes.distill.teacher")
        else:
            g = ctx.teacher if ctx.stages else graph
            t = LoadedTeacher(g.module, g, g.spec.mean, g.spec.std)
        t.module.to(ctx.device)
        check_teacher_classes(t, ctx.data.num_classes, "passes.distill.teacher")
        return t


def check_teacher_classes(t: LoadedTeacher, num_classes: int, where: str) -> None:
    """A teacher for this data must output its classes (KD compares logits class by class)."""
    out = t.graph.spec.num_classes if t.graph is not None else int(getattr(t.module, "num_classes", 0) or 0)
    if out != num_classes:
        raise EdgeVitError(
            f"{where}: outputs {out} classes but the data has {num_classes}; "
            "adapt the teacher to the task first (an `adapt` pass before distill)"
        )
