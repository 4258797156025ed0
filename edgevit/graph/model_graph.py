"""The ModelGraph: the one object that travels through the pipeline.

It holds the current ``nn.Module`` (whose ``forward(images)`` returns logits), the structural
:class:`GraphSpec`, the recipe to rebuild the architecture without pickle, the history of
passes, and artifacts (e.g. an exported ONNX file). Structural edits live here so passes
never patch modules by hand.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from edgevit import __version__
from edgevit.errors import EdgeVitError
from edgevit.fileio import atomic_path, read_json, write_json
from edgevit.graph.adapters.base import Adapter, slice_linear
from edgevit.graph.cost import CostReport, compute_cost
from edgevit.graph.extension import SideModule, TunedModel
from edgevit.graph.spec import GraphSpec
from edgevit.graph.weights import apply_state_dict, read_state_dict

GRAPH_FORMAT = "edgevit.graph/1"


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pass_name: str
    stage: str
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class ModelGraph:
    def __init__(
        self,
        module: nn.Module,
        spec: GraphSpec,
        adapter: Adapter,
        build: dict[str, Any] | None,
        history: list[HistoryEntry] | None = None,
        artifacts: dict[str, Path] | None = None,
    ) -> None:
        self.module = module
        self.spec = spec
        self.adapter = adapter
        self.build = build  # how to rebuild the architecture; None = cannot be saved
        self.history = list(history or [])
        self.artifacts = dict(artifacts or {})
        self.weights_path: Path | None = None  # the file the weights were loaded from, if any

    # construction -----------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        build: dict[str, Any] | None = None,
        *,
        mean: Any = None,
        std: Any = None,
        registry: Any = None,
    ) -> ModelGraph:
        from edgevit.registry import Registry

        adapter = (registry or Registry()).adapter_for(module)
        return cls(module, adapter.describe(module, mean=mean, std=std), adapter, build)

    @property
    def backbone(self) -> nn.Module:
        """The ViT itself: the module, or the frozen backbone under an attached side module."""
        return self.module.backbone if isinstance(self.module, TunedModel) else self.module

    @property
    def side(self) -> SideModule | None:
        return self.module.side if isinstance(self.module, TunedModel) else None

    def attach_side(self, side: SideModule, config: dict[str, Any]) -> None:
        """Run the model as frozen backbone + ``side`` from now on; ``config`` rebuilds the side
        module on load (``build["side"]``)."""
        if self.side is not None:
            raise EdgeVitError(f"a {self.side.kind} side module is attached already; one per model")
        self.module = TunedModel(self.module, side, self.spec)
        self.build = {**(self.build or {}), "side": {"kind": side.kind, **config}}

    def detach_side(self) -> None:
        """Back to the plain backbone (e.g. before deriving a student with other blocks)."""
        if isinstance(self.module, TunedModel):
            self.module = self.module.backbone
            self.build = {k: v for k, v in (self.build or {}).items() if k != "side"}

    def _sync_side(self) -> None:
        if isinstance(self.module, TunedModel):
            self.module.spec = self.spec

    def clone(self) -> ModelGraph:
        """A deep copy, so a pass can change the model while its input stays untouched."""
        g = ModelGraph(
            copy.deepcopy(self.module),
            self.spec.model_copy(deep=True),
            self.adapter,
            copy.deepcopy(self.build),
            [h.model_copy(deep=True) for h in self.history],
            dict(self.artifacts),
        )
        g._sync_side()
        return g

    # structural edits -------------------------------------------------------------
    def keep_heads(self, block: int, heads: Sequence[int]) -> None:
        """Keep only ``heads`` of ``block``'s attention: q/k/v rows and proj columns leave the
        weights, and the module's own attributes (num_heads, attn_dim, ...) follow."""
        a = self.spec.block(block).attn
        idx = _check_indices(heads, a.num_heads, f"block {block} heads")
        hd = a.head_dim
        channels = torch.tensor([h * hd + j for h in idx for j in range(hd)], dtype=torch.long)
        if a.fused:
            rows = torch.cat([channels + s * a.attn_dim for s in range(3)])
            slice_linear(self._sub(a.qkv), out_idx=rows)
        else:
            for p in (a.q, a.k, a.v):
                slice_linear(self._sub(p), out_idx=channels)
        slice_linear(self._sub(a.proj), in_idx=channels)
        self.adapter.after_keep_heads(self._sub(a.path), a, channels)
        a.num_heads = len(idx)

    def keep_mlp_units(self, block: int, units: Sequence[int]) -> None:
        """Keep only ``units`` of ``block``'s MLP hidden layer: fc1 rows (and bias), fc2 columns."""
        m = self.spec.block(block).mlp
        idx = torch.tensor(_check_indices(units, m.hidden, f"block {block} MLP units"), dtype=torch.long)
        slice_linear(self._sub(m.fc1), out_idx=idx)
        slice_linear(self._sub(m.fc2), in_idx=idx)
        self.adapter.after_keep_mlp_units(self._sub(m.path), m, idx)
        m.hidden = int(idx.numel())

    def keep_blocks(self, blocks: Sequence[int]) -> None:
        """Keep only ``blocks`` (in order): the others leave the module, the construction
        recipe records the new depth, and the spec is re-read (block paths renumber)."""
        idx = _check_indices(blocks, self.spec.depth, "blocks")
        if self.side is not None:
            raise EdgeVitError(f"keep_blocks: a {self.side.kind} side module reads every block; detach it first")
        self.build = self.adapter.keep_blocks(self.module, self.build or {}, idx)
        old = self.spec
        spec = self.adapter.describe(self.module, mean=old.mean, std=old.std)
        self.spec = spec.model_copy(update={"num_classes": old.num_classes})

    def assign_linear(self, path: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Overwrite a linear's weights in place (a re-fit), shapes unchanged."""
        lin = self._sub(path)
        if not isinstance(lin, nn.Linear) or tuple(weight.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{path}: expected a Linear weight of shape {tuple(lin.weight.shape)}")
        with torch.no_grad():
            lin.weight.copy_(weight.to(lin.weight))
            if bias is not None:
                if lin.bias is None:
                    raise ValueError(f"{path} has no bias to assign")
                lin.bias.copy_(bias.to(lin.bias))

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier head(s) for a task with ``num_classes`` classes (task adaptation)."""
        if self.side is not None:
            raise EdgeVitError(f"a new class count for a model with a {self.side.kind} side module: its head "
                               "belongs to the side module; adapt the plain model to the new classes first")
        self.build = self.adapter.reset_classifier(self.module, self.build or {}, num_classes)
        self.spec.num_classes = num_classes

    # measurement ------------------------------------------------------------------
    def cost(self, batch: int = 1, dtype_bytes: int = 4) -> CostReport:
        report = compute_cost(self.spec, self.backbone, batch=batch, dtype_bytes=dtype_bytes)
        side = self.side
        if side is not None:
            from edgevit.graph.cost import LayerCost

            params = sum(p.numel() for p in side.parameters())
            macs = batch * side.macs(self.spec)
            report.layers.append(LayerCost(f"side ({side.kind})", "side", None, macs, 2 * macs, params,
                                           params * dtype_bytes, 0, 0))
        return report

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @contextmanager
    def export_mode(self) -> Iterator[nn.Module]:
        """The module in eval mode with operators every ONNX opset can express."""
        was_training = self.module.training
        self.module.eval()
        try:
            with self.adapter.export_mode(self.backbone):
                yield self.module
        finally:
            self.module.train(was_training)

    def describe_build(self) -> str:
        b = self.build or {}
        return b.get("name") or b.get("architecture") or self.spec.family

    # persistence --------------------------------------------------------------------
    def save(self, directory: Path, weights_from: Path | None = None) -> None:
        """Write ``graph.json`` (+ ``model.safetensors`` unless ``weights_from`` names an earlier
        stage's file holding the same weights). Nothing is pickled."""
        if self.build is None:
            raise EdgeVitError(
                "this graph has no construction recipe (built with from_module(build=None)); "
                "it cannot be saved and reloaded"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if weights_from is None:
            weights = directory / "model.safetensors"
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.module.state_dict().items()}
            with atomic_path(weights) as tmp:
                save_file(state, str(tmp), metadata={"format": GRAPH_FORMAT})
        else:
            weights = Path(weights_from)
        write_json(
            directory / "graph.json",
            {
                "format": GRAPH_FORMAT,
                "edgevit_version": __version__,
                "weights": os.path.relpath(weights, directory),
                "params": self.num_params(),
                "build": self.build,
                "spec": self.spec.model_dump(mode="json"),
                "history": [h.model_dump(mode="json") for h in self.history],
                "artifacts": {k: os.path.relpath(v, directory) for k, v in self.artifacts.items()},
            },
        )

    @classmethod
    def load(cls, directory: Path, registry: Any = None, where: str = "model.path") -> ModelGraph:
        """Rebuild a saved graph in any process: architecture from its recipe, shapes from the
        spec (pruned blocks are sliced to size), then the weights, strictly."""
        from edgevit.registry import Registry

        directory = Path(directory)
        meta_path = directory / "graph.json"
        if not meta_path.is_file():
            raise EdgeVitError(f"{where}: {directory} is not a saved edgevit model (no graph.json)")
        try:
            meta = read_json(meta_path)
            spec = GraphSpec.model_validate(meta["spec"])
        except (ValueError, KeyError) as e:
            raise EdgeVitError(f"{where}: {meta_path} is damaged: {str(e).splitlines()[0]}") from e
        if meta.get("format") != GRAPH_FORMAT:
            raise EdgeVitError(f"{where}: {meta_path} has format {meta.get('format')!r}, expected {GRAPH_FORMAT}")
        adapter = (registry or Registry()).adapter(spec.family)
        build = {k: v for k, v in meta["build"].items() if k != "side"} if meta["build"] else meta["build"]
        module = adapter.build(build)
        graph = cls(module, adapter.describe(module, mean=spec.mean, std=spec.std), adapter, build)
        if graph.spec.depth != spec.depth:
            raise EdgeVitError(f"{where}: {meta_path} has {spec.depth} blocks but its recipe builds {graph.spec.depth}")
        for saved, built in zip(spec.blocks, graph.spec.blocks, strict=True):
            if saved.attn.num_heads != built.attn.num_heads:
                graph.keep_heads(saved.index, range(saved.attn.num_heads))
            if saved.mlp.hidden != built.mlp.hidden:
                graph.keep_mlp_units(saved.index, range(saved.mlp.hidden))
        graph.spec = spec
        if meta["build"] and "side" in meta["build"]:
            from edgevit.tuners import build_side

            side_cfg = dict(meta["build"]["side"])
            graph.attach_side(build_side(side_cfg, spec), {k: v for k, v in side_cfg.items() if k != "kind"})
            module = graph.module
        weights = (directory / meta["weights"]).resolve()
        apply_state_dict(module, read_state_dict(weights, where), str(weights), where)
        graph.weights_path = weights
        graph.history = [HistoryEntry.model_validate(h) for h in meta.get("history", [])]
        graph.artifacts = {k: (directory / v).resolve() for k, v in meta.get("artifacts", {}).items()}
        module.eval()
        return graph

    def _sub(self, path: str | None) -> nn.Module:
        assert path is not None
        return self.module.get_submodule(path)


def _check_indices(indices: Sequence[int], size: int, what: str) -> list[int]:
    idx = sorted({int(i) for i in indices})
    if len(idx) != len(list(indices)):
        raise ValueError(f"{what}: duplicate indices")
    if not idx:
        raise ValueError(f"{what}: keep at least one")
    if idx[0] < 0 or idx[-1] >= size:
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {idx[0]}..{idx[-1]}")
    return idx
