"""The worker process: builds its executor once, then runs the prompts the server sends, one at a time.

Messages (pickled tuples over a ``multiprocessing`` connection; ``interrupt`` and ``ack`` come on a second,
control connection, read by a thread of their own, so the main thread reads prompts directly):

server -> worker                                  worker -> server
``("run", job)``       a prompt (dict, below)     ``("ready", pid)``            executor built
``("interrupt", pid)`` cancel that prompt         ``("failed", text)``          could not build it
``("free", unload, free_memory)`` between runs    ``("event", event)``          an engine event, in order
                                                  ``("stats", counters)``        model loads, evictions
``("ack", req, error)`` a journal record stored   ``("done", pid, status, outputs, meta)``
``("stop",)``          finish and exit            ``("journal", req, pid, node, index, path, tmp)``
                                                  ``("send_sync", event, data, sid)`` a pack's message
                                                  ``("beat", pid)``             alive, running pid
                                                  ``("batch", [message, ...])`` several, in order

``job``: ``prompt_id``, ``prompt_text`` (API-format JSON text, already validated by the server), ``extra_data``,
``targets`` (the output nodes to run), ``previews``, ``journal`` (what earlier attempts wrote, for
crash-safe output names), and ``validated`` (the outputs to produce, the nodes to run sources first) when the
server's validation holds here: a worker on the server's machine runs the prompt as validated; one elsewhere
(no ``validated``) checks it again against its own registry and folders before running.

A worker whose server goes away (the connection closes, or the parent dies) exits at once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import json
import logging
import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
from typing import Any

from .journal import JournalBook
from .output_store import OutputStore, StoreConfig
from .spec import WorkerSpec

log = logging.getLogger("kiln.worker")
ACK_TIMEOUT = 60.0
SEND_WINDOW_S = 0.002  # how long queued events may wait for company before they are sent


def main(conn, spec: WorkerSpec, name: str, running: Any, control: Any) -> None:
    """Entry point of a worker process (``multiprocessing`` spawn target). ``control``: a second,
    receive-only connection for interrupts and acknowledgements, which a thread reads while the main thread
    takes prompts straight off ``conn``."""
    _die_with_parent()
    os.environ.update(spec.env)
    if spec.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(spec.threads))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the server's to handle
    logging.basicConfig(
        level=os.environ.get("KILN_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s worker-{name} %(name)s: %(message)s",
    )
    w = _Worker(spec, conn.send, batch=True, running=running)
    w.conn = conn
    w.control = control
    w.serve()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the server dies, however it dies (SIGKILL included)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(0)


class _Journal(JournalBook):
    """The server's output journal, as seen from a worker: earlier attempts' records arrive with the job; new
    records are stored by the server before the file is moved."""

    def __init__(self, worker: _Worker):
        super().__init__()
        self.worker = worker

    def record(self, prompt_id: str, node_id: str, index: int, path: str, tmp: str) -> None:
        self.worker.request(("journal", prompt_id, node_id, index, path, tmp))


class _Worker:
    """What a worker does, whatever hosts it: a process of its own (``serve``, over a connection) or a Ray
    actor (``kiln.workers.ray_actor``, whose runs stream these same messages). ``send`` puts one message on
    the wire; with ``acks`` False, journal records are sent without waiting for the server's commit."""

    def __init__(self, spec: WorkerSpec, send, acks: bool = True, batch: bool = False, running: Any = None):
        self.conn: Any = None
        self.control: Any = None  # where interrupts and acknowledgements arrive (set by main; read by serve)
        self._send = send
        self.acks = acks
        self.spec = spec
        self.send_lock = threading.Lock()
        # batch: messages are queued and a sender thread sends whatever has queued up as one ("batch", [...])
        # message, so a 500-node prompt's events cost a few pickles and writes, not one each. What must not
        # wait (a run's end, a journal record, ready/failed) goes at once, after everything queued before it.
        # ``running``: shared memory the server reads when this process dies, holding the node that was
        # running (its NodeStarted may still have been queued)
        self.batch = batch
        self.running = running
        self._cv = threading.Condition(self.send_lock)
        self._pending: list = []
        self._sender: threading.Thread | None = None
        self._started: Any = None  # the NodeStarted class, once the engine is imported (build)
        self.current: tuple[str, threading.Event] | None = None
        self.interrupted: set[str] = set()
        self.state_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._acks: dict[int, list] = {}
        self.journal = _Journal(self)

    # -- the wire ---------------------------------------------------------------------------------
    def send(self, msg: tuple, now: bool = False) -> None:
        if not self.batch:
            with self.send_lock:
                self._send(msg)
            return
        with self._cv:
            self._pending.append(msg)
            if now:
                self._write_pending()
                return
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_batches, name="kiln-worker-sender", daemon=True)
                self._sender.start()
            if len(self._pending) == 1:  # the sender sleeps only on an empty queue
                self._cv.notify()

    def flush(self) -> None:
        """Everything queued, on the wire now (before the process exits)."""
        if self.batch:
            with self._cv:
                self._write_pending()

    def _send_batches(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
            time.sleep(SEND_WINDOW_S)  # let a burst gather: one pickle and one write for all of it
            with self._cv:
                self._write_pending()

    def _write_pending(self) -> None:
        """Send what is queued as one message; the lock is held, so nothing overtakes it."""
        msgs, self._pending = self._pending, []
        if not msgs:
            return
        try:
            self._send(msgs[0] if len(msgs) == 1 else ("batch", msgs))
            return
        except (TypeError, AttributeError, ValueError, pickle.PicklingError):
            pass  # something in it does not pickle: one at a time below
        except OSError:  # the server is gone: the control thread ends the process
            return
        for m in msgs:
            try:
                self._send(m)
            except (TypeError, AttributeError, ValueError, pickle.PicklingError) as exc:
                if m[0] != "event":
                    log.error("a %r message could not be sent: %s", m[0], exc)
                    continue
                log.debug("event %s sent as plain data: %s", type(m[1]).__name__, exc)
                self._send(("event", _plain(m[1])))
            except OSError:
                return

    def request(self, msg: tuple) -> None:
        """Send ``msg`` with a request id and wait for the server's acknowledgement."""
        req = next(self._ids)
        if not self.acks:
            self.send((msg[0], req, *msg[1:]))
            return
        slot: list = [threading.Event(), None]
        self._acks[req] = slot
        try:
            self.send((msg[0], req, *msg[1:]), now=True)
            if not slot[0].wait(ACK_TIMEOUT):
                log.warning("the server did not acknowledge %s in %s s", msg[0], ACK_TIMEOUT)
            elif slot[1]:
                log.warning("the server could not store %s: %s", msg[0], slot[1])
        finally:
            self._acks.pop(req, None)

    def _read_control(self) -> None:
        """The control thread: interrupts and acknowledgements, acted on at once, during a run too."""
        while True:
            try:
                msg = self.control.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: nothing left to report to
            kind = msg[0]
            if kind == "interrupt":
                self.interrupt(msg[1])
            elif kind == "ack":
                slot = self._acks.get(msg[1])
                if slot is not None:
                    slot[1] = msg[2]
                    slot[0].set()

    def interrupt(self, prompt_id: str) -> None:
        with self.state_lock:
            self.interrupted.add(prompt_id)
            if self.current is not None and self.current[0] == prompt_id:
                self.current[1].set()

    def event(self, event: Any) -> None:
        if self.running is not None and self._started is not None and isinstance(event, self._started):
            self.running.value = str(event.display_node or event.node).encode("utf-8", "replace")[:255]
        self.send(("event", event))  # one that does not pickle goes as plain data (_write_pending)

    # -- running ----------------------------------------------------------------------------------
    def build(self) -> None:
        """Make the executor and install what the server provides through it (journal, packs' messages)."""
        from kiln.engine import events as ev

        self._started = ev.NodeStarted
        self.executor = self.spec.build()
        services = getattr(self.executor, "services", None)
        if isinstance(services, dict):
            services["output_files"] = self.journal
            store = services.get("output_store")
            if isinstance(store, StoreConfig):  # the spec carries its settings; the client is made here
                services["output_store"] = OutputStore(store)
        self._attach_pack_sender()
        threading.Thread(target=self._beat, name="kiln-worker-heartbeat", daemon=True).start()
        if self.spec.threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self.spec.threads)

    def serve(self) -> None:
        """A worker process's life: build, say ready, then run what arrives until told to stop."""
        threading.Thread(target=self._read_control, name="kiln-worker-control", daemon=True).start()
        try:
            self.build()
        except BaseException:
            self.send(("failed", traceback.format_exc()), now=True)
            sys.exit(1)
        self._limit_address_space()
        _freeze_heap()
        self.send(("ready", os.getpid()), now=True)
        while True:
            msg = self._next()
            if msg[0] == "run":
                self.run(msg[1])
            elif msg[0] == "free":
                self.free(msg[1], msg[2])
            elif msg[0] == "stop":
                self.flush()
                return

    def _next(self) -> tuple:
        """The next prompt (or free, stop), read by the main thread itself: the control thread has the rest."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone

    def _attach_pack_sender(self) -> None:
        compat = sys.modules.get("kiln.compat.server")
        if compat is not None:
            compat.set_sender(lambda event, data, sid=None: self.send(("send_sync", event, data, sid)))

    def _limit_address_space(self) -> None:
        """A backstop under the server's resident-memory watchdog: an allocation far past the limit fails in
        the node (a clean error) instead of taking the machine's memory. Not on CUDA, whose driver reserves
        huge address ranges."""
        limit = self.spec.memory_limit
        torch = sys.modules.get("torch")
        if not limit or (torch is not None and torch.cuda.is_available()):
            return
        try:
            with open("/proc/self/status") as f:
                size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            soft = size + 2 * limit
            resource.setrlimit(resource.RLIMIT_AS, (soft, resource.getrlimit(resource.RLIMIT_AS)[1]))
        except (OSError, ValueError, StopIteration):
            pass

    def run(self, job: dict) -> None:
        from kiln.engine import Graph, ValidationFailed, ValidationResult, events as ev
        from kiln.engine.context import RunOptions

        pid = job["prompt_id"]
        cancel = threading.Event()
        with self.state_lock:
            self.current = (pid, cancel)
            if pid in self.interrupted:
                cancel.set()
        self.journal.start(pid, job.get("journal") or {})
        if job.get("inputs"):
            self._fetch_inputs(job["inputs"])
        try:
            graph = Graph.from_json(json.loads(job["prompt_text"]))
            validation = None
            if job.get("validated") is not None:  # by the server, with this worker's registry and folders
                outputs, order = job["validated"]
                validation = ValidationResult(True, outputs=list(outputs), order=list(order))
            result = self.executor.run(
                graph,
                validation=validation,
                prompt_id=pid,
                extra_data=job.get("extra_data") or {},
                partial_execution_targets=job.get("targets"),
                sink=self.event,
                cancel=cancel,
                options=RunOptions(previews=bool(job.get("previews"))),
            )
            self.send(("stats", self.stats()))
            self.send(("done", pid, result.status, result.outputs, result.meta), now=True)
        except ValidationFailed as exc:
            why = "the prompt no longer validates in the worker: " + str(exc)
            self.event(ev.ExecutionError(pid, message=why, exception_type="ValidationFailed"))
            self.send(("done", pid, "error", {}, {}), now=True)
        except BaseException as exc:  # a bug outside any node: report it, keep the worker
            tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
            self.event(ev.ExecutionError(pid, message=str(exc), exception_type=type(exc).__name__, traceback=tb))
            self.send(("done", pid, "error", {}, {}), now=True)
        finally:
            if self.running is not None:
                self.running.value = b""
            self.journal.end(pid)
            with self.state_lock:
                self.current = None
                self.interrupted.discard(pid)

    def _fetch_inputs(self, names: dict[str, int]) -> None:
        """The input files the prompt reads, from the output store when this worker's input folder lacks them
        (a worker on another machine); before validation, which lists the input folder."""
        store = getattr(self.executor, "services", {}).get("output_store")
        folders = getattr(self.executor, "folders", None)
        if not isinstance(store, OutputStore) or folders is None:
            return
        try:
            got = store.fetch_inputs(names, folders.input_dir)
        except Exception as exc:  # the store is unreachable: the nodes that read these files will say which
            log.error("could not fetch the prompt's input files from the output store: %s", exc)
            return
        if got:
            log.info("fetched %d input file(s) from the output store: %s", len(got), ", ".join(got[:5]))

    def _beat(self) -> None:
        """Heartbeats while a prompt runs, from a thread of their own (started once, in ``build``), so a node
        busy in Python or in native code that releases the GIL still beats; a frozen or wedged process does
        not, and the server ends it."""
        every = max(0.05, float(self.spec.heartbeat_s))
        while True:
            time.sleep(every)
            current = self.current
            if current is None:
                continue
            try:
                self.send(("beat", current[0]))
            except Exception:  # the connection is gone: the process is about to end anyway
                return

    def stats(self) -> dict:
        """Counters the server's metrics add up over workers: model files read, models evicted."""
        manager = getattr(self.executor, "services", {}).get("model_manager")
        if manager is None:  # the process-wide manager nodes fall back to
            module = sys.modules.get("kiln.nodes.sd.manager")
            manager = getattr(module, "_default", None)
        return {
            "model_loads": getattr(manager, "loads", 0),
            "model_evictions": getattr(manager, "evictions", 0),
        }

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if free_memory:
            self.executor.cache.clear()
        if unload_models or free_memory:
            for svc in getattr(self.executor, "services", {}).values():
                fn = getattr(svc, "unload_all", None)
                if callable(fn):
                    try:
                        fn()
                    except Exception:
                        log.exception("unloading models failed")


def _freeze_heap() -> None:
    """Move everything alive after start-up (torch, the nodes, packs) out of the collector's sight, as the
    server does once it is built: a full collection then scans what prompts made, not that whole heap."""
    gc.collect()
    gc.freeze()


def _plain(event: Any) -> Any:
    """``event`` with every field reduced to JSON data (for an output a node filled with live objects)."""
    changes = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        try:
            changes[f.name] = json.loads(json.dumps(value, default=repr))
        except (TypeError, ValueError):
            changes[f.name] = repr(value)
    return dataclasses.replace(event, **changes)
