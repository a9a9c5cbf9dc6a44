"""Retries for provider calls: exponential backoff with full jitter, Retry-After, a time budget.

A call is retried when :func:`classify` (given by the caller) says the failure is transient: HTTP 429,
5xx, timeouts, dropped connections. The wait before attempt ``k`` is ``uniform(0, min(max_delay,
base * 2**k))``, raised to the server's Retry-After when it sent one. The retries stop when the attempts
run out or when the next wait would end past the budget; the last error is then raised unchanged, with
``attempts`` (and ``gave_up_wait_s`` when a wait did not fit the budget) set on it, so the node can name
the provider, status and request id.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kiln.providers")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    budget_s: float = 120.0
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0


@dataclass(frozen=True)
class Transient:
    """What classify returns for a failure worth retrying."""

    retry_after_s: float | None = None
    reason: str = ""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - (now if now is not None else time.time()))


def backoff_delay(attempt: int, policy: RetryPolicy, retry_after: float | None, rnd: float) -> float:
    """The wait after failed attempt number ``attempt`` (0-based)."""
    cap = min(policy.max_delay_s, policy.base_delay_s * (2 ** min(attempt, 60)))
    delay = cap * rnd
    if retry_after is not None:  # the server knows best; the time budget decides whether to wait that long
        delay = max(delay, retry_after)
    return delay


async def with_retries(
    call: Callable[[], Awaitable[Any]],
    policy: RetryPolicy,
    classify: Callable[[BaseException], Transient | None],
    *,
    what: str = "call",
    rng: Callable[[], float] = random.random,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> Any:
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            attempt += 1
            exc.attempts = attempt  # type: ignore[attr-defined]
            if verdict is None or attempt >= policy.max_attempts:
                raise
            delay = backoff_delay(attempt - 1, policy, verdict.retry_after_s, rng())
            if time.monotonic() - start + delay > policy.budget_s:
                exc.budget_exhausted = True  # type: ignore[attr-defined]
                exc.gave_up_wait_s = delay  # type: ignore[attr-defined]
                raise
            log.info(
                "%s failed (%s); retry %d/%d in %.2fs",
                what,
                verdict.reason or type(exc).__name__,
                attempt,
                policy.max_attempts - 1,
                delay,
            )
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await asyncio.sleep(delay)
