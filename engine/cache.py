"""Output caches: what survives between runs.

Entries are keyed by the content-addressed key the executor computes (never by node id). Policies:

- ``keep-current`` (default, ComfyUI's classic): at each run, drop entries the new graph does not use.
- ``lru:N``: keep up to N entries across runs, least recently used out first, never the current run's.
- ``ram:SIZE``: keep entries while their estimated size fits SIZE bytes (``ram:4GB``); evicts the largest
  and cheapest to recompute first, older runs before newer.
- ``none``: keep nothing between runs.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class CacheEntry:
    outputs: list  # one list of values per output slot
    ui: dict | None
    seconds: float = 0.0  # time it took to compute
    size: int = 0  # estimated bytes
    generation: int = 0


def estimate_size(value: Any, _depth: int = 0) -> int:
    """Rough byte size of tensors/arrays inside a value (objects may define ``__kiln_sizeof__``)."""
    if type(value) is list and _depth == 0:  # executor output slots: [[value, ...], ...]
        total = 0
        for slot in value:
            for item in slot if type(slot) is list else (slot,):
                nb = getattr(item, "nbytes", None)
                total += nb if type(nb) is int else estimate_size(item, 1)
        return total
    if _depth > 8 or value is None or isinstance(value, (bool, int, float)):
        return 0
    f = getattr(value, "__kiln_sizeof__", None)
    if f is not None:
        try:
            return int(f())
        except Exception:
            return 0
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        try:
            return int(value.element_size() * value.nelement())
        except Exception:
            return 0
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        return sum(estimate_size(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(estimate_size(v, _depth + 1) for v in value)
    return 0


class Cache:
    """Base class; subclasses choose what to keep."""

    name = "base"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> CacheEntry | None:
        raise NotImplementedError

    def put(self, key: bytes, entry: CacheEntry) -> None:
        raise NotImplementedError

    def begin_run(self, keys_in_use: Iterable[bytes]) -> None:
        self.generation += 1

    def clear(self) -> None:
        pass

    def __len__(self) -> int:
        return 0

    def __contains__(self, key: bytes) -> bool:
        """True if ``key`` is held now (a probe: it neither counts as a hit nor refreshes the entry)."""
        return False

    def describe(self) -> str:
        return self.name


class _DictCache(Cache):
    def __init__(self) -> None:
        super().__init__()
        self._d: OrderedDict[bytes, CacheEntry] = OrderedDict()

    def get(self, key: bytes) -> CacheEntry | None:
        with self._lock:
            e = self._d.get(key)
            if e is None:
                self.misses += 1
                return None
            self.hits += 1
            self._d.move_to_end(key)
            e.generation = self.generation
            return e

    def put(self, key: bytes, entry: CacheEntry) -> None:
        with self._lock:
            entry.generation = self.generation
            self._d[key] = entry
            self._d.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        pass

    def begin_run(self, keys_in_use: Iterable[bytes]) -> None:
        """A new run: every entry its graph uses belongs to the current generation (most recently used),
        even where the run will stop walking upstream at a cached descendant and never read it."""
        super().begin_run(keys_in_use)
        with self._lock:
            for k in keys_in_use:
                e = self._d.get(k)
                if e is not None:
                    e.generation = self.generation
                    self._d.move_to_end(k)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: bytes) -> bool:
        return key in self._d

    def total_size(self) -> int:
        return sum(e.size for e in self._d.values())


class KeepCurrentCache(_DictCache):
    name = "keep-current"

    def begin_run(self, keys_in_use: Iterable[bytes]) -> None:
        keep = set(keys_in_use)
        Cache.begin_run(self, keep)
        with self._lock:
            for k in [k for k in self._d if k not in keep]:
                del self._d[k]


class LRUCache(_DictCache):
    name = "lru"

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        if max_entries < 1:
            raise ValueError("an LRU cache needs at least 1 entry")
        self.max_entries = max_entries

    def _evict(self) -> None:
        while len(self._d) > self.max_entries:
            oldest_key, oldest = next(iter(self._d.items()))
            if oldest.generation >= self.generation:
                break  # never evict what the current run made or used
            del self._d[oldest_key]

    def describe(self) -> str:
        return f"lru:{self.max_entries}"


class RAMBudgetCache(_DictCache):
    name = "ram"

    def __init__(self, budget_bytes: int) -> None:
        super().__init__()
        self.budget = int(budget_bytes)
        self._total = 0

    def put(self, key: bytes, entry: CacheEntry) -> None:
        with self._lock:
            old = self._d.get(key)
            if old is not None:
                self._total -= old.size
            entry.generation = self.generation
            self._d[key] = entry
            self._total += entry.size
            self._evict()

    def _score(self, e: CacheEntry) -> float:
        age = max(0, self.generation - e.generation)
        return (1.5**age) * (e.size + 1) / (e.seconds + 1e-3)

    # Once over budget, evict down to this fraction of it: ranking every entry costs a sort, and
    # doing that at each put while the cache sits at its budget made a long run quadratic.
    LOW_WATER = 0.9

    def _evict(self) -> None:
        if self._total <= self.budget:
            return
        target = self.budget * self.LOW_WATER
        victims = sorted(self._d.items(), key=lambda kv: self._score(kv[1]), reverse=True)
        for k, e in victims:
            if self._total <= target:
                break
            del self._d[k]
            self._total -= e.size

    def clear(self) -> None:
        super().clear()
        self._total = 0

    def total_size(self) -> int:
        return self._total

    def describe(self) -> str:
        return f"ram:{self.budget}"


class NoCache(Cache):
    name = "none"

    def get(self, key: bytes) -> CacheEntry | None:
        self.misses += 1
        return None

    def put(self, key: bytes, entry: CacheEntry) -> None:
        pass


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "KIB": 1024,
    "M": 1e6,
    "MB": 1e6,
    "MIB": 1024**2,
    "G": 1e9,
    "GB": 1e9,
    "GIB": 1024**3,
    "T": 1e12,
    "TB": 1e12,
    "TIB": 1024**4,
}


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 512MB, 4GB or 1073741824")
    return int(float(m.group(1)) * _UNITS[unit])


def make_cache(policy: str | Cache | None) -> Cache:
    """Build a cache from a policy string: keep-current, lru:N, ram:SIZE, none."""
    if isinstance(policy, Cache):
        return policy
    p = (policy or "keep-current").strip().lower()
    if p in ("keep-current", "classic", "default"):
        return KeepCurrentCache()
    if p == "none":
        return NoCache()
    kind, colon, arg = p.partition(":")
    if kind == "lru":
        try:
            n = int(arg)
            if n < 1:
                raise ValueError(n)
        except ValueError:
            raise ValueError(
                f"bad cache policy {policy!r}: write lru:N with a whole number N >= 1, e.g. lru:100"
            ) from None
        return LRUCache(n)
    if kind == "ram":
        try:
            size = parse_size(arg)
        except ValueError:
            raise ValueError(f"bad cache policy {policy!r}: write ram:SIZE, e.g. ram:4GB or ram:512MB") from None
        return RAMBudgetCache(size)
    raise ValueError(f"unknown cache policy {policy!r}; use keep-current, lru:N, ram:SIZE or none")
