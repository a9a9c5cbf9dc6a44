"""How a worker process builds its executor, and the limits it runs under."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """``factory`` is ``"module:function"``, called in the worker with ``kwargs`` to make its ``Executor``
    (``kiln serve`` uses ``kiln.runtime:make_executor`` with its own --base-dir, --cache, --custom-nodes).

    ``threads``: torch threads for the worker (0: the machine's cores divided by the number of workers).
    ``memory_limit``: bytes of resident memory the worker may use before it is stopped (0: no limit).
    ``env``: extra environment for the worker process.
    ``services``: entries set in the executor's ``services`` once built (settings nodes read, e.g. the image
    pixel cap).
    ``heartbeat_s``: how often the worker tells the server it is alive while it runs a prompt (the server
    renews the prompt's lease on each, and ends a worker that stays silent past the lease).
    """

    factory: str = "kiln.runtime:make_executor"
    kwargs: dict = field(default_factory=dict)
    threads: int = 0
    memory_limit: int = 0
    env: dict = field(default_factory=dict)
    services: dict = field(default_factory=dict)
    heartbeat_s: float = 2.0

    def build(self) -> Any:
        module, _, name = self.factory.partition(":")
        fn = getattr(importlib.import_module(module), name)
        executor = fn(**self.kwargs)
        services = getattr(executor, "services", None)
        if isinstance(services, dict):
            services.update(self.services)
        return executor


def total_memory() -> int:
    """The machine's physical memory in bytes (0 if it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
