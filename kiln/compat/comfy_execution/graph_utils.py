"""``comfy_execution.graph_utils``: ``GraphBuilder`` and its node are the engine's own (node expansion)."""

from kiln.engine import GraphBuilder
from kiln.engine.expansion import BuiltNode as Node, is_link

from .._runtime import runtime_getattr

__getattr__ = runtime_getattr("comfy_execution.graph_utils")

__all__ = ["GraphBuilder", "Node", "is_link"]
