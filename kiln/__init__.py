"""Kiln: a node-graph workflow engine for image generation that speaks ComfyUI's graph format and protocol.

    from kiln import Graph, run

Everything Kiln installs lives under this package: ``kiln.engine``, ``kiln.nodes``, ``kiln.server`` and
``kiln.training`` are the repository's top-level folders of the same names, mapped here by the build. This
module stays light (names are resolved on first use), so ``import kiln.engine`` never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Graph": "kiln.authoring",
    "NodeRef": "kiln.authoring",
    "Output": "kiln.authoring",
    "AuthoringError": "kiln.authoring",
    "Result": "kiln.api",
    "apply_settings": "kiln.api",
    "executor": "kiln.api",
    "run": "kiln.api",
    "Client": "kiln.client",
    "KilnError": "kiln.engine.errors",
    "ValidationFailed": "kiln.engine.errors",
    "ExecutionFailed": "kiln.engine.errors",
    "GraphFormatError": "kiln.engine.errors",
    "Interrupted": "kiln.engine.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Graph",
    "run",
    "Result",
    "Client",
    "NodeRef",
    "Output",
    "AuthoringError",
    "apply_settings",
    "executor",
    "KilnError",
    "ValidationFailed",
    "ExecutionFailed",
    "GraphFormatError",
    "Interrupted",
]
