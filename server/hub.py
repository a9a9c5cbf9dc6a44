"""Connected websocket clients, each with its own bounded send queue and sender task.

A slow client never stalls the others or the executor: messages are queued per socket and written by
that socket's task. Previews past ``preview_backlog`` queued messages are dropped. A client that is behind
(more than ``max_queue`` messages or a sixteenth of ``max_queue_bytes`` queued) has its queue coalesced:
a message with a coalescing key (progress and progress_state of one node, the preview of a prompt,
``executing`` of a prompt's nodes other than the final ``executing null``) supersedes the queued one with
the same key, so a reading client that is merely slower than a 10,000-node run receives a shorter stream
and is never cut off. Terminal events, ``executed`` and every other message are never dropped.

Past ``max_queue_bytes`` (after coalescing), previews then progress messages are shed; a client still over
it is disconnected (close code 1013, "try again later") if it has taken no data for ``stall_timeout``
seconds (it stopped reading) or if its queue reaches four times the bound. It can reconnect with the same
clientId and replay what it missed.

On sockets without permessage-deflate, a burst of queued messages is written as raw websocket frames in
one transport write, so a 500-node graph costs a handful of syscalls rather than one per message.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, web

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("kiln.server")

# message classes, from most to least droppable
PREVIEW, PROGRESS, NORMAL = 0, 1, 2


@dataclass(slots=True, eq=False)
class Out:
    payload: str | bytes
    klass: int = NORMAL
    key: tuple | None = None  # messages with one key supersede each other when the client is behind
    data: Any = None  # the message's body as a dict, where a client may use it instead of parsing payload

    @property
    def size(self) -> int:
        return len(self.payload)


class Client:
    def __init__(self, ws: web.WebSocketResponse, sid: str, hub: Hub, transport: asyncio.Transport | None = None):
        self.ws = ws
        self.transport = transport
        self.sid = sid
        self.hub = hub
        self.features: dict = {}
        self.queue: deque[Out] = deque()
        self.bytes = 0  # bytes of the live (not superseded) queued messages
        self.dropped = 0
        self.coalesced = 0
        self.latest: dict[tuple, Out] = {}  # key -> newest queued message with it
        self.dead: set[int] = set()  # ids of queued messages superseded by a newer one (skipped)
        self.last_progress = time.monotonic()  # when the peer last took data (or had nothing pending)
        self.blocked = False  # the sender waits for the peer to take what was written
        self.last_status: int | None = None  # queue size last sent to this socket
        self.closed = False
        self._wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    @property
    def metadata_previews(self) -> bool:
        return bool(self.features.get("supports_preview_metadata"))

    @property
    def negotiated(self) -> bool:
        return bool(self.features)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._sender(), name=f"ws-send-{self.sid}")

    @property
    def behind(self) -> bool:
        cfg = self.hub.config
        return len(self.queue) - len(self.dead) > cfg.max_queue or self.bytes > cfg.max_queue_bytes // 16

    def send(self, out: Out) -> None:
        if self.closed:
            return
        cfg = self.hub.config
        if out.klass == PREVIEW and len(self.queue) - len(self.dead) >= cfg.preview_backlog:
            self.dropped += 1
            return
        if not self.queue and not self.blocked:
            self.last_progress = time.monotonic()  # nothing was pending: the clock of a stall starts now
        key = out.key
        if key is not None:
            old = self.latest.get(key)
            if old is not None and self.behind:
                self.dead.add(id(old))
                self.bytes -= old.size
                self.coalesced += 1
            self.latest[key] = out
        self.queue.append(out)
        self.bytes += out.size
        if len(self.dead) > 1024 and len(self.dead) * 2 > len(self.queue):
            self._compact(())
        if self.bytes > cfg.max_queue_bytes:
            self._shed()
        self._wake.set()

    def _compact(self, drop: tuple[int, ...]) -> None:
        """Rebuild the queue without superseded messages and without the classes in ``drop``."""
        dead = self.dead
        kept = deque(o for o in self.queue if id(o) not in dead and o.klass not in drop)
        self.dropped += len(self.queue) - len(dead) - len(kept)
        self.queue = kept
        self.dead = set()
        ids = {id(o) for o in kept}
        self.latest = {k: o for k, o in self.latest.items() if id(o) in ids}
        self.bytes = sum(o.size for o in kept)

    def _shed(self) -> None:
        cfg = self.hub.config
        for drop in ((PREVIEW,), (PREVIEW, PROGRESS)):
            self._compact(drop)
            if self.bytes <= cfg.max_queue_bytes:
                return
        stalled = time.monotonic() - self.last_progress > cfg.stall_timeout
        if not stalled and self.bytes <= 4 * cfg.max_queue_bytes:
            return  # slow but reading: it keeps its (bounded) backlog
        log.warning(
            "websocket client %s cannot keep up (%d messages, %d bytes queued%s); disconnecting",
            self.sid,
            len(self.queue),
            self.bytes,
            ", not reading" if stalled else "",
        )
        self.close(WSCloseCode.TRY_AGAIN_LATER, "send queue full; reconnect and replay")

    def _pop(self) -> Out | None:
        """The next live message (superseded ones are skipped), or None when the queue is empty."""
        while self.queue:
            out = self.queue.popleft()
            if self.dead and id(out) in self.dead:
                self.dead.discard(id(out))
                continue
            self.bytes -= out.size
            if out.key is not None and self.latest.get(out.key) is out:
                del self.latest[out.key]
            return out
        return None

    def close(self, code: int = WSCloseCode.GOING_AWAY, message: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.latest.clear()
        self.dead.clear()
        self.hub.remove(self)
        if self.task is not None:
            self.task.cancel()
        asyncio.get_running_loop().create_task(self._close(code, message))

    async def _close(self, code: int, message: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message.encode()), 2)
        except (Exception, asyncio.CancelledError):
            pass
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()  # a peer that stopped reading never completes the close handshake

    async def _sender(self) -> None:
        try:
            if self.transport is not None and not self.ws.compress:
                await self._send_batched(self.transport)
            else:
                await self._send_each()
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a broken transport ends this client only
            log.debug("websocket %s send failed: %s", self.sid, exc)

    async def _wait(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    async def _send_each(self) -> None:
        ws = self.ws
        while not self.closed:
            out = self._pop()
            if out is None:
                await self._wait()
                continue
            self.blocked = True
            if isinstance(out.payload, str):
                await ws.send_str(out.payload)
            else:
                await ws.send_bytes(out.payload)
            self.hub.bytes_sent += out.size
            self.blocked = False
            self.last_progress = time.monotonic()

    async def _send_batched(self, t: asyncio.Transport) -> None:
        """Write every queued message as websocket frames in one transport write (one syscall for a burst
        of events instead of one per message), then wait while the peer's buffer is full."""
        while not self.closed:
            parts: list[bytes] = []
            size = 0
            while size < BATCH_BYTES and (out := self._pop()) is not None:
                frame = _frame(out.payload)
                parts.append(frame)
                size += len(frame)
            if not parts:
                await self._wait()
                continue
            if self.ws.closed or t.is_closing():
                return
            t.write(b"".join(parts))
            self.hub.bytes_sent += size
            buffered = t.get_write_buffer_size()
            self.blocked = buffered > HIGH_WATER
            while buffered > HIGH_WATER:
                if self.closed or t.is_closing():
                    return
                await asyncio.sleep(0.005)
                now = t.get_write_buffer_size()
                if now < buffered:  # the peer took some: it is reading
                    self.last_progress = time.monotonic()
                buffered = now
            self.blocked = False
            self.last_progress = time.monotonic()
            await asyncio.sleep(0)


BATCH_BYTES = 1 << 20
HIGH_WATER = 1 << 20


def _frame(payload: str | bytes) -> bytes:
    """An unmasked, unfragmented server-to-client websocket frame (RFC 6455 section 5.2)."""
    if isinstance(payload, str):
        data, first = payload.encode("utf-8"), 0x81  # FIN + text
    else:
        data, first = payload, 0x82  # FIN + binary
    n = len(data)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + data


class Hub:
    """The registry of sockets by sid; one sid may have several sockets (a reconnect overlapping)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.by_sid: dict[str, list[Client]] = {}
        self.bytes_sent = 0  # written to sockets, all clients (GET /metrics)

    def add(self, client: Client) -> None:
        self.by_sid.setdefault(client.sid, []).append(client)
        client.start()

    def remove(self, client: Client) -> None:
        lst = self.by_sid.get(client.sid)
        if lst and client in lst:
            lst.remove(client)
            if not lst:
                del self.by_sid[client.sid]

    def clients(self) -> Iterable[Client]:
        for lst in list(self.by_sid.values()):
            yield from list(lst)

    def to_sid(self, sid: str) -> list[Client]:
        return list(self.by_sid.get(sid, ()))

    def broadcast(self, out: Out) -> None:
        for c in self.clients():
            c.send(out)

    def count(self) -> int:
        return sum(len(v) for v in self.by_sid.values())

    async def close_all(self) -> None:
        for c in list(self.clients()):
            c.close(WSCloseCode.GOING_AWAY, "server shutdown")
        await asyncio.sleep(0)
