"""The model manager: each model file is loaded once and shared, least-recently-used ones are evicted.

Entries are keyed by (kind, resolved path, mtime, size, dtype, device), so an edited file is a new entry
and a stale one can never be served. Past the memory budget the least recently used entries are
dropped (the loaded modules are freed once no handle refers to them any more).

Defaults: CUDA when present, else CPU; fp16 on CUDA, fp32 on CPU. Override with ``KILN_DEVICE``,
``KILN_DTYPE`` (fp32, fp16, bf16) and ``KILN_MODEL_MEMORY_GB``, or by constructing a manager and putting it
in the executor's ``services["model_manager"]``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln import engine

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def default_device() -> torch.device:
    name = os.environ.get("KILN_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    name = os.environ.get("KILN_DTYPE")
    if name:
        if name.lower() not in _DTYPES:
            raise ValueError(f"KILN_DTYPE={name!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[name.lower()]
    return torch.float16 if device.type == "cuda" else torch.float32


def _default_budget() -> int:
    gb = os.environ.get("KILN_MODEL_MEMORY_GB")
    if gb:
        return int(float(gb) * 2**30)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(total * 0.6)


def file_identity(path: Path) -> tuple[str, int, int]:
    """(resolved path, mtime in ns, size); for a folder, the newest mtime and total size of its files."""
    p = Path(path).resolve()
    if p.is_dir():
        mtime, size = 0, 0
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                mtime, size = max(mtime, st.st_mtime_ns), size + st.st_size
        return str(p), mtime, size
    st = p.stat()
    return str(p), st.st_mtime_ns, st.st_size


def module_bytes(obj: Any) -> int:
    """Bytes of the distinct parameters and buffers of every module reachable from ``obj`` (through
    attributes, dicts, lists and tuples, a few levels deep)."""
    seen_modules: set[int] = set()
    seen_tensors: set[int] = set()
    total = 0

    def walk(o: Any, depth: int) -> None:
        nonlocal total
        if depth > 4 or id(o) in seen_modules:
            return
        if isinstance(o, torch.nn.Module):
            seen_modules.add(id(o))
            for t in list(o.parameters()) + list(o.buffers()):
                if t.is_meta or id(t) in seen_tensors:
                    continue
                seen_tensors.add(id(t))
                total += t.numel() * t.element_size()
            return
        if isinstance(o, dict):
            items = list(o.values())
        elif isinstance(o, (list, tuple)):
            items = list(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            seen_modules.add(id(o))
            items = list(vars(o).values())
        else:
            return
        for v in items:
            walk(v, depth + 1)

    walk(obj, 0)
    return total


@dataclass
class _Entry:
    value: Any
    size: int


class ModelManager:
    def __init__(
        self,
        budget_bytes: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.budget = budget_bytes if budget_bytes is not None else _default_budget()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # files actually read from disk, for tests and benchmarks
        self.evictions = 0  # models dropped to stay within the budget
        self.hits = 0

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def key(self, kind: str, path: Path, dtype: torch.dtype | None = None, device: torch.device | None = None) -> tuple:
        ident = file_identity(path)
        return (kind, *ident, str(dtype or self.dtype), str(device or self.device))

    def get(
        self,
        kind: str,
        path: Path,
        loader: Callable[[Path, torch.dtype, torch.device], Any],
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Any:
        """The loaded model for ``path``: from memory, else ``loader(path, dtype, device)``."""
        dtype, device = dtype or self.dtype, device or self.device
        key = self.key(kind, path, dtype, device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                self._evict(keep=key)
                return entry.value
            value = loader(Path(path), dtype, device)
            self.loads += 1
            self._entries[key] = _Entry(value, module_bytes(value))
            self._evict(keep=key)
            return value

    def _evict(self, keep: tuple) -> None:
        while self.used_bytes > self.budget and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self._entries.pop(oldest)
            self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_default: ModelManager | None = None
_default_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The executor's manager (``services["model_manager"]``) inside a run, else a process-wide one."""
    global _default
    ctx = engine.current()
    if ctx is not None:
        m = ctx.run.services.get("model_manager")
        if m is not None:
            return m
    with _default_lock:
        if _default is None:
            _default = ModelManager()
        return _default


def folders() -> engine.Folders:
    """The Folders of the running/validating executor, else the process default (see engine.get_folders)."""
    return engine.get_folders()
