"""The ModelGraph: the one object that travels through the pipeline.

It holds the current ``nn.Module`` (whose ``forward(images)`` returns logits), the structural
:class:`GraphSpec`, the recipe to build the base architecture without pickle, the structural
edits made since (each recorded as ``{kind, args}``), the history of passes, and artifacts
(e.g. an exported ONNX file). Structural edits live here so passes never patch modules by
hand; loading builds the base architecture, replays the edits and loads the weights strictly.
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

GRAPH_FORMAT = "edgevit.graph/2"  # build + recorded edits
V1_FORMAT = "edgevit.graph/1"  # build with depth/classes folded in, widths from the spec, build["side"]


class Edit(BaseModel):
    """One recorded structural edit: a registry ``edits`` kind and its JSON arguments."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    args: dict[str, Any] = Field(default_factory=dict)


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
        edits: list[Edit] | None = None,
        registry: Any = None,
    ) -> None:
        self.module = module
        self.spec = spec
        self.adapter = adapter
        self.build = build  # how to build the base architecture; None = cannot be saved
        self.edits = list(edits or [])  # structural edits since ``build``, replayed in order on load
        self.history = list(history or [])
        self.artifacts = dict(artifacts or {})
        self.weights_path: Path | None = None  # the file the weights were loaded from, if any
        self._registry = registry

    @property
    def registry(self) -> Any:
        """The registry edits are looked up in (built on first use; plugins included)."""
        if self._registry is None:
            from edgevit.registry import Registry

            self._registry = Registry()
        return self._registry

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

        registry = registry or Registry()
        adapter = registry.adapter_for(module, (build or {}).get("name"))
        adapter.adopt(module, build)
        return cls(module, adapter.describe(module, mean=mean, std=std), adapter, build, registry=registry)

    @property
    def backbone(self) -> nn.Module:
        """The ViT itself: the module, or the frozen backbone under an attached side module."""
        return self.module.backbone if isinstance(self.module, TunedModel) else self.module

    @property
    def side(self) -> SideModule | None:
        return self.module.side if isinstance(self.module, TunedModel) else None

    def attach_side(self, side: SideModule, config: dict[str, Any]) -> None:
        """Run the model as frozen backbone + ``side`` from now on; ``config`` rebuilds the side
        module on load (the ``attach_side`` edit, side kind from the registry's ``sides``)."""
        self._attach_side(side)
        self._record("attach_side", {"side": side.kind, "config": dict(config)})

    def detach_side(self) -> None:
        """Back to the plain backbone (e.g. before deriving a student with other blocks)."""
        if isinstance(self.module, TunedModel):
            self.apply("detach_side")

    def _attach_side(self, side: SideModule) -> None:
        if self.side is not None:
            raise EdgeVitError(f"a {self.side.kind} side module is attached already; one per model")
        if self.spec.task == "segmentation":
            raise EdgeVitError(f"tuner {side.kind}: its side module predicts one class per image; a segmenter's "
                               "decode head reads the backbone's tokens itself; use tuner full or slicefine")
        if not self.spec.plain:
            raise EdgeVitError(f"tuner {side.kind}: its side module reads one token sequence of one width through "
                               f"every block; this {self.spec.family} model has stages of other widths or token "
                               "counts; use tuner full or slicefine")
        self.module = TunedModel(self.module, side, self.spec)

    def _detach_side(self) -> None:
        if isinstance(self.module, TunedModel):
            self.module = self.module.backbone

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
            [e.model_copy(deep=True) for e in self.edits],
            self._registry,
        )
        g._sync_side()
        return g

    def apply(self, kind: str, args: dict[str, Any] | None = None) -> None:
        """Run the registered edit ``kind`` with ``args`` and record it (replayed on load)."""
        args = dict(args or {})
        fn = self.registry.get("edits", kind)
        fn(self, **args)
        self._record(kind, args)

    def _record(self, kind: str, args: dict[str, Any]) -> None:
        self.edits.append(Edit(kind=kind, args=args))

    # structural edits -------------------------------------------------------------
    def keep_heads(self, block: int, heads: Sequence[int]) -> None:
        """Keep only ``heads`` of ``block``'s attention: q/k/v rows and proj columns leave the
        weights, and the module's own attributes (num_heads, attn_dim, ...) follow."""
        idx = _check_indices(heads, self.spec.block(block).attn.num_heads, f"block {block} heads")
        self.apply("keep_heads", {"block": int(block), "heads": idx})

    def keep_mlp_units(self, block: int, units: Sequence[int]) -> None:
        """Keep only ``units`` of ``block``'s MLP hidden layer: fc1 rows (and bias), fc2 columns."""
        idx = _check_indices(units, self.spec.block(block).mlp.hidden, f"block {block} MLP units")
        self.apply("keep_mlp_units", {"block": int(block), "units": idx})

    def keep_blocks(self, blocks: Sequence[int]) -> None:
        """Keep only ``blocks`` (in order): the others leave the module and the spec is re-read
        (block paths renumber)."""
        idx = _check_indices(blocks, self.spec.depth, "blocks")
        if self.side is not None:
            raise EdgeVitError(f"keep_blocks: a {self.side.kind} side module reads every block; detach it first")
        self.apply("keep_blocks", {"blocks": idx})

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier head(s) for a task with ``num_classes`` classes (task adaptation)."""
        if self.side is not None:
            raise EdgeVitError(f"a new class count for a model with a {self.side.kind} side module: its head "
                               "belongs to the side module; adapt the plain model to the new classes first")
        self.apply("reset_classifier", {"num_classes": int(num_classes)})

    def _keep_heads(self, block: int, heads: Sequence[int]) -> None:
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
        head_idx = torch.tensor(idx, dtype=torch.long)
        if a.bias_table:  # one column per head (Swin v1, BEiT relative position bias)
            owner, name = a.bias_table.rsplit(".", 1)
            table = self._sub(owner).get_parameter(name)
            setattr(self._sub(owner), name, nn.Parameter(table.detach().index_select(1, head_idx.to(table.device))
                                                          .clone(), requires_grad=table.requires_grad))
        if a.cpb:  # Swin v2: the position bias MLP's last linear has one output per head
            last = [m for m in self._sub(a.cpb).modules() if isinstance(m, nn.Linear)][-1]
            slice_linear(last, out_idx=head_idx)
        self.adapter.after_keep_heads(self._sub(a.path), a, channels)
        a.num_heads = len(idx)

    def _keep_mlp_units(self, block: int, units: Sequence[int]) -> None:
        m = self.spec.block(block).mlp
        idx = torch.tensor(_check_indices(units, m.hidden, f"block {block} MLP units"), dtype=torch.long)
        # a SwiGLU unit is its value row, its gate row and its fc2 column
        slice_linear(self._sub(m.fc1), out_idx=torch.cat([idx, idx + m.hidden]) if m.fused_gate else idx)
        if m.gate:
            slice_linear(self._sub(m.gate), out_idx=idx)
        slice_linear(self._sub(m.fc2), in_idx=idx)
        self.adapter.after_keep_mlp_units(self._sub(m.path), m, idx)
        m.hidden = int(idx.numel())

    def _keep_blocks(self, blocks: Sequence[int]) -> None:
        idx = _check_indices(blocks, self.spec.depth, "blocks")
        self.adapter.keep_blocks(self.module, idx)
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

    def _reset_classifier(self, num_classes: int) -> None:
        self.adapter.reset_classifier(self.module, num_classes)
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
                "edits": [e.model_dump(mode="json") for e in self.edits],
                "spec": self.spec.model_dump(mode="json"),
                "history": [h.model_dump(mode="json") for h in self.history],
                "artifacts": {k: os.path.relpath(v, directory) for k, v in self.artifacts.items()},
            },
        )

    @classmethod
    def load(cls, directory: Path, registry: Any = None, where: str = "model.path") -> ModelGraph:
        """Rebuild a saved graph in any process: the base architecture from its recipe, the
        recorded edits replayed in order, then the weights, strictly. Reads format v1 too."""
        from edgevit.registry import Registry

        directory = Path(directory)
        meta_path = directory / "graph.json"
        if not meta_path.is_file():
            raise EdgeVitError(f"{where}: {directory} is not a saved edgevit model (no graph.json)")
        try:
            meta = read_json(meta_path)
            fmt = meta.get("format")
            if fmt not in (GRAPH_FORMAT, V1_FORMAT):
                raise EdgeVitError(f"{where}: {meta_path} has format {fmt!r}, expected {GRAPH_FORMAT}")
            saved = meta["spec"]
            family, build = saved["family"], meta["build"]
            edits = [Edit.model_validate(e) for e in meta.get("edits", [])]
        except (ValueError, KeyError, TypeError) as e:
            raise EdgeVitError(f"{where}: {meta_path} is damaged: {str(e).splitlines()[0]}") from e
        registry = registry or Registry()
        adapter = registry.adapter(family)
        if fmt == V1_FORMAT:
            build, edits = _v1_edits(build, saved)
        graph = cls.rebuild(adapter, build, edits, mean=saved["mean"], std=saved["std"], registry=registry,
                            where=f"{where}: {meta_path}")
        _check_replayed(graph.spec, saved, f"{where}: {meta_path}")
        weights = (directory / meta["weights"]).resolve()
        apply_state_dict(graph.module, read_state_dict(weights, where), str(weights), where)
        graph.weights_path = weights
        graph.history = [HistoryEntry.model_validate(h) for h in meta.get("history", [])]
        graph.artifacts = {k: (directory / v).resolve() for k, v in meta.get("artifacts", {}).items()}
        graph.module.eval()
        return graph

    @classmethod
    def rebuild(cls, adapter: Adapter, build: dict[str, Any], edits: Sequence[Edit], *, mean: Any = None,
                std: Any = None, registry: Any = None, where: str = "model") -> ModelGraph:
        """A freshly initialised module of ``build`` with ``edits`` replayed: the saved shapes,
        the family's own initialisation (weights are loaded afterwards, or trained)."""
        module = adapter.build(build)
        adapter.adopt(module, build)
        graph = cls(module, adapter.describe(module, mean=mean, std=std), adapter, build, registry=registry)
        for i, e in enumerate(edits):
            try:
                graph.apply(e.kind, e.args)
            except EdgeVitError:
                raise
            except (ValueError, TypeError, IndexError, KeyError) as err:
                raise EdgeVitError(f"{where}: recorded edit {i} ({e.kind} {e.args}) does not replay on this "
                                   f"architecture: {err}") from err
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


def _v1_edits(build: dict[str, Any], saved: dict[str, Any]) -> tuple[dict[str, Any], list[Edit]]:
    """A v1 graph as base build + edits: v1 folded depth and classes into the build (kept as the
    base), recorded widths only in the spec (now ``keep_*`` edits of the first heads/units, the
    order v1 saved the sliced weights in) and a side module as ``build["side"]``."""
    base = {k: v for k, v in (build or {}).items() if k != "side"}
    edits = []
    for blk in saved["blocks"]:
        i = blk["index"]
        edits.append(Edit(kind="keep_heads", args={"block": i, "heads": list(range(blk["attn"]["num_heads"]))}))
        edits.append(Edit(kind="keep_mlp_units", args={"block": i, "units": list(range(blk["mlp"]["hidden"]))}))
    if build and "side" in build:
        side = dict(build["side"])
        kind = side.pop("kind")
        edits.append(Edit(kind="attach_side", args={"side": kind, "config": side}))
    return base, edits


def _check_replayed(spec: GraphSpec, saved: dict[str, Any], where: str) -> None:
    """The replayed architecture must have the saved shapes (else the edits or the recipe drifted)."""
    blocks = saved["blocks"]
    if spec.depth != len(blocks):
        raise EdgeVitError(f"{where} has {len(blocks)} blocks but its recipe and edits build {spec.depth}")
    for blk, want in zip(spec.blocks, blocks, strict=True):
        got = (blk.attn.num_heads, blk.mlp.hidden)
        exp = (want["attn"]["num_heads"], want["mlp"]["hidden"])
        if got != exp:
            raise EdgeVitError(f"{where}: block {blk.index} has {exp[0]} heads and {exp[1]} MLP units saved but "
                               f"{got[0]} and {got[1]} rebuilt; the file was edited or written by another edgevit")
