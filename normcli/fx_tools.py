"""torch.fx helpers shared by the fold and the swap."""

from __future__ import annotations


def drop_string_annotations(graph) -> None:
    """Clear node types that arrive as strings.

    ``from __future__ import annotations`` in a model's source turns its type hints into strings, which a
    traced GraphModule then cannot pickle (``torch.save`` fails on them). They change nothing the model
    computes.
    """
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None
