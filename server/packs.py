"""Custom node packs on the server: their HTTP routes, their websocket messages, their load reports.

Packs written for ComfyUI declare routes on ``PromptServer.instance.routes`` and push messages with
``PromptServer.instance.send_sync``. That surface lives in ``kiln.compat.server``, which the server never
imports: it is only present when custom nodes were loaded with it, so the server looks it up in
``sys.modules`` and, when there, mounts its routes and registers a thread-safe sender into the hub.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from aiohttp import web

from . import protocol
from .hub import Out
from .keys import SERVICE

log = logging.getLogger("kiln.server")
COMPAT_SERVER = "kiln.compat.server"


def mount_routes(app: web.Application) -> int:
    """Add the routes packs declared (before the app starts); how many were added."""
    compat = sys.modules.get(COMPAT_SERVER)
    if compat is None:
        return 0
    table = compat.routes()
    n = 0
    for route in table:
        try:
            app.router.add_route(route.method, route.path, route.handler, **getattr(route, "kwargs", {}))
            n += 1
        except (RuntimeError, ValueError) as exc:  # a pack route that clashes with Kiln's own
            log.warning("custom node route %s %s not mounted: %s", route.method, route.path, exc)
    return n


def deliver(hub, event: str, data: Any, sid: str | None) -> None:
    """Send a pack's message to one client's sockets (``sid``) or to all (on the loop thread)."""
    try:
        out = Out(protocol.message(str(event), data))
    except (TypeError, ValueError) as exc:
        log.warning("custom node message %r is not JSON: %s", event, exc)
        return
    if sid:
        for client in hub.to_sid(sid):
            client.send(out)
    else:
        hub.broadcast(out)


def attach_sender(app: web.Application) -> None:
    """Route packs' ``send_sync(event, data, sid)`` into the hub, from any thread. (Packs loaded in worker
    processes send theirs through the worker, which hands them to ``deliver``.)"""
    compat = sys.modules.get(COMPAT_SERVER)
    if compat is None:
        return
    loop = asyncio.get_running_loop()
    hub = app[SERVICE].hub

    def sender(event: str, data: Any, sid: str | None = None) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(deliver, hub, event, data, sid)

    compat.set_sender(sender)


def detach_sender() -> None:
    compat = sys.modules.get(COMPAT_SERVER)
    if compat is not None:
        compat.set_sender(None)


async def pack_reports(request: web.Request) -> web.Response:
    """What each custom node pack loaded, and why anything failed (with its traceback)."""
    registry = request.app[SERVICE].registry
    reports = [r.to_json() for r in getattr(registry, "pack_reports", [])]
    errors = [
        {"source": str(getattr(e, "source", "")), "error": str(getattr(e, "error", e))}
        for e in getattr(registry, "load_errors", [])
    ]
    return web.Response(text=protocol.dumps({"packs": reports, "load_errors": errors}), content_type="application/json")
