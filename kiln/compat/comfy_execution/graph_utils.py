"""``comfy_execution.graph_utils``: ``GraphBuilder`` is the engine's own (node expansion)."""

from typing import Any

from kiln.engine import GraphBuilder

from .._runtime import runtime_getattr

__getattr__ = runtime_getattr("comfy_execution.graph_utils")


def is_link(obj: Any) -> bool:
    return isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], int)


__all__ = ["GraphBuilder", "is_link"]
