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
from typing import TYPE_CHECKING

from kiln.workers.journal import JournalBook

if TYPE_CHECKING:
    from kiln.engine import Executor

    from .store import Store

SERVICE_NAME = "output_files"  # the executor service name savers look up (kiln.nodes.outputs.JOURNAL)
RECORD_TIMEOUT = 30.0
log = logging.getLogger("kiln.server")


class OutputJournal(JournalBook):
    def __init__(self, store: Store):
        super().__init__()
        self.store = store
        self.loop: asyncio.AbstractEventLoop | None = None

    def install(self, executor: Executor) -> None:
        services = getattr(executor, "services", None)
        if isinstance(services, dict):
            services[SERVICE_NAME] = self

    # -- the server's side (loop thread) ------------------------------------------------------------
    def begin(self, prompt_id: str) -> None:
        """A new attempt of ``prompt_id`` starts: load what earlier attempts recorded."""
        self.start(prompt_id, self.store.output_files(prompt_id))

    # -- the saver's side (executor thread) ---------------------------------------------------------
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
