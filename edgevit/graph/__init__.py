"""The shared model graph: spec, adapters, structural edits, cost, save/load."""

from edgevit.graph.cost import CostReport, LayerCost
from edgevit.graph.model_graph import Edit, HistoryEntry, ModelGraph
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec

__all__ = [
    "AttentionSpec",
    "BlockSpec",
    "CostReport",
    "Edit",
    "GraphSpec",
    "HistoryEntry",
    "LayerCost",
    "MlpSpec",
    "ModelGraph",
]
