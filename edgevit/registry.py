"""The one registry: built-in passes, model adapters, graph edits, side modules and tuners, plus
third-party ones from entry points (group ``edgevit.<group>``).

A plugin package adds a pass by declaring, in its own pyproject.toml::

    [project.entry-points."edgevit.passes"]
    mypass = "mypkg.passes:MyPass"

Built-ins are named here as import strings so that listing them imports nothing heavy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from edgevit.errors import EdgeVitError, did_you_mean

BUILTINS: dict[str, dict[str, str]] = {
    "passes": {
        "adapt": "edgevit.passes.adapt:AdaptPass",
        "distill": "edgevit.passes.distill:DistillPass",
        "prune": "edgevit.passes.prune:PrunePass",
        "quantize": "edgevit.passes.quantize:QuantizePass",
        "export": "edgevit.passes.export:ExportPass",
        "benchmark": "edgevit.passes.benchmark:BenchmarkPass",
        "bundle": "edgevit.passes.bundle:BundlePass",
    },
    "adapters": {
        "timm": "edgevit.graph.adapters.timm_vit:TimmViTAdapter",
        "hf": "edgevit.graph.adapters.hf_vit:HFViTAdapter",
        "builtin": "edgevit.graph.adapters.builtin_vit:BuiltinViTAdapter",
        "timm_swin": "edgevit.graph.adapters.timm_swin:TimmSwinAdapter",
        "timm_swinv2": "edgevit.graph.adapters.timm_swin:TimmSwinV2Adapter",
        "timm_beit": "edgevit.graph.adapters.timm_beit:TimmBeitAdapter",
        "timm_eva": "edgevit.graph.adapters.timm_eva:TimmEvaAdapter",
        "timm_mobilevit": "edgevit.graph.adapters.timm_mobilevit:TimmMobileViTAdapter",
        "segmenter": "edgevit.graph.adapters.segmenter:SegmenterAdapter",
    },
    # structural edits a ModelGraph records and replays on load (edgevit.graph.edits)
    "edits": {
        kind: f"edgevit.graph.edits:{kind}"
        for kind in ("keep_heads", "keep_mlp_units", "keep_blocks", "reset_classifier", "attach_side", "detach_side")
    },
    # side modules the attach_side edit rebuilds (a frozen backbone + a trainable side network)
    "sides": {
        "losa": "edgevit.tuners.losa:SideNetwork",
        "disentangled": "edgevit.tuners.disentangled:QueryExtraction",
    },
    "tuners": {
        "full": "edgevit.tuners.full:FullTuner",
        "slicefine": "edgevit.tuners.slicefine:SliceFineTuner",
        "losa": "edgevit.tuners.losa:LoSATuner",
        "disentangled": "edgevit.tuners.disentangled:DisentangledTuner",
    },
}
GROUP_LABEL = {"passes": "pass", "adapters": "model adapter", "edits": "graph edit", "sides": "side module",
               "tuners": "tuner"}


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attribute"
    origin: str  # "edgevit" or the distribution that provides the plugin


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def model_name(module: Any, name: str | None = None) -> str:
    """What the user gave: the timm model name (or timm's record of it), the Hugging Face class
    inside edgevit's wrapper, else the module's class."""
    inner = getattr(module, "model", None)
    if type(module).__name__ == "HFImageClassifier" and inner is not None:
        return f"Hugging Face {type(inner).__name__}"
    cls = type(module).__name__
    arch = name or (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
    return f"timm {arch} ({cls})" if arch else cls


class Registry:
    """Name → class for each group; plugins come from the ``edgevit.<group>`` entry points."""

    def __init__(self, plugins: bool = True) -> None:
        self._entries: dict[str, dict[str, Entry]] = {}
        for group, builtins in BUILTINS.items():
            entries = {n: Entry(n, t, "edgevit") for n, t in builtins.items()}
            if plugins:
                for ep in entry_points(group=f"edgevit.{group}"):
                    origin = ep.dist.name if ep.dist is not None else "plugin"
                    if ep.name in entries and entries[ep.name].target != ep.value:
                        raise EdgeVitError(
                            f"plugin {origin} registers {GROUP_LABEL[group]} '{ep.name}', a name "
                            f"{entries[ep.name].origin} already uses; rename it in {origin}'s entry points"
                        )
                    entries[ep.name] = Entry(ep.name, ep.value, origin)
            self._entries[group] = entries

    def names(self, group: str) -> list[str]:
        return sorted(self._entries[group])

    def entries(self, group: str) -> list[Entry]:
        return [self._entries[group][n] for n in self.names(group)]

    def get(self, group: str, name: str, where: str = "") -> Any:
        entries = self._entries[group]
        if name not in entries:
            label = GROUP_LABEL[group]
            prefix = f"{where}: " if where else ""
            raise EdgeVitError(
                f"{prefix}unknown {label} '{name}'{did_you_mean(name, entries)}; "
                f"available: {', '.join(sorted(entries))}"
            )
        entry = entries[name]
        try:
            return _load(entry.target)
        except Exception as e:  # a broken plugin must not break every command with a traceback
            raise EdgeVitError(
                f"{GROUP_LABEL[group]} '{name}' from {entry.origin} cannot be loaded ({entry.target}): "
                f"{type(e).__name__}: {e}"
            ) from e

    def adapter_for(self, module: Any, name: str | None = None) -> Any:
        """An instance of the first adapter that understands ``module``; else a clear error that
        names the model as the user gave it (``name``: the timm model name, if known)."""
        supported = []
        for adapter in self.names("adapters"):
            cls = self.get("adapters", adapter)
            supported.append(cls.supports)
            try:
                if cls.matches(module):
                    return cls()
            except ImportError:  # the adapter's library is not installed: it cannot match
                continue
        raise EdgeVitError(
            f"model: {model_name(module, name)} is not a supported Vision Transformer; "
            f"edgevit supports {', '.join(supported)}"
        )

    def adapter(self, name: str) -> Any:
        return self.get("adapters", name)()
