"""The bookkeeping of an output journal (the contract savers use, see ``kiln.nodes.outputs``): per prompt,
what earlier attempts recorded and how many outputs each node has written in this attempt.

Two journals share it: the server's (``kiln.server.journal.OutputJournal``, which loads earlier records from
its store and commits new ones there) and a worker's view of it (``kiln.workers.child``, which gets earlier
records with the job and sends new ones to the server). Each adds its own ``begin`` source and ``record``.
"""

from __future__ import annotations

import threading


class JournalBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._previous: dict[str, dict[tuple[str, int], tuple[str, str]]] = {}
        self._counters: dict[tuple[str, str], int] = {}

    def start(self, prompt_id: str, previous: dict) -> None:
        """A new attempt of ``prompt_id``: what earlier attempts recorded, (node_id, index) -> (path, tmp)."""
        with self._lock:
            self._previous[prompt_id] = dict(previous)
            self._forget_counters(prompt_id)

    def end(self, prompt_id: str) -> None:
        with self._lock:
            self._previous.pop(prompt_id, None)
            self._forget_counters(prompt_id)

    def _forget_counters(self, prompt_id: str) -> None:
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
