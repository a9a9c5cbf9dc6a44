"""``comfy_execution.graph``: ``ExecutionBlocker`` is the engine's own class, so a pack's blocker blocks."""

from kiln.engine import ExecutionBlocker

from .._runtime import runtime_getattr

__getattr__ = runtime_getattr("comfy_execution.graph")
__all__ = ["ExecutionBlocker"]
