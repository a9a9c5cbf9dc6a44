"""Exceptions raised by the engine. Each carries enough to tell the user what to change."""
from __future__ import annotations

from typing import Any


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""


class NodeDefinitionError(KilnError):
    """A node class is malformed; raised when it is registered."""


class GraphFormatError(KilnError):
    """The submitted JSON is not a graph Kiln can read (bad JSON, UI format, wrong shapes)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_comfy(self) -> dict:
        return {"type": "invalid_prompt", "message": self.message, "details": self.details, "extra_info": {}}


class ValidationFailed(KilnError):
    """Validation found problems; ``error`` and ``node_errors`` are in ComfyUI's shape."""

    def __init__(self, error: dict, node_errors: dict, summary: str):
        super().__init__(summary)
        self.error = error
        self.node_errors = node_errors
        self.summary = summary


class Interrupted(KilnError):
    """Raised inside a run when it was cancelled; nodes may let it propagate."""


class NodeError(KilnError):
    """A node failed while running. Raise it from a node for a clean message without a traceback."""

    def __init__(self, message: str, *, input_name: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.input_name = input_name
        self.hint = hint


class ExecutionFailed(KilnError):
    """A run ended with a node error; ``info`` is the ComfyUI ``execution_error`` data."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(f"{info.get('node_type')} (node {info.get('node_id')}): {info.get('exception_message')}")
        self.info = info
