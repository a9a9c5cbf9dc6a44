"""Typed events of a run. The CLI and the server consume the same stream.

Each event knows its ComfyUI websocket message type (``comfy_type``) and data (``comfy_data()``), so the
server maps them one-to-one. The total size of a run's events grows linearly with its node count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Preview:
    """An image attached to a progress tick: already-encoded bytes (the engine never decodes images).

    ``kind`` is "preview" (a sampler's partial image, sent only to clients that asked for previews) or
    "output" (SaveImageWebsocket's images, always sent).
    """

    format: str  # "JPEG" or "PNG"
    data: bytes
    kind: str = "preview"
    metadata: dict = field(default_factory=dict)


@dataclass
class Event:
    prompt_id: str
    comfy_type = ""

    def comfy_data(self) -> dict:
        return {"prompt_id": self.prompt_id}


@dataclass
class ExecutionStart(Event):
    timestamp: int = field(default_factory=_now_ms)
    comfy_type = "execution_start"

    def comfy_data(self) -> dict:
        return {"prompt_id": self.prompt_id, "timestamp": self.timestamp}


@dataclass
class ExecutionCached(Event):
    nodes: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)
    comfy_type = "execution_cached"

    def comfy_data(self) -> dict:
        return {"nodes": list(self.nodes), "prompt_id": self.prompt_id, "timestamp": self.timestamp}


@dataclass
class NodeStarted(Event):
    node: str = ""
    display_node: str = ""
    class_type: str = ""
    comfy_type = "executing"

    def comfy_data(self) -> dict:
        return {"node": self.display_node or self.node, "display_node": self.display_node or self.node,
                "prompt_id": self.prompt_id}


@dataclass
class Progress(Event):
    node: str = ""
    value: int = 0
    max: int = 1
    preview: Preview | None = None
    comfy_type = "progress"

    def comfy_data(self) -> dict:
        return {"value": self.value, "max": self.max, "prompt_id": self.prompt_id, "node": self.node}


@dataclass
class NodeOutput(Event):
    node: str = ""
    display_node: str = ""
    output: dict | None = None
    cached: bool = False
    comfy_type = "executed"

    def comfy_data(self) -> dict:
        return {"node": self.node, "display_node": self.display_node or self.node, "output": self.output,
                "prompt_id": self.prompt_id}


@dataclass
class ExecutionSuccess(Event):
    timestamp: int = field(default_factory=_now_ms)
    comfy_type = "execution_success"

    def comfy_data(self) -> dict:
        return {"prompt_id": self.prompt_id, "timestamp": self.timestamp}


@dataclass
class ExecutionError(Event):
    node_id: str | None = None
    node_type: str | None = None
    executed: list = field(default_factory=list)
    exception_message: str = ""
    exception_type: str = ""
    traceback: list = field(default_factory=list)
    current_inputs: dict = field(default_factory=dict)
    current_outputs: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)
    comfy_type = "execution_error"

    def comfy_data(self) -> dict:
        return {"prompt_id": self.prompt_id, "node_id": self.node_id, "node_type": self.node_type,
                "executed": list(self.executed), "exception_message": self.exception_message,
                "exception_type": self.exception_type, "traceback": list(self.traceback),
                "current_inputs": self.current_inputs, "current_outputs": list(self.current_outputs),
                "timestamp": self.timestamp}


@dataclass
class NodeBlocked(Event):
    """A node call was skipped because an input carried an ExecutionBlocker with a message.

    Not fatal: the run goes on. ComfyUI reports it as an ``execution_error`` message whose
    exception_type is ``ExecutionBlocked``; it is not a terminal event.
    """

    node_id: str | None = None
    node_type: str | None = None
    message: str = ""
    executed: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)
    comfy_type = "execution_error"

    def comfy_data(self) -> dict:
        return {"prompt_id": self.prompt_id, "node_id": self.node_id, "node_type": self.node_type,
                "executed": list(self.executed), "exception_message": f"Execution Blocked: {self.message}",
                "exception_type": "ExecutionBlocked", "traceback": [], "current_inputs": [],
                "current_outputs": []}  # ComfyUI's shape for this message: no timestamp


@dataclass
class ExecutionInterrupted(Event):
    node_id: str | None = None
    node_type: str | None = None
    executed: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)
    comfy_type = "execution_interrupted"

    def comfy_data(self) -> dict:
        return {"prompt_id": self.prompt_id, "node_id": self.node_id, "node_type": self.node_type,
                "executed": list(self.executed), "timestamp": self.timestamp}


TERMINAL = (ExecutionSuccess, ExecutionError, ExecutionInterrupted)
EventSink = Callable[[Event], None]
