"""Event routing: executor events become ComfyUI messages for the right sockets, numbered and logged.

Per prompt with a client id, its sockets get every message; without one, only progress, previews and
interruptions are broadcast (ComfyUI's rules). ``progress_state`` goes, one node per message, only to sockets
that negotiated feature flags. Previews go out only when the prompt asked for them; output frames
(SaveImageWebsocket) always. Plain clients get a type-1 frame after the ``progress`` message, metadata
clients a type-4 frame before it, as ComfyUI orders them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

from kiln.engine import events as ev

from . import protocol
from .hub import NORMAL, PREVIEW, PROGRESS, Hub, Out
from .jobs import Job
from .store import Store, as_json

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("kiln.server")

PER_PROMPT_CID_ONLY = frozenset(
    {"execution_start", "execution_cached", "executing", "executed", "execution_success", "execution_error"}
)
HISTORY_MESSAGES = frozenset(
    {"execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted"}
)


class EventPipe:
    """Carries events from the executor's threads to the loop thread (events put on the loop thread itself,
    which a worker's messages are, go to the handler at once).

    The first event after a quiet spell is handed over at once (low latency); events that follow within
    ``window`` seconds of the last hand-over are gathered and handed over together when the window ends.
    A 500-node graph then costs a few loop wake-ups instead of hundreds of thread switches.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, handler, window: float = 0.004):
        self.loop = loop
        self.handler = handler
        self.window = window
        self.lock = threading.Lock()
        self.buf: list = []
        self.scheduled = False
        self.last = 0.0  # when the last batch was handed over (monotonic)
        self.loop_thread = threading.get_ident()  # made on the loop thread (PromptService.start)

    def put(self, job: Job, event: ev.Event) -> None:
        if threading.get_ident() == self.loop_thread:  # a worker's message, read on the loop: nothing to hand over
            with self.lock:
                if self.buf:  # events of another thread wait for their batch: keep the order
                    self.buf.append((job, event))
                    return
            self.handler(job, event)
            return
        final = isinstance(event, ev.TERMINAL)
        with self.lock:
            self.buf.append((job, event))
            if self.scheduled and not final:
                return
            self.scheduled = True
            # a prompt's last event never waits for the window: the client is waiting on it
            wait = 0.0 if final else self.last + self.window - time.monotonic()
        try:
            if wait <= 0:
                self.loop.call_soon_threadsafe(self.drain)
            else:
                self.loop.call_soon_threadsafe(self.loop.call_later, wait, self.drain)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def drain(self) -> None:
        with self.lock:
            items, self.buf = self.buf, []
            self.scheduled = False
            self.last = time.monotonic()
        for job, event in items:
            self.handler(job, event)


class EventRouter:
    def __init__(self, hub: Hub, store: Store):
        self.hub = hub
        self.store = store
        self.stopping = False
        self.watchers: dict[str, list[asyncio.Future]] = {}  # long-polls on /events, woken by any new event
        self.metrics: Metrics | None = None  # set by metrics.install: sees every dispatched event

    def dispatch(self, job: Job, event: ev.Event) -> None:
        if self.stopping:
            return
        if self.metrics is not None:
            try:
                self.metrics.observe(job, event)
            except Exception:  # metrics never break dispatch
                log.debug("metrics hook failed", exc_info=True)
        if isinstance(event, ev.ProgressText):  # binary type 3, shown while the node runs, never logged
            self._progress_text(job, event)
            return
        t, data = protocol.event_message(event)
        if isinstance(event, ev.ExecutionError) and event.traceback:  # clients get it without local paths
            log.warning(
                "prompt %s: node %s (%s) failed: %s\n%s",
                job.prompt_id,
                event.node_id,
                event.node_type,
                event.message,
                "".join(map(str, event.traceback)),
            )
        cid = job.client_id
        targets = self.hub.to_sid(cid) if cid is not None else None
        if isinstance(event, ev.NodeStarted):
            job.last_node = event.display_node
            self._progress_state(job, event, 0, 1, "running", targets)
        elif isinstance(event, ev.Progress) and event.preview is not None:
            self._preview(job, event, event.preview, targets, before=True)
        job.seq += 1
        data_json = as_json(data)
        self.store.log_event(job.prompt_id, job.seq, t, data_json)
        if isinstance(event, ev.Progress) and event.preview is not None and event.preview.kind == "output":
            self.store.log_frame(job.prompt_id, job.seq, event.display_node, event.preview.format, event.preview.data)
        blocked = isinstance(event, ev.NodeBlocked)  # non-fatal; ComfyUI keeps it out of history
        if t in HISTORY_MESSAGES and not blocked:
            job.messages.append([t, data])
            if isinstance(event, ev.TERMINAL):  # a non-fatal NodeBlocked shares execution_error's type
                job.terminal = True
        if self.watchers:
            self.wake(job.prompt_id)
        text = protocol.message_from_json(t, data_json, job.seq)
        if isinstance(event, ev.Progress):
            out = Out(text, PROGRESS, ("progress", job.prompt_id, event.node))
        elif isinstance(event, ev.NodeStarted):  # superseded by the next node's (never the final executing)
            out = Out(text, NORMAL, ("executing", job.prompt_id))
        else:
            out = Out(text, NORMAL)
        if targets is not None:
            for c in targets:
                c.send(out)
        elif t not in PER_PROMPT_CID_ONLY or blocked:  # no client id: progress, blocks, interruptions to all
            self.hub.broadcast(out)
        if isinstance(event, ev.Progress):
            self._progress_state(job, event, event.value, event.max, "running", targets, update=True)
            if event.preview is not None:
                self._preview(job, event, event.preview, targets, before=False)
        elif isinstance(event, ev.NodeOutput):
            self._progress_state(job, event, 1, 1, "finished", targets)
            if job.open_node is not None and job.open_node.node == event.node:
                job.open_node = None

    def _progress_text(self, job: Job, event: ev.ProgressText) -> None:
        """ComfyUI's progress-text frame (binary type 3) to the prompt's client, or to every socket when it has
        none; a slow client keeps only the newest text of each node."""
        out = Out(
            protocol.progress_text_frame(event.display_node or event.node, event.text),
            PROGRESS,
            ("progress_text", job.prompt_id, event.node),
        )
        targets = self.hub.to_sid(job.client_id) if job.client_id is not None else list(self.hub.clients())
        for c in targets:
            c.send(out)

    def wake(self, prompt_id: str) -> None:
        for fut in self.watchers.pop(prompt_id, ()):
            if not fut.done():
                fut.set_result(None)

    def replay(self, client, prompt_id: str, since: int) -> int:
        """Send a prompt's logged events after ``since`` to one socket, output frames in their places.
        Returns how many messages were queued."""
        frames = self.store.frames(prompt_id, since)
        n = 0
        for seq, t, d in self.store.events(prompt_id, since):
            frame = frames.get(seq)
            if frame is not None and client.metadata_previews:
                node, fmt, data = frame
                meta = {"prompt_id": prompt_id, **protocol.node_ids(ev.NodeEvent(prompt_id, node=node))}
                client.send(Out(protocol.preview_frame_with_metadata(fmt, data, meta)))
            client.send(Out(protocol.message_from_json(t, d, seq)))
            if frame is not None and not client.metadata_previews:
                client.send(Out(protocol.preview_frame(frame[1], frame[2])))
            n += 1
        return n

    def _preview(self, job: Job, event: ev.Progress, pv: ev.Preview, targets, before: bool) -> None:
        is_output = pv.kind == "output"
        if not is_output and not job.previews:
            return
        klass = NORMAL if is_output else PREVIEW
        key = None if is_output else ("preview", job.prompt_id)
        clients = targets if targets is not None else list(self.hub.clients())
        frame1 = frame4 = None
        for c in clients:
            if c.metadata_previews and before:
                if frame4 is None:
                    meta = {"prompt_id": job.prompt_id, **protocol.node_ids(event)}
                    frame4 = Out(protocol.preview_frame_with_metadata(pv.format, pv.data, meta), klass, key)
                c.send(frame4)
            elif not c.metadata_previews and not before:
                if frame1 is None:
                    frame1 = Out(protocol.preview_frame(pv.format, pv.data), klass, key)
                c.send(frame1)

    def _progress_state(
        self, job: Job, event: ev.NodeEvent, value: float, max_: float, state: str, targets, update: bool = False
    ) -> None:
        """ComfyUI's progress_state, as a per-node delta, for clients that negotiated feature flags.

        ComfyUI re-sends every node's state on each change (quadratic in the node count); Kiln sends only
        the node that changed. Plain clients (scripts) never read it and do not get it.
        """
        if state == "running" and not update:
            self.close_open_node(job, targets)
            job.open_node = event
        clients = targets if targets is not None else list(self.hub.clients())
        clients = [c for c in clients if c.negotiated]
        if not clients:
            return
        entry = {"value": value, "max": max_, "state": state, "prompt_id": job.prompt_id, **protocol.node_ids(event)}
        body = {"prompt_id": job.prompt_id, "nodes": {event.node: entry}}
        out = Out(
            protocol.message("progress_state", body), PROGRESS, ("progress_state", job.prompt_id, event.node), body
        )
        for c in clients:
            c.send(out)

    def close_open_node(self, job: Job, targets=None) -> None:
        event, job.open_node = job.open_node, None
        if event is not None:
            if targets is None and job.client_id is not None:
                targets = self.hub.to_sid(job.client_id)
            self._progress_state(job, event, 1, 1, "finished", targets)
