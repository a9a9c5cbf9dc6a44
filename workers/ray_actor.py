"""Workers as Ray actors: ``kiln serve --ray ADDRESS|auto --ray-workers N``.

Each worker is an actor on a Ray cluster hosting the same worker logic as a local process
(``kiln.workers.child``): it builds its executor from the ``WorkerSpec`` once, and each run is a streaming
generator that yields the same messages a process sends over its connection (events in order, journal
records, packs' messages, stats, then ``done``). ``RayWorker`` is the server's handle, with the interface of
``ProcessWorker``, so dispatch, affinity, re-runs and interrupts are the same code for both.

Differences from local processes, by design of a cluster: a lost actor (its node died, its process was
killed, Ray's own memory monitor ended it) shows up as ``ActorDiedError`` and is a ``WorkerLost``; memory is
Ray's to police (no watchdog or address-space cap here); journal records are stored without the worker
waiting for the server's commit. The actors write outputs to the folders their spec names
(``--worker-base-dir`` where their machines' paths differ from the server's); actors that share no disk
with the server need ``--output-store``, through which their outputs come back and the prompts' input files
reach them (``kiln.workers.output_store``). Heartbeats travel in the run's stream like any other message.

A process that dies mid-node cannot be trusted to have streamed its last events (the stream is
asynchronous). So, like a local worker's shared memory, an actor keeps the node it is running in a small
file mapping on its own machine (:class:`NodeSlot`); the page survives the process, and after a death the
server reads it with a one-off task pinned to that machine, to name the node in the failure.

Ray is optional (``pip install -e ".[ray]"``); nothing imports this module unless ``--ray`` is given.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .local import WorkerHandle, WorkerLost
from .spec import WorkerSpec

log = logging.getLogger("kiln.server")


SLOT_BYTES = 256
SLOT_READ_TIMEOUT_S = 30.0  # how long the server waits to learn a dead actor's node (it starts a Ray task)


class NodeSlot:
    """A few bytes in a file mapping: what a process writes there stays in the page cache when it dies, for
    another process on the same machine to read. ``value`` is what ``_Worker`` writes the running node to
    (the interface of a ``multiprocessing`` shared array)."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, SLOT_BYTES)
            self._map = mmap.mmap(fd, SLOT_BYTES)
        finally:
            os.close(fd)

    @property
    def value(self) -> bytes:
        return self._map[:].split(b"\0", 1)[0]

    @value.setter
    def value(self, data: bytes) -> None:
        data = data[: SLOT_BYTES - 1]
        self._map[: len(data) + 1] = data + b"\0"


def read_slot(path: str) -> str:
    """What a dead actor's slot holds (and the file goes); a Ray task on the actor's machine runs this."""
    try:
        with open(path, "rb") as f:
            data = f.read(SLOT_BYTES).split(b"\0", 1)[0]
        os.unlink(path)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def _slot_path(name: str) -> str:
    """A file for this actor's slot in the Ray session's folder on this machine (gone with the session)."""
    import ray

    ctx = ray.get_runtime_context()
    folder = os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "kiln-running")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        folder = tempfile.gettempdir()
    return os.path.join(folder, f"{name}-{os.getpid()}")


class KilnActor:
    """The actor's body (made a Ray actor class by ``_actor_class``)."""

    def __init__(self, spec: WorkerSpec, name: str):
        from .child import _Worker

        os.environ.update(spec.env)
        if spec.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, str(spec.threads))
        logging.basicConfig(level=os.environ.get("KILN_LOG_LEVEL", "INFO"))
        self.name = name
        self.slot = NodeSlot(_slot_path(name))
        self.worker = _Worker(spec, self._put, acks=False, running=self.slot)
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self.worker.build()

    def _put(self, msg: tuple) -> None:
        q = self._queue
        if q is not None:
            q.put(msg)

    def ready(self) -> tuple[int, str, str]:
        """(pid, the Ray node it runs on, its slot's path there)."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id(), self.slot.path

    def run(self, job: dict):
        """Run one prompt; yields the worker's messages, ``("done", ...)`` last."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._queue = q
        t = threading.Thread(target=self.worker.run, args=(job,), name="kiln-actor-run", daemon=True)
        t.start()
        try:
            while True:
                msg = q.get()
                yield msg
                if msg[0] == "done":
                    return
        finally:
            t.join()
            with self._lock:  # the server may already have sent the next run, which has its own queue
                if self._queue is q:
                    self._queue = None

    def interrupt(self, prompt_id: str) -> None:
        self.worker.interrupt(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.worker.free(unload_models, free_memory)


_ACTOR: Any = None
_READ_SLOT: Any = None
_private_tmp: str | None = None  # the temp folder of a local Ray instance this process started


def _actor_class() -> Any:
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(max_concurrency=4)(KilnActor)  # a run, and interrupts/frees beside it
    return _ACTOR


def _read_slot_task() -> Any:
    global _READ_SLOT
    if _READ_SLOT is None:
        import ray

        _READ_SLOT = ray.remote(num_cpus=0, max_retries=0)(read_slot)
    return _READ_SLOT


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one running on this machine, else a new local
    instance in a private temp folder). Returns True if this call started Ray (so ``shutdown`` stops it)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address != "auto":
        ray.init(address=address, **quiet)
        return True
    try:
        ray.init(address="auto", **quiet)
    except ConnectionError:  # no cluster on this machine: start a private one
        # in /tmp whatever TMPDIR says: Ray's socket paths under it must stay under 107 bytes
        global _private_tmp
        tmp = tempfile.mkdtemp(prefix="kray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        _private_tmp = tmp
        log.info("started a local Ray instance in %s", tmp)
        ray.init(include_dashboard=False, _temp_dir=tmp, **quiet)
    return True


def shutdown() -> None:
    """Leave the cluster; a local instance this process started stops, and its temp folder goes."""
    global _private_tmp
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _private_tmp is not None:
        shutil.rmtree(_private_tmp, ignore_errors=True)
        _private_tmp = None


class RayWorker(WorkerHandle):
    """The server's handle on one actor (the ``ProcessWorker`` interface)."""

    def __init__(
        self,
        name: str,
        spec: WorkerSpec,
        options: dict | None = None,
        on_journal: Callable[..., None] | None = None,
        on_send_sync: Callable[..., None] | None = None,
    ):
        super().__init__(name, replace(spec, memory_limit=0))  # Ray polices memory on its nodes
        self.options = dict(options or {})
        self.on_journal = on_journal
        self.on_send_sync = on_send_sync
        self._actor: Any = None
        self._ready_ref: Any = None
        self.node_id: str | None = None  # the Ray node the actor runs on, and its slot's path there
        self.slot_path: str | None = None

    def start(self) -> None:
        self._fresh()
        self._actor = _actor_class().options(**self.options).remote(self.spec, self.name)
        self._ready_ref = self._actor.ready.remote()
        self.state = "starting"

    async def ready(self) -> None:
        import ray

        try:
            self.pid, self.node_id, self.slot_path = await self._ready_ref
        except ray.exceptions.RayError as exc:
            self.state = "dead"
            raise WorkerLost(f"the Ray actor could not start: {exc}") from exc
        self.state = "idle"

    @property
    def alive(self) -> bool:
        return self.state in ("idle", "busy", "starting")

    async def run(self, job: dict, sink: Callable[[Any], None]) -> tuple[str, dict, dict]:
        import ray

        self.state = "busy"
        self.prompt_id = job["prompt_id"]
        self.last_beat = time.monotonic()
        try:
            gen = self._actor.run.options(num_returns="streaming").remote(job)
            async for ref in gen:
                msg = await ref
                kind = msg[0]
                self.last_beat = time.monotonic()  # heartbeats ("beat") and every other message
                if kind == "event":
                    sink(msg[1])
                elif kind == "done":
                    return msg[2], msg[3], msg[4]
                elif kind == "journal" and self.on_journal is not None:
                    await asyncio.to_thread(self.on_journal, *msg[2:])
                elif kind == "send_sync" and self.on_send_sync is not None:
                    self.on_send_sync(*msg[1:])
                elif kind == "stats":
                    self.stats = dict(msg[1])
            raise WorkerLost("the actor's run ended without a result")
        except ray.exceptions.RayError as exc:
            self.state = "dead"
            node = await self._last_node()
            raise WorkerLost(self.kill_cause or _lost_cause(exc, self.pid), node=node) from exc
        finally:
            self._ran()

    async def _last_node(self) -> str | None:
        """The node a dead actor was running, from its slot, read by a task on its machine; None when that
        machine is gone too (then the last event that arrived names it)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self.node_id or not self.slot_path:
            return None
        where = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
        try:
            ref = _read_slot_task().options(scheduling_strategy=where).remote(self.slot_path)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), SLOT_READ_TIMEOUT_S) or None
        except (ray.exceptions.RayError, asyncio.TimeoutError, OSError) as exc:
            log.info("worker %s: the node its dead actor ran is unknown (%s)", self.name, exc)
            return None

    def interrupt(self, prompt_id: str) -> None:
        if self._actor is not None:
            self._actor.interrupt.remote(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if self._actor is not None:
            self._actor.free.remote(unload_models, free_memory)
            if unload_models or free_memory:
                self.held.clear()

    def kill(self, cause: str, proc: Any = None, limit: bool = False) -> None:
        import ray

        if self._actor is not None:
            self.kill_cause = cause
            ray.kill(self._actor, no_restart=True)

    def stop(self, grace: float = 0.0) -> None:
        import ray

        if self._actor is not None:
            self.kill_cause = self.kill_cause or "the server stopped it"
            try:
                ray.kill(self._actor, no_restart=True)
            except Exception:  # the cluster is already gone
                pass
            self._actor = None
        self.state = "stopped"

    def info(self) -> dict:
        return {**super().info(), "ray": True}


def _lost_cause(exc: BaseException, pid: int | None) -> str:
    """One line for a lost actor (Ray's own message is a paragraph of troubleshooting)."""
    text = str(exc)
    if "worker process has died" in text or "unexpectedly" in text:
        return f"its Ray actor's process (pid {pid}) died: killed, out of memory or crashed"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"its Ray actor was lost ({type(exc).__name__}: {first[:200]})"
