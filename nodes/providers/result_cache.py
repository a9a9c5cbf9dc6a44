"""Paid provider results kept on disk, so the same graph run again in a new process never pays twice.

The in-memory output cache already spares a second call within one process; this one survives restarts.
A provider node wraps its paid work in :func:`remember`: the result is stored under the node's cache key (the
executor's content-derived key of the node's class, inputs and everything upstream: identical in any process),
and a later run with the same key gets it back without a call. A node with ``cache_results`` off has no key
and is never served from disk.

The cache is an executor service (``services["provider_results"]``) that the command line and the server
install with a folder under their data directory; without it, nothing is stored. Entries are written to a
temporary folder and renamed into place (a crash leaves no half entry) and the oldest go first past the size
bound.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kiln import engine
from kiln.engine import NodeResult

SERVICE = "provider_results"
DEFAULT_MAX_BYTES = 2 * 1024**3
_FORMAT = 1


class ProviderResultCache:
    """``folder`` None: ``cache/provider-results`` under the running executor's base folder."""

    def __init__(self, folder: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.fixed = Path(folder) if folder is not None else None
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()

    def at(self, folders: Any) -> ProviderResultCache:
        """This cache's store for a run with ``folders`` (itself when its folder is fixed)."""
        if self.fixed is not None or folders is None:
            return self
        view = ProviderResultCache(Path(folders.base_dir) / "cache" / "provider-results", self.max_bytes)
        view._lock = self._lock
        return view

    @property
    def folder(self) -> Path:
        if self.fixed is None:
            raise ValueError("this provider result cache has no folder of its own; use .at(folders)")
        return self.fixed

    def install(self, executor: Any) -> ProviderResultCache:
        executor.services[SERVICE] = self
        return self

    def _entry(self, key: bytes) -> Path:
        return self.folder / key.hex()

    def get(self, key: bytes) -> NodeResult | None:
        entry = self._entry(key)
        meta_path = entry / "result.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(entry / "tensors.safetensors")) if (entry / "tensors.safetensors").exists() else {}
        except (OSError, ValueError):
            return None
        if meta.get("format") != _FORMAT:
            return None
        values = [
            tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v.get("json") for v in meta["values"]
        ]
        os.utime(meta_path)  # recently used: evicted last
        return NodeResult(result=tuple(values), ui=meta.get("ui"))

    def put(self, key: bytes, result: NodeResult) -> bool:
        """Store ``result``; False (nothing stored) when a value is neither a tensor nor JSON."""
        tensors: dict[str, torch.Tensor] = {}
        values: list[dict] = []
        for i, v in enumerate(result.values):
            if isinstance(v, torch.Tensor):
                tensors[f"v{i}"] = v.detach().cpu().contiguous()
                values.append({"tensor": f"v{i}"})
            else:
                try:
                    json.dumps(v, allow_nan=False)
                except (TypeError, ValueError):
                    return False
                values.append({"json": v})
        try:
            meta = json.dumps({"format": _FORMAT, "values": values, "ui": result.ui, "stored": time.time()})
        except (TypeError, ValueError):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        try:
            if tensors:
                save_file(tensors, str(tmp / "tensors.safetensors"))
            (tmp / "result.json").write_text(meta, encoding="utf-8")
            final = self._entry(key)
            with self._lock:
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._trim()
        return True

    def _trim(self) -> None:
        entries = []
        total = 0
        for d in self.folder.iterdir():
            if d.name.startswith(".tmp-") or not d.is_dir():
                continue
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            used = (d / "result.json").stat().st_mtime if (d / "result.json").exists() else 0.0
            entries.append((used, size, d))
            total += size
        for _, size, d in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            shutil.rmtree(d, ignore_errors=True)
            total -= size


async def remember(produce: Callable[[], Awaitable[NodeResult]]) -> NodeResult:
    """The running node's stored result when there is one, else ``produce()`` (the paid call), stored."""
    ctx = engine.current()
    cache = ctx.run.services.get(SERVICE) if ctx is not None else None
    key = ctx.cache_key if ctx is not None else None
    if not isinstance(cache, ProviderResultCache) or key is None:
        return await produce()
    cache = cache.at(ctx.run.folders if ctx is not None else None)
    if cache.fixed is None:
        return await produce()
    hit = await asyncio.to_thread(cache.get, key)
    if hit is not None:
        return hit
    result = await produce()
    await asyncio.to_thread(cache.put, key, result)
    return result


def keeps_results(cls: type) -> type:
    """Class decorator for a paid node: its ``run`` is served from the disk cache when the same node (same
    inputs and upstream) already ran, in this process or an earlier one."""
    inner = cls.run  # type: ignore[attr-defined]

    @functools.wraps(inner)
    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await remember(lambda: inner(self, *args, **kwargs))

    cls.run = run  # type: ignore[attr-defined]
    return cls
