"""``server``: ``PromptServer.instance`` for packs: routes they add, and messages they send to clients.

Routes go into :attr:`PromptServer.routes` (an aiohttp ``RouteTableDef``) that Kiln's server mounts when
it starts. :meth:`PromptServer.send_sync` forwards to the sender Kiln's server registers with
:func:`set_sender`; until then messages wait in a short queue (oldest dropped), handed over on registration.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ._runtime import runtime_getattr

__getattr__ = runtime_getattr("server")
log = logging.getLogger("kiln.compat.server")

Sender = Callable[[str, Any, "str | None"], None]
_QUEUE_MAX = 256
_lock = threading.Lock()
_sender: Sender | None = None
_pending: collections.deque = collections.deque(maxlen=_QUEUE_MAX)


class BinaryEventTypes(enum.IntEnum):
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


def set_sender(fn: Sender | None) -> None:
    """Register where ``send_sync`` messages go: ``fn(event, data, sid)`` (thread-safe, non-blocking).
    Messages sent before registration are delivered now, in order."""
    global _sender
    with _lock:
        _sender = fn
        queued = list(_pending) if fn is not None else []
        _pending.clear()
    for event, data, sid in queued:
        _deliver(fn, event, data, sid)  # type: ignore[arg-type]


def _deliver(fn: Sender, event: str, data: Any, sid: str | None) -> None:
    try:
        fn(event, data, sid)
    except Exception:
        log.exception("sending %r to clients failed", event)


class PromptServer:
    """The one instance packs reach as ``PromptServer.instance``."""

    instance: PromptServer

    def __init__(self) -> None:
        self.routes = web.RouteTableDef()
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.on_prompt_handlers: list[Callable[[dict], dict]] = []
        self.supports = ["custom_nodes_from_web"]
        self._app: web.Application | None = None

    @property
    def app(self) -> web.Application:
        """An application packs may add routes to directly; Kiln's server mounts its routes too."""
        if self._app is None:
            self._app = web.Application()
        return self._app

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        with _lock:
            fn = _sender
            if fn is None:
                dropped = len(_pending) == _QUEUE_MAX
                _pending.append((event, data, sid))
        if fn is None:
            log.debug("no server yet: queued %r%s", event, " (dropped the oldest)" if dropped else "")
            return
        _deliver(fn, event, data, sid)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        """Inside a running node: Kiln's progress text for that node (binary type 3 on the websocket).
        Elsewhere, a plain ``progress_text`` message."""
        from kiln.engine import context

        ctx = context.current()
        if ctx is not None:
            ctx.progress_text(text)
            return
        self.send_sync("progress_text", {"text": text, "node": node_id}, sid)

    def add_on_prompt_handler(self, handler: Callable[[dict], dict]) -> None:
        self.on_prompt_handlers.append(handler)


PromptServer.instance = PromptServer()


def routes() -> web.RouteTableDef:
    """The routes packs declared (``PromptServer.instance.routes``), for Kiln's server to mount."""
    return PromptServer.instance.routes


def pending() -> list[tuple[str, Any, str | None]]:
    """Messages waiting for a sender (for tests and diagnostics)."""
    with _lock:
        return list(_pending)
