"""Worker processes: where prompts run when ``kiln serve`` keeps execution out of its own process.

The server (``kiln.server``) keeps HTTP, websockets, the queue and history; each prompt it dispatches runs in
a worker that has its own executor, node cache and model manager. A prompt that exhausts a worker's memory,
crashes inside native code or ignores an interrupt ends that worker, never the server.

- ``spec``: ``WorkerSpec``, how a worker builds its executor (a picklable factory reference).
- ``child``: the worker process's main loop (runs prompts, streams their events back, answers ``free``).
- ``local``: ``ProcessWorker``, the server's handle on one local worker process (start, run, interrupt,
  memory watchdog, kill, replace).

The wire between the two is a ``multiprocessing`` connection carrying pickled tuples (see ``child``).
Nothing here imports the server; only ``child`` imports node code, and only inside the worker process.
"""

from __future__ import annotations

from .local import ProcessWorker, WorkerLost
from .spec import WorkerSpec

__all__ = ["ProcessWorker", "WorkerLost", "WorkerSpec"]
