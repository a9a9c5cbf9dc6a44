"""``comfy_execution.graph``: ``ExecutionBlocker`` and ``DynamicPrompt`` are the engine's own classes, so a
pack's blocker blocks and its type hints name what it receives."""

from kiln.engine import ExecutionBlocker
from kiln.engine.expansion import DynamicPrompt

from .._runtime import runtime_getattr

__getattr__ = runtime_getattr("comfy_execution.graph")
__all__ = ["DynamicPrompt", "ExecutionBlocker"]
