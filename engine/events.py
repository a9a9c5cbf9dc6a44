"""Typed events of a run: what happened, in the engine's own terms.

The executor emits these to one sink; consumers render them in their own format (the server maps each to
a websocket message in ``kiln.server.protocol``, the CLI draws progress bars). The total size of a run's
events grows linearly with its node count.

Node events name the node four ways, so a consumer never has to look the graph up again:
``node`` (its unique id in the run), ``display_node`` (the id shown to the user: for a node made by
expanding another, the id of the node the user placed), ``parent_node`` (the node it was expanded from, or
None) and ``real_node`` (the top-level node at the root of its expansion chain).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Preview:
    """An image attached to a progress tick: already-encoded bytes (the engine never decodes images).

    ``kind`` is "preview" (a sampler's partial image, sent only to clients that asked for previews) or
    "output" (an image a node streams as its result, always delivered).
    """

    format: str  # "JPEG" or "PNG"
    data: bytes
    kind: str = "preview"
    metadata: dict = field(default_factory=dict)


@dataclass
class Event:
    prompt_id: str


@dataclass
class ExecutionStart(Event):
    """The run began."""

    timestamp: int = field(default_factory=_now_ms)


@dataclass
class ExecutionCached(Event):
    """These nodes will be served from the cache (in the graph's order)."""

    nodes: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


@dataclass
class NodeEvent(Event):
    """An event about one node; see the module docstring for the four ids."""

    node: str = ""
    display_node: str = ""
    parent_node: str | None = None
    real_node: str = ""

    def __post_init__(self) -> None:
        self.display_node = self.display_node or self.node
        self.real_node = self.real_node or self.node


@dataclass
class NodeStarted(NodeEvent):
    class_type: str = ""


@dataclass
class Progress(NodeEvent):
    """A running node's progress. ``node`` is its unique id; ``display_node`` the id a user sees."""

    value: int = 0
    max: int = 1
    preview: Preview | None = None


@dataclass
class ProgressText(NodeEvent):
    """A line of status text from a running node ("downloading 3 of 5", "waiting for the reply"). Transient:
    shown while the node runs, not kept with the prompt's events."""

    text: str = ""


@dataclass
class NodeOutput(NodeEvent):
    """A node finished with a result to show (its UI dict), or was served with one from the cache."""

    output: dict | None = None
    cached: bool = False


@dataclass
class ExecutionSuccess(Event):
    timestamp: int = field(default_factory=_now_ms)


@dataclass
class ExecutionError(Event):
    """The run stopped because a node failed. Also the value of ``RunResult.error``.

    ``node_id`` is the display id of the failed node; ``inputs`` maps each input name to short reprs of
    the values it received; ``outputs`` lists the nodes whose results were held when it failed.
    """

    node_id: str | None = None
    node_type: str | None = None
    executed: list = field(default_factory=list)
    message: str = ""
    exception_type: str = ""
    traceback: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


@dataclass
class NodeBlocked(Event):
    """A node call was skipped because an input carried an ExecutionBlocker with a message.

    Not fatal: the run goes on. It is not a terminal event.
    """

    node_id: str | None = None
    node_type: str | None = None
    message: str = ""
    executed: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


@dataclass
class ExecutionInterrupted(Event):
    """The run was cancelled; ``node_id`` is the node that was running, if any."""

    node_id: str | None = None
    node_type: str | None = None
    executed: list = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


TERMINAL = (ExecutionSuccess, ExecutionError, ExecutionInterrupted)
EventSink = Callable[[Event], None]
