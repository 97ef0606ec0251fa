"""Layer groups: the units a sensitivity pass scores and a search toggles between float and INT8.

Any split is executable: ONNX Runtime runs a QDQ graph with any set of float nodes (a float node reads dequantized
values), so grouping only decides what is toggled together.
"""
from __future__ import annotations

from .model import Graph, group_name

GROUPINGS = ("auto", "module", "node")


def layer_groups(graph: Graph, nodes: list[str], by: str = "auto", depth: int = 1) -> dict[str, list[str]]:
    """Group `nodes` (quantizable node names, graph order) -> {group label: node names}, groups in graph order.

    by: "module" (module prefix of the node name, '/model.24/m.0/Conv' -> 'model.24' at depth 1), "node" (one node
    each), "auto" (module prefixes)."""
    groups: dict[str, list[str]] = {}
    for n in nodes:
        key = n if by == "node" else group_name(n, depth)
        groups.setdefault(key, []).append(n)
    return groups
