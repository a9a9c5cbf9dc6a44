"""The output-file journal: which file each output of a running prompt went to, so a re-run after a crash
writes the same file again instead of a second one.

The server installs a journal as the executor service ``output_files``; a saver (``kiln.nodes.outputs``)
looks it up through the running node's context, so the engine stays unaware of it and the server never
imports node code. The contract (duck-typed, all keyed by prompt id, node id and the node's n-th output):

- ``next_index(prompt_id, node_id) -> int``: the index of the node's next output in this attempt;
- ``previous(prompt_id, node_id, index) -> (path, tmp) | None``: what an earlier attempt recorded;
- ``record(prompt_id, node_id, index, path, tmp)``: store (committed) where the output is about to go,
  before it is moved into place.

Records live in the store until the prompt finishes. Savers call from the executor's thread; the journal
hands each record to the event loop thread (where every store call runs) and waits for the commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.engine import Executor

    from .store import Store

SERVICE_NAME = "output_files"  # the executor service name savers look up (kiln.nodes.outputs.JOURNAL)
RECORD_TIMEOUT = 30.0
log = logging.getLogger("kiln.server")


class OutputJournal:
    def __init__(self, store: Store):
        self.store = store
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._previous: dict[str, dict[tuple[str, int], tuple[str, str]]] = {}
        self._counters: dict[tuple[str, str], int] = {}

    def install(self, executor: Executor) -> None:
        services = getattr(executor, "services", None)
        if isinstance(services, dict):
            services[SERVICE_NAME] = self

    # -- the server's side (loop thread) ------------------------------------------------------------
    def begin(self, prompt_id: str) -> None:
        """A new attempt of ``prompt_id`` starts: load what earlier attempts recorded."""
        previous = self.store.output_files(prompt_id)
        with self._lock:
            self._previous[prompt_id] = previous
            for key in [k for k in self._counters if k[0] == prompt_id]:
                del self._counters[key]

    def end(self, prompt_id: str) -> None:
        with self._lock:
            self._previous.pop(prompt_id, None)
            for key in [k for k in self._counters if k[0] == prompt_id]:
                del self._counters[key]

    # -- the saver's side (executor thread) ---------------------------------------------------------
    def active(self, prompt_id: str) -> bool:
        with self._lock:
            return prompt_id in self._previous

    def next_index(self, prompt_id: str, node_id: str) -> int:
        with self._lock:
            n = self._counters.get((prompt_id, node_id), 0)
            self._counters[(prompt_id, node_id)] = n + 1
            return n

    def previous(self, prompt_id: str, node_id: str, index: int) -> tuple[str, str] | None:
        with self._lock:
            return self._previous.get(prompt_id, {}).get((node_id, index))

    def record(self, prompt_id: str, node_id: str, index: int, path: str, tmp: str) -> None:
        """Commit the record before returning (on the loop thread, where the store is used)."""

        def write() -> None:
            self.store.record_output_file(prompt_id, node_id, index, path, tmp)

        loop = self.loop
        if loop is None or _on_loop(loop):
            write()
            return
        done: cf.Future = cf.Future()

        def run() -> None:
            try:
                write()
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            done.result(RECORD_TIMEOUT)
        except (RuntimeError, cf.TimeoutError) as exc:  # the loop is closed or stuck: the server is stopping
            log.warning("output %s of node %s (prompt %s) was not journaled: %s", index, node_id, prompt_id, exc)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
