"""``execution``: ComfyUI's executor module. Kiln's executor is its own; only names packs compare
against are here, the rest are runtime placeholders."""

from kiln.engine import ExecutionBlocker

from ._runtime import runtime_getattr

__getattr__ = runtime_getattr("execution")
__all__ = ["ExecutionBlocker"]
