"""``ProcessWorker``: the server's handle on one local worker process.

The server's event loop reads the worker's messages in order, as they arrive (``start`` runs on it):
engine events go to the caller's sink, journal records are stored (then acknowledged), packs' messages are
forwarded, and the end of a run resolves its future. When the connection closes without a ``done`` the
worker has died; the run's future fails with ``WorkerLost``, saying why (out of memory, a signal, an exit
status, or the reason the server itself stopped it).

A watchdog thread reads the worker's resident memory from ``/proc`` and stops a worker over its limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import pickle
import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from kiln.engine.errors import KilnError

from .spec import WorkerSpec, human

log = logging.getLogger("kiln.server")
WATCH_EVERY_S = 0.05
STOP_GRACE_S = 10.0
CONTROL = frozenset({"interrupt", "ack"})  # messages that go on a worker's control pipe (child.main)


class WorkerLost(KilnError):
    """The worker process ended while it ran a prompt (or before it was ready)."""

    def __init__(self, cause: str, limit: bool = False, node: str | None = None):
        super().__init__(cause)
        self.cause = cause
        self.limit = limit  # the server ended it for a limit it breached (memory): not worth a re-run
        self.node = node  # the node the worker said it was running when it died (display id), if known


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"killed by {name} (the system may have run out of memory)"
        if -code in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL):
            return f"crashed with {name} in native code"
        return f"killed by {name}"
    return f"exited with status {code}"


class _FrameReader:
    """Splits what a worker writes on its ``multiprocessing`` connection into messages without ever blocking:
    each call reads once (the fd is readable, so that returns at once) and returns the complete frames so far.
    The frames are those of ``Connection.send``: a 4-byte big-endian length (or -1, then an 8-byte one) and a
    pickle."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def read(self) -> list[bytes]:
        data = os.read(self.fd, 1 << 20)
        if not data:
            raise EOFError
        self.buf += data
        frames = []
        pos, end = 0, len(self.buf)
        view = memoryview(self.buf)
        try:
            while end - pos >= 4:
                (n,) = struct.unpack_from("!i", view, pos)
                start = pos + 4
                if n == -1:
                    if end - pos < 12:
                        break
                    (n,) = struct.unpack_from("!Q", view, pos + 4)
                    start = pos + 12
                if end < start + n:
                    break
                frames.append(bytes(view[start : start + n]))
                pos = start + n
        finally:
            view.release()
        del self.buf[:pos]  # once per read: what is left is the start of a frame still arriving
        return frames


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class WorkerHandle:
    """What the server keeps about any worker, whatever runs it (``ProcessWorker``, ``RayWorker``): its state
    (starting, idle, busy, dead, stopped), process, current prompt, the model files its runs loaded (which
    dispatch prefers it for) and its model counters, kept across replacements.

    ``shares_folders``: the worker runs this server's code on this server's machine and folders, so the
    server's validation holds for it and it need not validate again (a Ray actor, possibly elsewhere, does)."""

    shares_folders = False

    def __init__(self, name: str, spec: WorkerSpec):
        self.name = name
        self.spec = spec
        self.state = "stopped"
        self.pid: int | None = None
        self.prompt_id: str | None = None  # the prompt it runs now
        self.held: set[str] = set()  # model files its runs loaded (it keeps them until freed)
        self.last_used = 0.0
        self.runs = 0
        self.stats: dict = {}  # model_loads, model_evictions (this process's, reported after each run)
        self.loads_before = 0  # model loads of its earlier processes (a replaced worker keeps its count)
        self.evictions_before = 0
        self.kill_cause: str | None = None
        self.last_beat = time.monotonic()  # when it last showed it is alive (a heartbeat or any message)

    def _fresh(self) -> None:
        """A new process or actor takes over: its counters start from zero, the old ones are kept."""
        self.kill_cause = None
        self.loads_before += int(self.stats.get("model_loads", 0))
        self.evictions_before += int(self.stats.get("model_evictions", 0))
        self.stats = {}
        self.held = set()

    def _ran(self) -> None:
        """A run on it ended, however."""
        self.prompt_id = None
        self.runs += 1
        self.last_used = time.monotonic()
        if self.state == "busy":
            self.state = "idle"

    def info(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "prompt_id": self.prompt_id,
            "runs": self.runs,
            "models": sorted(self.held),
            "model_loads": self.loads_before + int(self.stats.get("model_loads", 0)),
            "model_evictions": self.evictions_before + int(self.stats.get("model_evictions", 0)),
            # while busy: seconds since its last heartbeat (or other message); past --worker-lease it is ended
            "silent_s": round(time.monotonic() - self.last_beat, 2) if self.state == "busy" else None,
        }


class ProcessWorker(WorkerHandle):
    """One worker process (a child of the server, on its machine: ``shares_folders``).

    ``on_journal(prompt_id, node_id, index, path, tmp)`` stores an output record (from the reader thread,
    blocking until committed); ``on_send_sync(event, data, sid)`` forwards a pack's websocket message.
    """

    shares_folders = True

    def __init__(
        self,
        name: str,
        spec: WorkerSpec,
        on_journal: Callable[..., None] | None = None,
        on_send_sync: Callable[..., None] | None = None,
    ):
        super().__init__(name, spec)
        self.on_journal = on_journal
        self.on_send_sync = on_send_sync
        self.kill_limit = False
        self._proc: Any = None
        self._conn: Any = None
        self._control: Any = None  # the worker's control pipe: interrupts, acknowledgements
        self._send_lock = threading.Lock()
        self._ready: cf.Future = cf.Future()
        self._done: cf.Future | None = None
        self._sink: Callable[[Any], None] | None = None
        self._running: Any = None  # shared memory: the node the worker process is running now

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        from .child import main

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        # interrupts and journal acknowledgements go on a pipe of their own, which a thread of the worker
        # reads while it runs; its main thread reads prompts straight off the first (no hand-off between
        # threads before a run starts)
        control_in, control_out = ctx.Pipe(duplex=False)
        self._fresh()
        self.kill_limit = False
        self._ready = cf.Future()
        self._running = ctx.RawArray("c", 256)  # the node the worker runs, written by it (child.main)
        self._proc = ctx.Process(
            target=main,
            args=(child, self.spec, self.name, self._running, control_in),
            name=f"kiln-worker-{self.name}",
        )
        self._proc.daemon = True
        self._proc.start()
        child.close()
        control_in.close()
        self._conn = parent
        self._control = control_out
        self.pid = self._proc.pid
        self.state = "starting"
        loop = asyncio.get_running_loop()  # the loop reads the connection itself, as messages arrive
        reader = _FrameReader(parent.fileno())
        loop.add_reader(reader.fd, self._on_readable, reader, parent, self._proc, loop)
        if self.spec.memory_limit:
            threading.Thread(
                target=self._watch, args=(self._proc,), name=f"kiln-worker-{self.name}-watch", daemon=True
            ).start()

    async def ready(self) -> None:
        await asyncio.wrap_future(self._ready)
        if self.state == "starting":
            self.state = "idle"

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Ask the worker to exit; kill it if it has not within ``grace`` seconds. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        self.kill_cause = self.kill_cause or "the server stopped it"
        try:
            self.send(("stop",))
        except (OSError, ValueError):
            pass
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join(grace)
        self.state = "stopped"

    def kill(self, cause: str, proc: Any = None, limit: bool = False) -> None:
        """End the worker now (a non-cooperative node, a limit breached); its run fails with ``cause``.
        ``proc``: only if that process is still this worker's (a watchdog of an earlier process passes it)."""
        target = self._proc if proc is None else proc
        if target is not None and target is self._proc and target.is_alive():
            self.kill_cause = cause
            self.kill_limit = limit
            target.kill()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # -- runs -------------------------------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        with self._send_lock:
            if self._conn is None:
                raise OSError("the worker is not running")
            (self._control if msg[0] in CONTROL else self._conn).send(msg)

    async def run(self, job: dict, sink: Callable[[Any], None]) -> tuple[str, dict, dict]:
        """Run ``job`` (see ``kiln.workers.child``); events go to ``sink`` from the reader thread. Returns
        ``(status, outputs, meta)``; raises ``WorkerLost`` if the worker dies meanwhile."""
        self._sink = sink
        self._done = done = cf.Future()
        self.last_beat = time.monotonic()
        self.state = "busy"
        self.prompt_id = job["prompt_id"]
        try:
            try:
                self.send(("run", job))
            except (OSError, ValueError) as exc:
                raise WorkerLost(f"could not be reached ({exc})") from exc
            return await asyncio.wrap_future(done)
        finally:
            self._ran()

    def interrupt(self, prompt_id: str) -> None:
        try:
            self.send(("interrupt", prompt_id))
        except (OSError, ValueError):
            pass

    def free(self, unload_models: bool, free_memory: bool) -> None:
        try:
            self.send(("free", unload_models, free_memory))
        except (OSError, ValueError):
            return
        if unload_models or free_memory:
            self.held.clear()

    # -- threads ----------------------------------------------------------------------------------
    def _on_readable(self, reader: _FrameReader, conn, proc, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop's reader: whatever the worker has written so far, handled in order, on the loop."""
        try:
            frames = reader.read()
        except (EOFError, OSError):
            loop.remove_reader(reader.fd)
            threading.Thread(target=self._closed, args=(conn, proc), daemon=True).start()  # joins: off the loop
            return
        for frame in frames:
            try:
                msg = pickle.loads(frame)
            except Exception:  # a message that does not unpickle here: skip it, keep the stream
                log.exception("worker %s sent a message the server cannot read", self.name)
                continue
            self._handle(msg)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "batch":  # what the worker queued while its last message went out, in order
            for m in msg[1]:
                self._handle(m)
            return
        self.last_beat = time.monotonic()  # any message shows the worker alive; "beat" says nothing more
        try:
            if kind == "event":
                if self._sink is not None:
                    self._sink(msg[1])
            elif kind == "done":
                if self._done is not None and not self._done.done():
                    self._done.set_result(msg[2:])
            elif kind == "stats":
                self.stats = dict(msg[1])
            elif kind == "journal":
                self._journal(msg)
            elif kind == "send_sync":
                if self.on_send_sync is not None:
                    self.on_send_sync(*msg[1:])
            elif kind == "ready":
                if not self._ready.done():
                    self._ready.set_result(msg[1])
            elif kind == "failed":
                if not self._ready.done():
                    self._ready.set_exception(WorkerLost("could not start:\n" + str(msg[1])))
        except Exception:
            log.exception("worker %s: handling %r failed", self.name, kind)

    def _closed(self, conn, proc) -> None:
        """The connection closed: the process is ending. Say why to whoever waits on it."""
        proc.join(STOP_GRACE_S)
        cause = self.kill_cause or _describe_exit(proc.exitcode)
        with self._send_lock:
            control = None
            if self._conn is conn:
                self._conn, control, self._control = None, self._control, None
        for c in (conn, control):
            try:
                if c is not None:
                    c.close()
            except OSError:
                pass
        if self.state != "stopped":
            self.state = "dead"
        running = self._running.value.decode("utf-8", "replace") if self._running is not None else ""
        lost = WorkerLost(cause, limit=self.kill_limit and self.kill_cause is not None, node=running or None)
        if not self._ready.done():
            self._ready.set_exception(lost)
        if self._done is not None and not self._done.done():
            self._done.set_exception(lost)

    def _journal(self, msg: tuple) -> None:
        _, req, prompt_id, node_id, index, path, tmp = msg
        error = None
        try:
            if self.on_journal is not None:
                self.on_journal(prompt_id, node_id, index, path, tmp)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        try:
            self.send(("ack", req, error))
        except (OSError, ValueError):
            pass

    def _watch(self, proc) -> None:
        limit = self.spec.memory_limit
        stop = threading.Event()
        while proc.is_alive() and not stop.wait(WATCH_EVERY_S):
            rss = _rss(proc.pid)
            if rss > limit:
                self.kill(f"out of memory: it used {human(rss)}, over its limit of {human(limit)}", proc, True)
                return
