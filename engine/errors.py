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


class ValidationFailed(KilnError):
    """Validation found problems; ``result`` is the ValidationResult (``problems`` per node, ``error``)."""

    def __init__(self, result: Any, summary: str):
        super().__init__(summary)
        self.result = result
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
    """A run ended with a node error; ``error`` is the typed event that says which node failed and why
    (``kiln.engine.events.ExecutionError``: node_id, node_type, message, exception_type, traceback, ...)."""

    def __init__(self, error: Any):
        super().__init__(f"{error.node_type} (node {error.node_id}): {error.message}")
        self.error = error
