"""The structural edit kinds a graph records, as the registry's ``edits`` group lists them.

Each is ``edit(graph, **args)`` with JSON-able ``args``: :meth:`ModelGraph.apply` runs one and
appends ``{kind, args}`` to ``graph.edits``; :meth:`ModelGraph.load` replays them in order on a
freshly built architecture before loading the weights. A plugin adds a kind through the
``edgevit.edits`` entry points (its function may call the graph's public edits).
"""

from __future__ import annotations

from typing import Any


def keep_heads(graph: Any, block: int, heads: list[int]) -> None:
    graph._keep_heads(block, heads)


def keep_mlp_units(graph: Any, block: int, units: list[int]) -> None:
    graph._keep_mlp_units(block, units)


def keep_blocks(graph: Any, blocks: list[int]) -> None:
    graph._keep_blocks(blocks)


def reset_classifier(graph: Any, num_classes: int) -> None:
    graph._reset_classifier(num_classes)


def attach_side(graph: Any, side: str, config: dict[str, Any]) -> None:
    """Rebuild the side module ``side`` (a registry ``sides`` entry) from its config."""
    cls = graph.registry.get("sides", side)
    graph._attach_side(cls.from_config(dict(config), graph.spec))


def detach_side(graph: Any) -> None:
    graph._detach_side()
