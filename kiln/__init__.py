"""Kiln: a node-graph workflow engine for image generation that speaks ComfyUI's graph format and protocol.

    from kiln import Graph, run
"""
from engine import ExecutionFailed, GraphFormatError, Interrupted, ValidationFailed

from .api import Result, apply_settings, executor, run
from .authoring import AuthoringError, Graph, NodeRef, Output

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Client":  # the websocket/HTTP client needs aiohttp/websockets: import on first use
        from .client import Client
        return Client
    raise AttributeError(name)


__all__ = ["Graph", "run", "Result", "Client", "NodeRef", "Output", "AuthoringError", "apply_settings", "executor",
           "ValidationFailed", "ExecutionFailed", "GraphFormatError", "Interrupted"]
