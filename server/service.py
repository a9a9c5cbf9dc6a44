"""The prompt service: accepts prompts, keeps the durable queue, runs them one at a time, streams events.

Everything here runs on the event loop thread except ``Executor.run``, which runs in one worker thread.
The executor's events cross back through an ``EventPipe`` (one loop wake-up per burst) and are drained
before the prompt is finished, so every event of a prompt is dispatched before its history is written.
Queue, worker, recovery and control share the same state, which is why they are one module.

Per prompt, the submitting client (its ``client_id`` is a socket's sid) receives ComfyUI's sequence:
``execution_start``, ``execution_cached``, (``executing`` / ``progress`` / ``executed``)*, the terminal event,
then -- after the history entry is committed -- ``status`` and ``executing {node: null}``. Each of these
per-prompt events gets a sequence number and is logged, so a client can replay from any point and always
gets the final event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import heapq
import json
import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kiln.engine import (
    Graph,
    GraphFormatError,
    Issue,
    UnsafePath,
    ValidationResult,
    events as ev,
    parse_submission,
    use_folders,
    validate,
)
from kiln.engine.context import RunOptions
from kiln.workers import ProcessWorker, WorkerLost, WorkerSpec
from kiln.workers.output_store import scope_outputs

from . import metrics, params, protocol
from .event_router import EventPipe, EventRouter
from .hub import Client, Hub, Out
from .jobs import MAX_PROMPT_ID, SEQ_EPOCH, ApiError, Job, body_hash, check_strings, split_sensitive
from .journal import OutputJournal
from .store import FINISHED, MAX_NUMBER, DuplicatePrompt, PromptRow, Store, as_json, encode, json_number
from .webhook import post_webhook

if TYPE_CHECKING:
    import aiohttp

    from kiln.engine import Executor

    from .config import ServerConfig

__all__ = ["PromptService", "ApiError", "Job"]

INLINE_VALIDATION_NODES = 64  # graphs up to this size, with declared checks only, validate on the loop
LARGE_BODY = 256 * 1024  # a submission at least this big is decoded and prepared in a worker thread
LATE_TYPES = ("executed", "execution_success", "execution_error", "execution_interrupted", "executing")
log = logging.getLogger("kiln.server")

STATUS_INTERVAL = 0.05  # seconds between queue-size updates to sockets not involved in the change


class PromptService:
    def __init__(self, executor: Executor, store: Store, hub: Hub, config: ServerConfig):
        self.executor = executor
        self.registry = executor.registry
        self.store = store
        self.hub = hub
        self.config = config
        # pending prompts by client (FIFO by number within each); which client goes next is fair_share's call
        self._queues: dict[str, list[tuple[float, str]]] = {}
        self._tags: dict[str, float] = {}  # each client's start tag (fair queuing's virtual time)
        self._vtime = 0.0
        self.pending: dict[str, Job] = {}
        self.runs: dict[str, Job] = {}  # running prompts, in the order they started
        self.workers: list[Any] = []  # ProcessWorker or RayWorker (none: the server's own thread)
        self._ray_started = False
        self.output_store: Any = None  # kiln.workers.output_store.OutputStore with --output-store
        self._inline = _InlineSlot()
        self.counter = 0
        self._wake: asyncio.Event | None = None
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="kiln-executor")
        self._task: asyncio.Task | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._free = {"unload_models": False, "free_memory": False}
        self._session: aiohttp.ClientSession | None = None
        self._bg: set[asyncio.Task] = set()
        self.leases_expired = 0  # workers ended because their heartbeats stopped (for /metrics)
        self._lease_round = time.monotonic()  # when the last lease round ran
        self._stored_inputs: dict[str, tuple[int, int]] = {}  # input files put in the output store: (size, mtime)
        self._status_timer: asyncio.TimerHandle | None = None
        self.router = EventRouter(hub, store)
        self._finished = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.journal = OutputJournal(store)
        self.journal.install(executor)

    @property
    def running(self) -> Job | None:
        """The prompt that started first among those running (ComfyUI's clients know of one)."""
        return next(iter(self.runs.values()), None)

    @property
    def slots(self) -> list:
        """Where prompts run: the worker processes, or the server's own executor thread."""
        return self.workers or [self._inline]

    def workers_info(self) -> list[dict]:
        return [s.info() for s in self.slots]

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        """The loop ``start`` bound; everything that needs it runs after ``start``."""
        assert self.loop is not None, "PromptService.start() has not run"
        return self.loop

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._pipe = EventPipe(self.loop, self.router.dispatch)
        self._wake = asyncio.Event()
        self.journal.loop = self.loop
        for pid, why in self.store.quarantine_unreadable():
            log.error("prompt %r cannot be read (%s): moved to the quarantine table", pid, why)
        top = self.store.max_number()
        self.counter = int(top) + 1 if top >= 0 else 0
        for lease in self.store.clear_leases():  # a stopped server's: its prompts are recovered by status below
            log.info(
                "prompt %s held a lease on worker %s (attempt %s) when the server stopped",
                lease["prompt_id"],
                lease["worker"],
                lease["attempt"],
            )
        await self.recover()
        self._log_quarantined()
        spec = self._worker_spec()
        if self.config.ray:
            from kiln.workers import ray_actor

            self._ray_started = ray_actor.connect(self.config.ray)  # blocks: the server is not serving yet
            for i in range(self.config.ray_workers):
                rw = ray_actor.RayWorker(
                    f"ray-{i + 1}", spec, self.config.ray_options, self.journal.record, self._send_sync
                )
                self.workers.append(rw)
                self._start_worker(rw)
        elif self.config.workers:
            for i in range(self.config.workers):
                w = ProcessWorker(str(i + 1), spec, on_journal=self.journal.record, on_send_sync=self._send_sync)
                self.workers.append(w)
                self._start_worker(w)
        self._task = self.loop.create_task(self._dispatch(), name="kiln-prompt-dispatcher")
        if self.workers:
            self._background(self._keep_leases())

    @property
    def heartbeat_s(self) -> float:
        """How often workers beat: several times per lease, so one late beat never ends a worker."""
        return max(0.1, min(2.0, self.config.worker_lease / 5))

    async def _keep_leases(self) -> None:
        """Renew the leases of prompts whose workers beat recently; end a worker silent past its lease (its
        run then fails with ``WorkerLost`` and the prompt is re-run once, as for any lost worker)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                self._check_leases()
            except Exception:  # a store error this round: log it, keep watching
                log.exception("renewing the workers' leases failed")

    def _check_leases(self) -> None:
        """One round of ``_keep_leases``. After a round that came late (the loop itself was held up, so the
        workers' messages may be waiting unread), leases are renewed but no worker is ended."""
        ttl = self.config.worker_lease
        now = time.monotonic()
        late = now - self._lease_round > 2 * self.heartbeat_s
        self._lease_round = now
        alive = []
        for job in list(self.runs.values()):
            w = job.worker
            if w is None or getattr(w, "state", None) != "busy" or w.prompt_id != job.prompt_id:
                continue
            silent = now - w.last_beat
            if silent <= ttl or late:
                alive.append(job.prompt_id)
                continue
            why = f"it stopped answering: no heartbeat for {silent:.0f} s (lease {ttl:g} s, --worker-lease)"
            log.error("worker %s running prompt %s: %s; ending it", w.name, job.prompt_id, why)
            self.leases_expired += 1
            w.kill(why)
        if alive:
            self.store.renew_leases(alive, ttl)

    def _worker_spec(self) -> WorkerSpec:
        """The workers' spec, with the output store's settings when there is one (each worker makes its own
        client from them)."""
        spec = replace(self.config.worker_spec or WorkerSpec(), heartbeat_s=self.heartbeat_s)
        if not self.config.output_store or not (self.config.workers or self.config.ray):
            return spec
        from kiln.workers.output_store import SERVICE as STORE, OutputStore, StoreConfig

        store = StoreConfig(self.config.output_store, self.config.output_store_endpoint)
        self.output_store = OutputStore(store)
        return replace(spec, services={**spec.services, STORE: store})

    async def stop(self) -> None:
        # The running prompt is cancelled so its thread ends, but it stays 'running' in the store: after a
        # restart it is re-run (or failed) like after a crash. Its cancellation events are not recorded.
        self.router.stopping = True
        if self._status_timer is not None:
            self._status_timer.cancel()
        for job in self.runs.values():
            job.cancel.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for t in list(self._bg):
            t.cancel()
        if self._session is not None:
            await self._session.close()
        if self.workers:
            await asyncio.gather(*(asyncio.to_thread(w.stop, 2.0) for w in self.workers))
        if self._ray_started:
            from kiln.workers import ray_actor

            await asyncio.to_thread(ray_actor.shutdown)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.flush()

    def _log_quarantined(self) -> None:
        for pid, why in self.store.quarantined:
            log.error("prompt %r cannot be read (%s): moved to the quarantine table", pid, why)
        self.store.quarantined.clear()

    async def recover(self) -> None:
        """Requeue what was pending; re-run or fail what was running when the server died.

        A row that cannot be read is quarantined (and logged) rather than stopping the server.
        """
        for row in self.store.unfinished():
            try:
                await self._recover_row(row)
            except Exception as exc:  # a stored prompt the engine cannot even load
                log.exception("prompt %r could not be recovered", row.prompt_id)
                self.store.quarantine(row.prompt_id, f"recovery failed: {type(exc).__name__}: {str(exc)[:200]}")

    async def _recover_row(self, row: PromptRow) -> None:
        last = self.store.last_event_seq(row.prompt_id)
        if row.status == "running":
            if self.config.on_crash == "fail" or row.attempts >= self.config.max_attempts:
                why = (
                    "the server stopped while this prompt was running"
                    if self.config.on_crash == "fail"
                    else f"the server stopped while running this prompt {row.attempts} times"
                )
                self._fail_unrun(row, last, "ServerStopped", why)
                return
            self.store.requeue(row.prompt_id)
            log.info("re-running prompt %s, which was running when the server stopped", row.prompt_id)
        try:
            graph = Graph.from_json(row.prompt)
            validation = await self._validate(graph, row.outputs_to_execute)
        except GraphFormatError as exc:
            validation = ValidationResult(False, Issue.of("invalid_prompt", exc.message, exc.details))
        if not validation.ok:
            self._fail_unrun(row, last, "ValidationFailed", "the prompt no longer validates: " + validation.summary())
            return
        job = Job(
            row.prompt_id,
            row.number,
            graph,
            validation,
            row.prompt,
            row.extra_data,
            {},
            row.client_id,
            row.outputs_to_execute,
            seq=max(last, row.attempts * SEQ_EPOCH),
        )
        self._push(job)

    def _fail_unrun(self, row: PromptRow, last_seq: int, exc_type: str, why: str) -> None:
        last_seq = max(last_seq, row.attempts * SEQ_EPOCH)
        data = protocol.execution_error_data(ev.ExecutionError(row.prompt_id, message=why, exception_type=exc_type))
        seq = last_seq + 1
        self.store.log_event(row.prompt_id, seq, "execution_error", as_json(data))
        seq += 1
        self.store.log_event(row.prompt_id, seq, "executing", as_json({"node": None, "prompt_id": row.prompt_id}))
        history = {
            "prompt": row.queue_item,
            "outputs": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", data]]},
            "meta": {},
        }
        self.store.finish(row.prompt_id, "error", history, seq)
        log.warning("prompt %s marked failed: %s", row.prompt_id, why)

    # -- submitting ---------------------------------------------------------------------------------
    @property
    def queue_remaining(self) -> int:
        return len(self.pending) + len(self.runs)

    async def _validate(self, graph: Graph, targets: list[str] | None, heavy: bool = False) -> ValidationResult:
        """Validate without blocking the event loop on node code.

        A graph whose nodes all use declared checks only (no custom validator) and that is small is checked
        on the loop: that costs less than the hand-over to a thread. Anything else (a node's own, possibly
        slow or async, VALIDATE_INPUTS, or a large graph) is checked in a worker thread. ``graph`` must be a
        fresh graph built from the submitted JSON and owned by the caller: validation coerces its inputs in
        place, and nothing else may see it until this returns.
        """

        def check() -> ValidationResult:
            with use_folders(self.executor.folders):  # model choices come from this server's folders
                return validate(
                    graph, self.registry, partial_execution_targets=targets, memory_limit=self.config.max_prompt_memory
                )

        if not heavy and len(graph.nodes) <= INLINE_VALIDATION_NODES and not self._runs_node_code(graph):
            return check()
        if heavy or len(graph.nodes) > INLINE_VALIDATION_NODES:
            return await params.off_loop(check)
        return await asyncio.to_thread(check)

    def _runs_node_code(self, graph: Graph) -> bool:
        """True if validating ``graph`` would call a node's own validator or read a choice list from disk."""
        for node in graph.nodes.values():
            spec = self.registry.get(node.class_type) if isinstance(node.class_type, str) else None
            if spec is None:
                continue
            if (
                spec.validate is not None
                or spec.preflight is not None  # asks the outside world (a bucket, a key store)
                or any(callable(i.choices) for i in spec.inputs.values())
            ):
                return True
        return False

    def _known_submission(self, prompt_id: str, digest: str) -> dict | None:
        """The 200 body for a re-post of a stored prompt_id with the same body; 409 for another body."""
        known = self.store.status_of(prompt_id)
        if known is None:
            return None
        _status, old_digest, number = known
        if old_digest != digest:
            raise ApiError(
                409,
                "prompt_id_conflict",
                "This prompt_id was already used for another prompt",
                f"prompt_id {prompt_id!r} is taken; omit prompt_id or choose a new one",
            )
        return {"prompt_id": prompt_id, "number": json_number(number), "node_errors": {}}

    def _prepare(self, data: Any) -> tuple[Graph, Any, str, str, int | float | None]:
        """Check and parse a submission: (graph, submission, prompt_id, digest, number). Pure CPU work on
        data nobody else holds, so a large one runs in a worker thread. Raises ApiError."""
        if isinstance(data, dict) and "prompt" not in data and isinstance(data.get("workflow"), dict):
            # an editor (UI-format) workflow sent as {"workflow": {...}}: the same as sending it as the prompt
            data = {"prompt": data["workflow"], **{k: v for k, v in data.items() if k != "workflow"}}
        if not isinstance(data, dict) or "prompt" not in data:
            raise ApiError(400, "no_prompt", "No prompt provided", "No prompt provided")
        check_strings(data, self.config.max_string_bytes)
        try:
            # a UI-format workflow is converted to an API graph with this server's node declarations; what
            # is stored (and re-read by crash recovery, without a registry) is always the API graph
            graph, sub = parse_submission(data, self.registry)
        except GraphFormatError as exc:
            raise ApiError(400, "", "", body={"error": protocol.format_error_data(exc), "node_errors": {}}) from exc
        prompt_id = sub.prompt_id if sub.prompt_id is not None else str(uuid.uuid4())
        if not prompt_id or len(prompt_id) > MAX_PROMPT_ID or not prompt_id.isprintable():
            raise ApiError(
                400, "invalid_prompt", "Invalid prompt_id", f"a prompt_id is 1 to {MAX_PROMPT_ID} printable characters"
            )
        try:
            params.check_text(prompt_id, "prompt_id")
            if sub.client_id is not None:
                params.check_text(sub.client_id, "client_id")
        except params.BadParam as exc:
            raise ApiError(400, "invalid_prompt", exc.message, exc.details) from None
        number = sub.number
        if number is not None and not (isinstance(number, (int, float)) and abs(number) <= MAX_NUMBER):
            raise ApiError(
                400, "invalid_prompt", "Invalid number", "a queue number is a finite number of magnitude <= 2**53"
            )
        hook = sub.extra_data.get("webhook")
        if hook is not None and not (isinstance(hook, str) and hook.startswith(("http://", "https://"))):
            raise ApiError(400, "invalid_webhook", "extra_data.webhook must be an http(s) URL", repr(hook)[:200])
        # the hash tells a retried submission from a different one under the same client-chosen prompt_id; a
        # server-made id cannot be retried, so its row keeps no hash (a later claim of that id is a conflict)
        digest = body_hash(data) if sub.prompt_id is not None else ""
        return graph, sub, prompt_id, digest, number

    async def submit(
        self,
        data: Any,
        client_id: str | None = None,
        announce: bool = True,
        heavy: bool = False,
        warnings: bool = False,
    ) -> dict:
        """Validate and enqueue one submission (ComfyUI's envelope). Returns the 200 body or raises ApiError.
        ``warnings``: the client asked for what validation flagged but accepted (a ``warnings`` field).

        ``heavy`` (a large body): parsing, hashing and encoding run in a worker thread, so the loop keeps
        answering other clients meanwhile.
        """
        if heavy:
            graph, sub, prompt_id, digest, number = await params.off_loop(self._prepare, data)
        else:
            graph, sub, prompt_id, digest, number = self._prepare(data)
        if sub.prompt_id is not None:
            known = self._known_submission(prompt_id, digest)
            if known is not None:
                return known
        validation = await self._validate(graph, sub.partial_execution_targets, heavy)
        if not validation.ok:
            self._log_validation(prompt_id, validation)
            raise ApiError(400, "", "", body=protocol.validation_body(validation))
        if sub.prompt_id is not None:  # another request may have taken the prompt_id while this one validated
            known = self._known_submission(prompt_id, digest)
            if known is not None:
                return known
        if number is None:
            number = -self.counter if sub.front else self.counter
            self.counter += 1
        cid = sub.client_id if sub.client_id is not None else client_id
        extra, sensitive = split_sensitive(dict(sub.extra_data))
        if cid is not None:
            extra["client_id"] = cid
        extra["create_time"] = int(time.time() * 1000)
        if heavy:
            prompt_json, prompt_text = await params.off_loop(_encoded, graph)
        else:
            prompt_json, prompt_text = _encoded(graph)
        args = (prompt_id, float(number), cid, prompt_json, extra, validation.outputs, digest, prompt_text)
        try:
            if len(prompt_text) > LARGE_BODY:  # a huge row: written from a worker thread, off the loop
                await asyncio.to_thread(self.store.add, *args, True)
            else:
                self.store.add(*args)
        except DuplicatePrompt:  # the same prompt_id was accepted meanwhile
            known = self._known_submission(prompt_id, digest)
            if known is not None:
                return known
            raise ApiError(409, "prompt_id_conflict", "This prompt_id was already used", prompt_id) from None
        job = Job(prompt_id, number, graph, validation, prompt_json, extra, sensitive, cid, list(validation.outputs))
        job.prompt_text = prompt_text
        self._push(job)
        metrics.prompt_accepted(self, job)
        if announce:
            self.broadcast_status(job)
        body = {"prompt_id": prompt_id, "number": json_number(number), "node_errors": protocol.node_errors(validation)}
        if warnings:
            body["warnings"] = protocol.node_warnings(validation, graph)
        return body

    def _log_validation(self, prompt_id: str, validation: ValidationResult) -> None:
        """Full tracebacks of a failed validation go to the log (clients get them without local paths)."""
        issues = [validation.error] if validation.error is not None else []
        for p in validation.problems.values():
            issues.extend(p.issues)
        for issue in issues:
            tb = issue.extra.get("traceback") if isinstance(issue.extra, dict) else None
            if tb:
                log.warning("prompt %s failed validation: %s\n%s", prompt_id, issue.message, "".join(map(str, tb)))

    def _push(self, job: Job) -> None:
        self.pending[job.prompt_id] = job
        heapq.heappush(self._queues.setdefault(job.client_id or "", []), (job.number, job.prompt_id))
        if self._wake is not None:
            self._wake.set()

    # -- dispatch -------------------------------------------------------------------------------------
    def _start_worker(self, w: Any, delay: float = 0.0) -> None:
        self._background(self._bring_up(w, delay))

    async def _bring_up(self, w: Any, delay: float) -> None:
        """Start (or restart) a worker and wake the dispatcher once it is ready; retry one that cannot start
        with a growing pause, saying why in the log."""
        if delay:
            await asyncio.sleep(delay)
        if self.router.stopping:
            return
        try:
            # started from the loop thread, which lives as long as the server: Linux ties the worker's
            # die-with-parent signal to the thread that started it
            w.start()
            await w.ready()
        except (WorkerLost, OSError) as exc:
            w.failures = getattr(w, "failures", 0) + 1
            log.error("worker %s could not start (try %d): %s", w.name, w.failures, exc)
            self._start_worker(w, min(30.0, 0.5 * 2**w.failures))
            return
        w.failures = 0
        log.info("worker %s ready (pid %s)", w.name, w.pid)
        if self._wake is not None:
            self._wake.set()

    def _idle(self) -> list:
        return [s for s in self.slots if s.state == "idle"]

    async def _next(self) -> Job:
        """The next prompt to run, once one is pending and a worker is idle to take it."""
        while True:
            if self._idle():
                job = self._pop_next()
                if job is not None:
                    return job
            if not self.runs:
                self._apply_free()
            assert self._wake is not None  # set by start(), which starts this task
            self._wake.clear()
            await self._wake.wait()

    def _pop_next(self) -> Job | None:
        """The pending prompt to run next. Prompts sent to the front (a negative ``number``) go first. Then,
        with ``fair_share`` (default), clients take turns: start-time fair queuing over client ids, so one
        client's hundred queued prompts delay another client's next prompt by at most one prompt per client
        ahead of it; within a client, by ``number`` (FIFO). Without it, by ``number`` over all clients."""
        best_key, best_rank = None, None
        for key in list(self._queues):
            q = self._queues[key]
            while q and q[0][1] not in self.pending:  # deleted or interrupted while queued
                heapq.heappop(q)
            if not q:
                del self._queues[key]
                continue
            number = q[0][0]
            if number < 0:
                rank: tuple = (0, number, 0.0)
            elif self.config.fair_share:
                rank = (1, max(self._vtime, self._tags.get(key, 0.0)), number)
            else:
                rank = (1, 0.0, number)
            if best_rank is None or rank < best_rank:
                best_key, best_rank = key, rank
        if best_key is None:
            return None
        _, pid = heapq.heappop(self._queues[best_key])
        if best_rank is not None and best_rank[0] == 1:
            tag = max(self._vtime, self._tags.get(best_key, 0.0))
            self._vtime = tag
            self._tags[best_key] = tag + 1
            if len(self._tags) > 4096:  # forget clients that are not ahead of the virtual clock
                self._tags = {k: v for k, v in self._tags.items() if v > self._vtime}
        return self.pending.pop(pid)

    def _choose(self, job: Job):
        """Model-affine choice among idle workers: one that already holds every model file the prompt names
        (the most recently used of those), else the least recently used one; not the worker that just died
        under this prompt when another is idle."""
        idle = self._idle()
        if not idle:
            return None
        avoid = getattr(job, "avoid", None)
        cands = [s for s in idle if s.name != avoid] or idle
        key = model_files(job.prompt_json) if self.config.affinity else set()
        warm = [s for s in cands if key and key <= s.held]
        if warm:
            return max(warm, key=lambda s: s.last_used)
        return min(cands, key=lambda s: s.last_used)

    async def _dispatch(self) -> None:
        while True:
            job = await self._next()
            slot = self._choose(job)
            if slot is None:  # the idle worker went away meanwhile
                self._push(job)
                continue
            slot.state = "busy"
            job.worker = slot
            self.runs[job.prompt_id] = job
            self._background(self._run_guarded(job, slot))

    async def _run_guarded(self, job: Job, slot) -> None:
        try:
            await self._run(job, slot)
        except asyncio.CancelledError:
            raise
        except Exception:  # the service must outlive any bug in one prompt
            log.exception("prompt %s failed inside the server", job.prompt_id)
            if self.runs.get(job.prompt_id) is job:
                del self.runs[job.prompt_id]
        finally:
            if slot is self._inline:
                slot.state = "idle"
            if not self.runs:
                self._apply_free()
            if self._wake is not None:
                self._wake.set()

    async def _run(self, job: Job, slot) -> None:
        job.status = "running"
        job.previews = self._wants_previews(job)
        if job.prompt_text is not None and len(job.prompt_text) > LARGE_BODY:
            await asyncio.to_thread(self.store.mark_running, job.prompt_id, True)  # a huge row: off the loop
        else:
            self.store.mark_running(job.prompt_id)
        # a client with a socket at the start follows the run (and replays what it misses): no late delivery
        job.watched = job.client_id is None or bool(self.hub.to_sid(job.client_id))
        self.broadcast_status(job)
        put = self._pipe.put

        def sink(event: ev.Event) -> None:
            put(job, event)

        self.journal.begin(job.prompt_id)
        try:
            if slot is self._inline:
                status, outputs, meta = await self._run_inline(job, sink)
            else:
                status, outputs, meta = await self._run_on_worker(job, slot, sink)
        except asyncio.CancelledError:
            raise
        except WorkerLost as lost:
            self._pipe.drain()
            if lost.node:  # the worker's own word on the node it ran (its last events may not have left it)
                job.last_node = lost.node
            if not self.router.stopping:
                self._start_worker(slot)  # a fresh process; it loads models again when a prompt needs them
            if self._retry(job, slot, lost):
                return
            status, outputs, meta = self._lost(job, lost)
        except BaseException as exc:  # even a node's SystemExit ends only its prompt
            log.exception("executor raised for prompt %s", job.prompt_id)
            self._pipe.drain()
            if not job.terminal:
                self.router.dispatch(
                    job, ev.ExecutionError(job.prompt_id, message=str(exc), exception_type=type(exc).__name__)
                )
            status, outputs, meta = "error", {}, {}
        finally:
            self.journal.end(job.prompt_id)
        self._pipe.drain()  # every event of the run is dispatched before the prompt is finished
        if self.router.stopping:
            return
        self._finish(job, status, outputs, meta)

    async def _run_inline(self, job: Job, sink) -> tuple[str, dict, dict]:
        run_extra = {**job.extra_data, **job.sensitive}
        options = RunOptions(previews=job.previews)
        result = await self._loop.run_in_executor(
            self._pool,
            lambda: self.executor.run(
                job.graph,
                prompt_id=job.prompt_id,
                extra_data=run_extra,
                sink=sink,
                validation=job.validation,
                cancel=job.cancel,
                options=options,
            ),
        )
        return result.status, result.outputs, result.meta

    async def _run_on_worker(self, job: Job, w: Any, sink) -> tuple[str, dict, dict]:
        text = job.prompt_text if job.prompt_text is not None else encode(job.prompt_json)
        payload = {
            "prompt_id": job.prompt_id,
            "prompt_text": text,
            "extra_data": {**job.extra_data, **job.sensitive},
            "targets": list(job.outputs),
            "previews": job.previews,
            "journal": self.store.output_files(job.prompt_id),
        }
        if w.shares_folders and job.validation.ok:
            # checked here against the same registry and folders: the worker runs it without checking again
            payload["validated"] = (list(job.validation.outputs), list(job.validation.order))
        w.held |= model_files(job.prompt_json)
        store = self.output_store
        if store is not None:
            payload["inputs"] = await asyncio.to_thread(self._store_inputs, store, job.prompt_json)
            if job.losses:  # a re-run: what the attempt that died stored goes, so nothing is left twice
                gone = await asyncio.to_thread(store.delete_prompt, job.prompt_id)
                log.info("prompt %s: %d stored outputs of the earlier attempt deleted", job.prompt_id, gone)
            plain_sink = sink

            def sink(event: ev.Event) -> None:  # outputs are where the store keeps them: under the prompt id
                if isinstance(event, ev.NodeOutput) and event.output:
                    event = replace(event, output=scope_outputs({"": event.output}, job.prompt_id)[""])
                plain_sink(event)

        timer = None
        limit = self.config.max_prompt_seconds
        if limit:
            why = f"it ran longer than the limit of {limit:g} s (--max-prompt-seconds)"
            timer = self._loop.call_later(limit, self._stop_job, job, why)
        self.store.grant_lease(job.prompt_id, w.name, job.losses + 1, self.config.worker_lease)
        try:
            status, outputs, meta = await w.run(payload, sink)
        finally:
            self.store.release_lease(job.prompt_id)
            if timer is not None:
                timer.cancel()
        if store is not None:
            outputs = scope_outputs(outputs, job.prompt_id)
        return status, outputs, meta

    def _store_inputs(self, store: Any, prompt: Any) -> dict[str, int]:
        """Put the files of this server's input folder that ``prompt`` names into the output store (once per
        version of each file), for workers that share no disk with the server; returns name -> size, which
        the worker fetches what it lacks by (a worker thread runs this)."""
        folders = self.executor.folders
        names: dict[str, int] = {}
        if folders is None:
            return names
        root = folders.input_dir
        for entry in prompt.values() if isinstance(prompt, dict) else ():
            inputs = entry.get("inputs") if isinstance(entry, dict) else None
            for value in inputs.values() if isinstance(inputs, dict) else ():
                if not isinstance(value, str) or not value or len(value) > 1024 or "\n" in value:
                    continue
                value = value.removesuffix(" [input]")
                try:
                    path = folders.safe_path("input", value)
                    st = path.stat()
                except (UnsafePath, OSError, ValueError):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                rel = path.relative_to(root).as_posix()
                version = (st.st_size, st.st_mtime_ns)
                if self._stored_inputs.get(rel) != version:
                    store.put_input(rel, path)
                    self._stored_inputs[rel] = version
                names[rel] = st.st_size
        return names

    @staticmethod
    def _running_node(job: Job) -> tuple[str | None, str | None]:
        """The node a prompt was at (its display id) and that node's class, when known."""
        node = job.last_node
        if node is None or not isinstance(job.prompt_json, dict):
            return node, None
        entry = job.prompt_json.get(node)
        return node, entry.get("class_type") if isinstance(entry, dict) else None

    def _node_label(self, job: Job) -> str:
        node, cls = self._running_node(job)
        if node is None:
            return ""
        return f" at node {node} ({cls})" if cls else f" at node {node}"

    def _retry(self, job: Job, slot, lost: WorkerLost) -> bool:
        """A worker died under ``job``: run it once more (on another worker when one is idle). Not when the
        server ended the worker itself (an interrupt that was ignored, a limit) or when it is the second."""
        job.losses += 1
        if lost.limit and not job.stop_reason:
            job.stop_reason = lost.cause
        if job.stop_reason or job.interrupt_requested or job.losses >= 2 or self.router.stopping:
            return False
        log.warning(
            "worker %s died running prompt %s (%s%s): re-running it once",
            slot.name,
            job.prompt_id,
            lost.cause,
            self._node_label(job),
        )
        self.runs.pop(job.prompt_id, None)
        job.status = "pending"
        job.terminal = False
        job.open_node = None
        job.state_nodes = {}
        job.cancel = threading.Event()
        job.worker = None
        job.avoid = slot.name  # type: ignore[attr-defined]
        self._push(job)
        return True

    def _lost(self, job: Job, lost: WorkerLost) -> tuple[str, dict, dict]:
        """The events and status of a prompt whose worker is gone for good."""
        node, cls = self._running_node(job)
        if job.terminal:
            return "error", {}, {}
        if job.interrupt_requested and not job.stop_reason:
            self.router.dispatch(job, ev.ExecutionInterrupted(job.prompt_id, node_id=node, node_type=cls))
            return "interrupted", {}, {}
        why = f"worker killed: {job.stop_reason or lost.cause}{self._node_label(job)}"
        if job.losses >= 2:
            why += "; this prompt has now ended two workers, so it is not run again"
        log.error("prompt %s failed: %s", job.prompt_id, why)
        self.router.dispatch(
            job, ev.ExecutionError(job.prompt_id, node_id=node, node_type=cls, message=why, exception_type="WorkerLost")
        )
        return "error", {}, {}

    def _stop_job(self, job: Job, reason: str) -> None:
        """Stop a running prompt for a limit it breached: cooperatively, then by ending its worker."""
        if self.runs.get(job.prompt_id) is not job:
            return
        job.stop_reason = reason
        self._interrupt_run(job)

    def _interrupt_run(self, job: Job) -> None:
        job.cancel.set()
        w = job.worker
        if w is not None and w is not self._inline:
            w.interrupt(job.prompt_id)
            grace = self.config.interrupt_grace
            self._loop.call_later(grace, self._end_if_still_running, job, w)

    def _end_if_still_running(self, job: Job, w: Any) -> None:
        if self.runs.get(job.prompt_id) is job and w.prompt_id == job.prompt_id:
            grace = self.config.interrupt_grace
            w.kill(f"it did not stop within {grace:g} s of being interrupted")

    def _send_sync(self, event: str, data, sid: str | None) -> None:
        """A pack's ``send_sync`` from a worker process (called on a reader thread)."""
        from .packs import deliver

        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(deliver, self.hub, event, data, sid)

    def _finish(self, job: Job, status: str, outputs: dict, meta: dict) -> None:
        self.router.close_open_node(job)
        ok = status == "success"
        history = {
            "prompt": job.queue_item,
            "outputs": outputs,
            "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": job.messages},
            "meta": meta,
        }
        # the stored text of ``history``, around the queue item's text encoded once at submission
        trace = ""
        if job.trace_id:  # with --otel: the prompt's trace, to find its spans from its history entry
            history["trace_id"] = job.trace_id
            trace = f', "trace_id": {json.dumps(job.trace_id)}'
        history_text = (
            f'{{"prompt": {job.queue_text}, "outputs": {encode(outputs)}, '
            f'"status": {encode(history["status"])}, "meta": {encode(meta)}{trace}}}'
        )
        job.seq += 1
        final = {"node": None, "prompt_id": job.prompt_id}
        final_json = as_json(final)
        self.store.log_event(job.prompt_id, job.seq, "executing", final_json)
        sockets = self.hub.to_sid(job.client_id) if job.client_id is not None else []
        self.store.finish(job.prompt_id, status, history_text, job.seq, delivered=job.watched or bool(sockets))
        self._finished += 1
        if self.config.history_limit and self._finished % 64 == 1:  # trimming is a scan: not every time
            self.store.trim_history(self.config.history_limit)
        job.status = status
        if self.runs.get(job.prompt_id) is job:
            del self.runs[job.prompt_id]
        job.worker = None
        self.broadcast_status(job)
        if sockets:
            out = Out(protocol.message_from_json("executing", final_json, job.seq))
            for c in sockets:
                c.send(out)
        for fut in self._waiters.pop(job.prompt_id, ()):
            if not fut.done():
                fut.set_result(status)
        self.router.wake(job.prompt_id)
        hook = job.extra_data.get("webhook")
        if isinstance(hook, str) and hook.startswith(("http://", "https://")):
            self._background(self._webhook(hook, job.prompt_id, status, outputs, history))

    def _wants_previews(self, job: Job) -> bool:
        method = job.extra_data.get("preview_method")
        if not method or method == "default":
            method = self.config.preview_method
        if method and method != "none":
            return True
        if job.client_id is not None:
            return any(c.features.get("previews") for c in self.hub.to_sid(job.client_id))
        return False

    # -- events -------------------------------------------------------------------------------------
    def broadcast_status(self, job: Job | None = None) -> None:
        """Tell sockets the queue size changed.

        The prompt's own client gets it at once (ComfyUI's exact sequence); every other socket gets the
        latest value at most every ``STATUS_INTERVAL`` seconds and only if it changed for that socket, so
        many clients and many prompts do not multiply into a storm of identical messages.
        """
        if not self.hub.count():
            return
        n = self.queue_remaining
        if job is not None and job.client_id is not None:
            out = Out(protocol.message("status", protocol.status_data(n)))
            for c in self.hub.to_sid(job.client_id):
                c.send(out)
                c.last_status = n
        if self._status_timer is None:
            self._status_timer = self._loop.call_later(STATUS_INTERVAL, self._flush_status)

    def _flush_status(self) -> None:
        self._status_timer = None
        n = self.queue_remaining
        out = None
        for c in self.hub.clients():
            if c.last_status != n:
                out = out or Out(protocol.message("status", protocol.status_data(n)))
                c.send(out)
                c.last_status = n

    # -- queries ------------------------------------------------------------------------------------
    def status(self, prompt_id: str) -> dict:
        if prompt_id in self.runs:
            j = self.runs[prompt_id]
            return {
                "prompt_id": prompt_id,
                "status": "running",
                "number": json_number(j.number),
                "node": j.last_node,
                "last_seq": j.seq,
            }
        if prompt_id in self.pending:
            j = self.pending[prompt_id]
            ahead = sum(1 for o in self.pending.values() if (o.number, o.prompt_id) < (j.number, j.prompt_id))
            return {
                "prompt_id": prompt_id,
                "status": "pending",
                "number": json_number(j.number),
                "queue_position": ahead + len(self.runs),
                "last_seq": j.seq,
            }
        row = self.store.get(prompt_id)
        if row is None:
            return {"prompt_id": prompt_id, "status": "unknown"}
        out = {
            "prompt_id": prompt_id,
            "status": row.status,
            "number": json_number(row.number),
            "last_seq": row.last_seq,
            "created": row.created,
            "started": row.started,
            "finished": row.finished,
        }
        if row.history is not None:
            out["outputs"] = row.history.get("outputs", {})
            for t, d in row.history.get("status", {}).get("messages", []):
                if t in ("execution_error", "execution_interrupted"):
                    out["error"] = d
        return out

    async def wait(self, prompt_id: str, timeout: float) -> None:
        st = self.status(prompt_id)["status"]
        if st not in ("pending", "running"):
            return
        fut = self._loop.create_future()
        self._waiters.setdefault(prompt_id, []).append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            lst = self._waiters.get(prompt_id)
            if lst and fut in lst:
                lst.remove(fut)

    async def wait_events(self, prompt_id: str, since: int, timeout: float) -> None:
        """Return once the prompt has an event after ``since`` (or is done), or after ``timeout``."""
        if self.store.has_events_after(prompt_id, since) or self.status(prompt_id)["status"] not in (
            "pending",
            "running",
        ):
            return
        fut = self._loop.create_future()
        self.router.watchers.setdefault(prompt_id, []).append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            lst = self.router.watchers.get(prompt_id)
            if lst and fut in lst:
                lst.remove(fut)

    def known(self, prompt_id: str) -> bool:
        return prompt_id in self.runs or prompt_id in self.pending or self.store.status_of(prompt_id) is not None

    def replay(self, client: Client, prompt_id: str, since: int) -> bool:
        """Queue a prompt's logged events after ``since`` on one socket; False for an unknown prompt."""
        if not self.known(prompt_id):
            return False
        self.router.replay(client, prompt_id, since)
        return True

    def deliver_late(self, client: Client) -> int:
        """Send a socket that just connected the final events of its client's prompts that finished, within
        ``late_delivery_window`` seconds, while no socket of that client was connected; in finishing order,
        each prompt once. Returns how many prompts were delivered."""
        window = self.config.late_delivery_window
        if not window or window <= 0:
            return 0
        pids = self.store.undelivered(client.sid, time.time() - window)
        for pid in pids:
            for seq, t, d in self.store.events(pid, 0):
                if t in LATE_TYPES and (t != "executing" or d.startswith('{"node":null')):
                    client.send(Out(protocol.message_from_json(t, d, seq)))
        if pids:
            self.store.mark_delivered(pids)
        return len(pids)

    def events(self, prompt_id: str, since: int) -> list[dict] | None:
        if not self.known(prompt_id):
            return None
        frames = self.store.frames(prompt_id, since)
        out = []
        for s, t, d in self.store.events(prompt_id, since):
            e = {"seq": s, "type": t, "data": json.loads(d)}
            if s in frames:
                e["frame"] = {"format": frames[s][1], "bytes": len(frames[s][2])}
            out.append(e)
        return out

    def queue(self) -> dict:
        running = [j.queue_item for j in self.runs.values()]
        pending = [j.queue_item for j in sorted(self.pending.values(), key=lambda j: (j.number, j.prompt_id))]
        return {"queue_running": running, "queue_pending": pending}

    def queue_json(self) -> str:
        """``queue()`` as JSON text, from each job's cached queue item text (cheap with huge graphs)."""
        running = [j.queue_text for j in self.runs.values()]
        pending = [j.queue_text for j in sorted(self.pending.values(), key=lambda j: (j.number, j.prompt_id))]
        return f'{{"queue_running": [{", ".join(running)}], "queue_pending": [{", ".join(pending)}]}}'

    # -- control ------------------------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None) -> None:
        if prompt_id is None:  # ComfyUI's global interrupt: whatever is running
            for each in list(self.runs.values()):
                each.interrupt_requested = True
                self._interrupt_run(each)
            return
        running = self.runs.get(prompt_id)
        if running is not None:
            running.interrupt_requested = True
            self._interrupt_run(running)
            return
        job = self.pending.pop(prompt_id, None)
        if job is not None:
            self.router.dispatch(job, ev.ExecutionInterrupted(prompt_id))
            self._finish(job, "interrupted", {}, {})
            return
        self._not_pending(prompt_id, "interrupt")

    def _not_pending(self, prompt_id: str, what: str) -> None:
        known = self.store.status_of(prompt_id)
        if known is None:
            raise ApiError(404, "prompt_not_found", f"No prompt with id {prompt_id!r}", prompt_id)
        raise ApiError(409, "prompt_finished", f"Cannot {what} prompt {prompt_id!r}: it is {known[0]}", prompt_id)

    def delete_pending(self, ids: list[str]) -> list[str]:
        """Remove pending prompts; returns the ids that were not pending."""
        gone, missing = [], []
        for pid in ids:
            if self.pending.pop(str(pid), None) is not None:
                gone.append(str(pid))
            else:
                missing.append(str(pid))
        if gone:
            self.store.delete(gone)
            for pid in gone:
                for fut in self._waiters.pop(pid, ()):
                    if not fut.done():
                        fut.set_result("unknown")
            self.broadcast_status()
        return missing

    def clear_pending(self) -> None:
        ids = list(self.pending)
        self.delete_pending(ids)
        self._queues.clear()

    def delete_history(self, ids: list[str]) -> list[str]:
        found: list[str] = []
        missing: list[str] = []
        for pid in ids:
            known = self.store.status_of(str(pid))
            (found if known is not None and known[0] in FINISHED else missing).append(str(pid))
        if found:
            self.store.delete(found)
        return missing

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        self._free["unload_models"] |= unload_models
        self._free["free_memory"] |= free_memory
        if not self.runs and self._wake is not None:
            self._apply_free()

    def _apply_free(self) -> None:
        if self.workers and (self._free["free_memory"] or self._free["unload_models"]):
            for w in self.workers:
                w.free(self._free["unload_models"], self._free["free_memory"])
            self._free = {"unload_models": False, "free_memory": False}
        if self._free["free_memory"] or self._free["unload_models"]:
            if self._free["free_memory"]:
                self.executor.cache.clear()
            for svc in getattr(self.executor, "services", {}).values():
                fn = getattr(svc, "unload_all", None)
                if callable(fn):
                    try:
                        fn()
                    except Exception:
                        log.exception("unloading models failed")
            self._free = {"unload_models": False, "free_memory": False}

    # -- webhooks -----------------------------------------------------------------------------------
    def _background(self, coro) -> None:
        t = self._loop.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _webhook(self, url: str, prompt_id: str, status: str, outputs: dict, history: dict) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout))
        err = next(
            (d for t, d in history["status"]["messages"] if t in ("execution_error", "execution_interrupted")), None
        )
        await post_webhook(
            self._session, url, {"prompt_id": prompt_id, "status": status, "outputs": outputs, "error": err}
        )


def _encoded(graph: Graph) -> tuple[dict, str]:
    """The graph's JSON and its stored text (CPU work a large graph does in a worker thread)."""
    prompt_json = graph.to_json()
    return prompt_json, encode(prompt_json, in_pieces=len(prompt_json) > INLINE_VALIDATION_NODES)


class _InlineSlot:
    """The server's own executor thread, as a worker (``workers = 0``: no isolation)."""

    name = "inproc"
    pid = None
    prompt_id = None

    def __init__(self) -> None:
        self.state = "idle"
        self.held: set[str] = set()
        self.last_used = 0.0

    def info(self) -> dict:
        return {"name": self.name, "state": self.state, "pid": os.getpid(), "models": []}


# inputs of loader nodes that name model files: a prompt's model key for worker affinity
MODEL_INPUTS = frozenset(
    {
        "ckpt_name",
        "lora_name",
        "control_net_name",
        "vae_name",
        "unet_name",
        "clip_name",
        "clip_name1",
        "clip_name2",
        "model_name",
        "style_model_name",
        "clip_vision_name",
        "gligen_name",
        "hypernetwork_name",
    }
)


def model_files(prompt: Any) -> set[str]:
    """The model files a prompt's loader nodes name (``input=file``), used to prefer a worker holding them."""
    out: set[str] = set()
    if not isinstance(prompt, dict):
        return out
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            for k, v in inputs.items():
                if k in MODEL_INPUTS and isinstance(v, str):
                    out.add(f"{k}={v}")
    return out
