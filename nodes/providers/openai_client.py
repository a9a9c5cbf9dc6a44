"""The official ``openai`` SDK, as the OpenAI node family uses it.

- One ``AsyncOpenAI`` per (event loop, base URL, key, timeout), reused by every node on that loop:
  building a client costs an SSL context, which twenty concurrent nodes should not pay twenty times.
- The SDK's own retries are off (``max_retries=0``): :mod:`.retry` does them, with jitter, Retry-After
  and a time budget that the config controls.
- SDK errors become :class:`engine.NodeError` messages that name the endpoint, the HTTP status and the
  request id and say what to change; keys are redacted from anything surfaced.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.engine import NodeError

from .config import Profile, redact
from .http import status_hint
from .retry import Transient, parse_retry_after, with_retries

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, Any]] = weakref.WeakKeyDictionary()

CONTENT_POLICY_CODES = {"content_policy_violation", "moderation_blocked", "content_filter", "safety_violation"}


def sdk():
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise NodeError(
            "the OpenAI nodes need the 'openai' package",
            hint='pip install -e ".[openai]" from your Kiln checkout (or pip install openai)',
        ) from exc
    return openai


def client(base_url: str, api_key: str | None, timeout_s: float) -> Any:
    openai = sdk()
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    key = (base_url, api_key, timeout_s)
    c = per_loop.get(key)
    if c is None:
        c = openai.AsyncOpenAI(
            api_key=api_key or "no-key-for-local-endpoint", base_url=base_url, max_retries=0, timeout=timeout_s
        )
        per_loop[key] = c
    return c


def _headers(exc: BaseException) -> Any:
    resp = getattr(exc, "response", None)
    return getattr(resp, "headers", None) or {}


def classify(exc: BaseException) -> Transient | None:
    openai = sdk()
    if isinstance(exc, openai.APITimeoutError):
        return Transient(reason="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return Transient(reason="connection error")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429 or status >= 500 or status == 408:
            h = _headers(exc)
            ra = None
            ms = h.get("retry-after-ms") if hasattr(h, "get") else None
            if ms:
                try:
                    ra = float(ms) / 1000.0
                except ValueError:
                    ra = None
            if ra is None and hasattr(h, "get"):
                ra = parse_retry_after(h.get("retry-after"))
            return Transient(retry_after_s=ra, reason=f"HTTP {status}")
    return None


def _error_body(exc: Any) -> dict:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        return inner
    return {}


def to_node_error(
    exc: BaseException, *, endpoint: str, base_url: str, inputs: set[str], what: str = "request"
) -> NodeError:
    """A NodeError that says what went wrong and what to change."""
    openai = sdk()
    attempts = getattr(exc, "attempts", 1)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    wait = getattr(exc, "gave_up_wait_s", None)
    if wait is not None:
        tries += f" (gave up rather than wait {wait:.0f}s more, past the retry budget)"
    where = f"endpoint '{endpoint}' ({base_url})"
    if isinstance(exc, openai.APITimeoutError):
        return NodeError(
            f"{what} to {where} timed out{tries}",
            hint=f"raise providers.{endpoint}.timeout_s in the config, or try again later",
        )
    if isinstance(exc, openai.APIConnectionError):
        return NodeError(
            redact(f"{what} to {where} could not connect{tries}: {exc.__cause__ or exc}"),
            hint="check the base_url and your network",
        )
    if isinstance(exc, openai.APIStatusError):
        info = _error_body(exc)
        status = exc.status_code
        rid = exc.request_id or "none"
        msg = redact(info.get("message") or str(exc))
        code = info.get("code") or ""
        param = info.get("param")
        head = f"{where} answered HTTP {status} (request id {rid}){tries}: {msg}"
        known = status_hint(status, endpoint)
        if known is not None and status in (401, 402, 403):  # these win over a policy code in the body
            return NodeError(head, input_name=known[0], hint=known[1])
        if code in CONTENT_POLICY_CODES or "safety system" in msg.lower():
            return NodeError(
                head,
                input_name="prompt",
                hint="the provider's content policy refused it: rephrase the prompt or change the "
                "input images (gpt-image-1 also accepts moderation=low)",
            )
        if known is not None:
            return NodeError(head, input_name=known[0], hint=known[1])
        input_name = param if isinstance(param, str) and param in inputs else None
        return NodeError(head, input_name=input_name, hint="change the input the provider names above")
    if isinstance(exc, (openai.APIError, ValueError)):  # includes JSON decode and response validation errors
        return NodeError(
            redact(f"{where} sent a response Kiln cannot read: {type(exc).__name__}: {exc}"),
            hint="the endpoint may not implement this API; check base_url",
        )
    return NodeError(redact(f"{what} to {where} failed: {type(exc).__name__}: {exc}"))


async def call(
    fn: Callable[[], Awaitable[Any]], profile: Profile, *, endpoint: str, base_url: str, inputs: set[str], what: str
) -> Any:
    """Run ``fn`` with retries; map the final failure to a NodeError."""
    try:
        return await with_retries(fn, profile.retry, classify, what=f"{what} to {endpoint}")
    except asyncio.CancelledError:
        raise
    except NodeError:
        raise
    except Exception as exc:
        raise to_node_error(exc, endpoint=endpoint, base_url=base_url, inputs=inputs, what=what) from None
