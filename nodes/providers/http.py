"""Plain-HTTP JSON calls for providers without an SDK in Kiln (Replicate, Google Imagen), on aiohttp.

Each node run opens one ``ClientSession`` (``async with http.session() as s``) for all its requests, so
connections are reused within a run and nothing is left open after it. Transient failures (429, 5xx, timeouts,
dropped connections) are retried by :mod:`.retry`; the final failure becomes a NodeError that names the
provider, the HTTP status and the request id, with the key redacted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.engine import KilnError, NodeError

from .config import Profile, redact
from .retry import Transient, parse_retry_after, with_retries

REQUEST_ID_HEADERS = ("x-request-id", "x-goog-request-id", "x-cloud-trace-context", "request-id", "cf-ray")


@dataclass
class HttpFailure(KilnError):
    """A non-2xx answer; :func:`request` retries it or turns it into a NodeError, so nodes never see it."""

    status: int
    body: Any
    request_id: str | None
    headers: Any

    def __str__(self) -> str:
        return f"HTTP {self.status}"


def session() -> Any:
    """A fresh aiohttp session; use it as ``async with``."""
    import aiohttp

    return aiohttp.ClientSession()


def request_id(headers: Any) -> str | None:
    for h in REQUEST_ID_HEADERS:
        v = headers.get(h) if headers is not None else None
        if v:
            return v
    return None


def classify(exc: BaseException) -> Transient | None:
    import aiohttp

    if isinstance(exc, asyncio.TimeoutError):
        return Transient(reason="timeout")
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return Transient(reason="connection error")
    if isinstance(exc, HttpFailure) and (exc.status == 429 or exc.status >= 500 or exc.status == 408):
        return Transient(retry_after_s=parse_retry_after(exc.headers.get("Retry-After")), reason=f"HTTP {exc.status}")
    return None


async def _once(s: Any, method: str, url: str, headers: dict, body: Any, timeout_s: float) -> tuple[Any, Any]:
    import aiohttp

    async with s.request(
        method, url, headers=headers, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as resp:
        raw = await resp.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw[:500].decode("utf-8", "replace")
            if resp.status < 400:
                raise NodeError(
                    f"{url} answered HTTP {resp.status} with a body that is not JSON: {data[:120]!r}",
                    hint="the endpoint may not implement this API; check base_url",
                ) from None
        if resp.status >= 400:
            raise HttpFailure(resp.status, data, request_id(resp.headers), resp.headers)
        return data, resp.headers


async def request(
    s: Any,
    method: str,
    url: str,
    *,
    profile: Profile,
    provider: str,
    headers: dict,
    body: Any = None,
    what: str,
    describe: Callable[[HttpFailure], NodeError] | None = None,
    timeout_s: float | None = None,
) -> tuple[Any, Any]:
    """(JSON body, headers) of a successful call, after retries; NodeError otherwise."""
    try:
        return await with_retries(
            lambda: _once(s, method, url, headers, body, timeout_s or profile.timeout_s),
            profile.retry,
            classify,
            what=f"{what} to {provider}",
        )
    except (asyncio.CancelledError, NodeError):
        raise
    except HttpFailure as exc:
        if describe is not None:
            err = describe(exc)
            if err is not None:
                raise err from None
        raise generic_error(exc, provider=provider, what=what) from None
    except asyncio.TimeoutError as exc:
        raise NodeError(
            f"{what} to {provider} timed out after {getattr(exc, 'attempts', 1)} attempt(s)",
            hint=f"raise providers.{profile.name}.timeout_s in the config, or try later",
        ) from None
    except Exception as exc:
        attempts = getattr(exc, "attempts", 1)
        raise NodeError(
            redact(f"{what} to {provider} failed after {attempts} attempt(s): {type(exc).__name__}: {exc}"),
            hint="check the base_url and your network",
        ) from None


def message_of(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        for k in ("detail", "message", "title", "error"):
            if body.get(k):
                return str(body[k])
        return json.dumps(body)[:500]
    return str(body)[:500]


def status_hint(status: int, profile: str) -> tuple[str | None, str] | None:
    """(input name, hint) for an HTTP error status that means the same at every provider, for the profile
    named ``profile``; None for the statuses whose meaning depends on the request (400, 409, 422...).
    Shared by these plain-HTTP providers and the OpenAI SDK's errors (:mod:`.openai_client`)."""
    if status == 401:
        return None, (
            f"the API key was rejected: set a valid key for profile '{profile}' in its environment "
            f"variable or the config file"
        )
    if status == 402:
        return None, "the account is out of credit: add billing details with the provider"
    if status == 403:
        return None, (
            "this key lacks access to the model or feature (some models need a verified organisation or account)"
        )
    if status == 404:
        return "model", "check the model name exists on this endpoint"
    if status == 429 or status >= 500:
        return None, (
            f"the provider is overloaded or failing; try again later or raise providers.{profile}.retries in the config"
        )
    return None


def generic_error(exc: HttpFailure, *, provider: str, what: str) -> NodeError:
    attempts = getattr(exc, "attempts", 1)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    wait = getattr(exc, "gave_up_wait_s", None)
    if wait is not None:
        tries += f" (gave up rather than wait {wait:.0f}s more, past the retry budget)"
    head = (
        f"{what} to {provider}: HTTP {exc.status} (request id {exc.request_id or 'none'}){tries}: "
        f"{redact(message_of(exc.body))}"
    )
    known = status_hint(exc.status, provider)
    if known is not None:
        return NodeError(head, input_name=known[0], hint=known[1])
    return NodeError(head, hint="change the input the provider names above")
