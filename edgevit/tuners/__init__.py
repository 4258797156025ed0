"""Tuners: which parameters a training pass trains and which extra modules exist.

``tuner:`` in adapt, distill and prune's ``recover`` names one from the registry's ``tuners``
group: the built-ins ``full`` (default), ``slicefine``, ``losa`` and ``disentangled``, or one a
plugin adds through the ``edgevit.tuners`` entry points. A string is shorthand for
``{name: <it>}``; the other keys are validated by that tuner's own ``Config``.

The registry comes from the pydantic validation context (``parse_recipe`` passes the run's),
else a fresh :class:`~edgevit.registry.Registry` (a config built directly in Python), so the
names a recipe may use are the ones the run will build with.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import PlainValidator, ValidationInfo
from pydantic_core import PydanticCustomError

from edgevit.errors import EdgeVitError
from edgevit.tuners.base import Tuner, TunerConfigBase
from edgevit.tuners.full import FullConfig


def _registry(registry: Any) -> Any:
    if registry is not None:
        return registry
    from edgevit.registry import Registry

    return Registry()


def tuner_class(name: str, registry: Any = None, where: str = "") -> type[Tuner]:
    """The registered tuner ``name``; an EdgeVitError naming the known ones if there is none, or
    if what is registered under that name is not a tuner with a ``TunerConfigBase`` config."""
    reg = _registry(registry)
    cls = reg.get("tuners", name, where=where)
    config = getattr(cls, "Config", None)
    if not (isinstance(cls, type) and issubclass(cls, Tuner)
            and isinstance(config, type) and issubclass(config, TunerConfigBase)):
        origin = next((e.origin for e in reg.entries("tuners") if e.name == name), "plugin")
        prefix = f"{where}: " if where else ""
        raise EdgeVitError(f"{prefix}tuner '{name}' from {origin} is not an edgevit.tuners.base.Tuner subclass "
                           "with a Config subclassing edgevit.tuners.base.TunerConfigBase")
    return cls


def _validate(value: Any, info: ValidationInfo) -> TunerConfigBase:
    """A tuner name or ``{name, ...options}`` → that registered tuner's validated config."""
    registry = (info.context or {}).get("registry")
    if isinstance(value, TunerConfigBase):  # already a config (built in Python): check it is a registered one's
        name = value.name
    else:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise PydanticCustomError("tuner", "give a tuner name, or a mapping with `name` and that tuner's options")
        name = value["name"]
    try:
        cls = tuner_class(name, registry)
    except EdgeVitError as e:  # the message travels in the context: it may contain braces
        raise PydanticCustomError("tuner", "{reason}", {"reason": str(e)}) from e
    if isinstance(value, TunerConfigBase):
        if not isinstance(value, cls.Config):
            raise PydanticCustomError("tuner", "{reason}", {
                "reason": f"a {type(value).__name__} is not tuner {name}'s config ({cls.Config.__name__})"})
        return value
    # a nested ValidationError keeps its location: the message names e.g. `...tuner.rank`
    return cls.Config.model_validate(value, context=info.context)


# A pass config's ``tuner`` field. Serialised as the config it holds (``Any``), so a run's config
# hash and metrics record the tuner's own options, as they did before tuners were pluggable.
TunerConfig = Annotated[Any, PlainValidator(_validate)]


def make_tuner(cfg: TunerConfigBase, registry: Any = None) -> Tuner:
    """The tuner ``cfg`` configures, built from the registry entry its ``name`` gives."""
    return tuner_class(cfg.name, registry)(cfg)


def check_tuner_task(tuner: TunerConfigBase, task: str, where: str, registry: Any = None) -> None:
    """Before any stage runs: a tuner that attaches a side module (LoSA, disentangled) predicts
    one class per image, which a segmenter cannot use (``ModelGraph._attach_side`` refuses it too,
    later)."""
    if task == "segmentation" and tuner_class(tuner.name, registry).side is not None:
        raise EdgeVitError(f"{where}.tuner: {tuner.name}'s side module predicts one class per image; a "
                           "segmenter's decode head reads the backbone's tokens itself; use tuner full or slicefine")


__all__ = ["FullConfig", "TunerConfig", "TunerConfigBase", "Tuner", "check_tuner_task", "make_tuner",
           "tuner_class"]
