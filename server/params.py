"""Strict input and output: JSON bodies, query parameters and JSON answers, one parser for every route.

- Request JSON: UTF-8, no ``NaN``/``Infinity``/``-Infinity``, no number that overflows a float (``1e400``), no
  integer literal longer than ``MAX_INT_DIGITS`` digits, bounded nesting. Anything else is a typed 400.
- Query parameters: :func:`query_int`, :func:`query_float` and :func:`query_bool` parse and bound a value or
  raise :class:`BadParam` (answered as a 400 by the error middleware); ``nan``, ``inf`` and numbers past their
  bound are refused, never clamped silently into something else.
- JSON answers and stored JSON: :func:`dumps` never writes ``NaN``/``Infinity`` (they become ``null``) and
  :func:`json_response` uses it, so every body Kiln sends is strict JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import re
import threading
from typing import Any

import orjson
from aiohttp import web

from kiln.engine import KilnError

MAX_INT_DIGITS = 40  # 2**128 has 39 digits: room for any seed, none for a 400-digit number
MAX_JSON_DEPTH_ERROR = "JSON is nested too deeply"


class BadParam(KilnError, ValueError):
    """A request value that is not acceptable; ``type_`` and ``message`` form the 400 body."""

    def __init__(self, message: str, details: str = "", type_: str = "bad_request"):
        super().__init__(message)
        self.type_ = type_
        self.message = message
        self.details = details


# -- request JSON -----------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise BadParam(f"JSON contains {name}, which is not valid JSON", "use a finite number", "invalid_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadParam(f"number {text[:40]!r} is out of range", "numbers must be finite doubles", "invalid_json")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise BadParam(
            f"integer with {digits} digits is out of range", f"at most {MAX_INT_DIGITS} digits", "invalid_json"
        )
    return int(text)


_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate can get into decoded JSON


def _check_strings(obj: Any) -> None:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            check_text(o, "a JSON string", nul_ok=True)
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


TOO_LONG = "\0kiln:too-long:"  # what an over-long string decodes to (followed by its length in bytes)


def elide_long_strings(raw: Any, limit: int) -> Any:
    """``raw`` (JSON bytes or text) with every string longer than ``limit`` bytes replaced by the string
    ``TOO_LONG + length``, so that decoding never spends one long, GIL-holding call on a string that is
    refused anyway. Cheap when there is none: a quote-free stretch of ``limit / 2`` is looked for first."""
    quote, backslash = (b'"', 0x5C) if isinstance(raw, (bytes, bytearray)) else ('"', "\\")
    n, w = len(raw), max(1, limit // 2)
    if not any(raw.find(quote, a, a + w) == -1 for a in range(0, n - w + 1, w)):
        return raw  # every string is shorter than a window
    out: list = []
    last = pos = start = 0
    in_string = False
    while (q := raw.find(quote, pos)) != -1:
        pos = q + 1
        if not in_string:
            in_string, start = True, q
            continue
        k = q - 1
        while k > start and raw[k] == backslash:
            k -= 1
        if (q - 1 - k) % 2:  # an escaped quote
            continue
        in_string = False
        if q - start - 1 > limit:
            marker = f'"\\u0000kiln:too-long:{q - start - 1}"'
            out += [raw[last:start], marker.encode() if isinstance(raw, (bytes, bytearray)) else marker]
            last = q + 1
    if not out:
        return raw
    out.append(raw[last:])
    return (b"" if isinstance(raw, (bytes, bytearray)) else "").join(out)


def loads(raw: str | bytes | bytearray, max_string: int | None = None) -> Any:
    """Decode request JSON strictly (see the module docstring); raises :class:`BadParam`. With
    ``max_string``, strings longer than that many bytes decode as ``TOO_LONG + length`` (see
    :func:`elide_long_strings`), for the caller to refuse by name."""
    if max_string is not None and len(raw) > max_string:
        raw = elide_long_strings(raw, max_string)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadParam("JSON is not valid UTF-8", f"byte {exc.start}: {exc.reason}", "invalid_json") from None
    else:
        text = raw
    try:
        value = _DECODER.decode(text)
        if "\\u" in text and _SURROGATE_ESCAPE.search(
            text
        ):  # paired escapes decode to one character; lone ones are refused
            _check_strings(value)
        return value
    except BadParam:
        raise
    except RecursionError:
        raise BadParam(MAX_JSON_DEPTH_ERROR, "flatten the structure", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise BadParam(
            "JSON is malformed", f"line {exc.lineno} column {exc.colno}: {exc.msg}", "invalid_json"
        ) from None
    except ValueError as exc:  # anything else the decoder refuses
        raise BadParam("JSON contains a value Kiln cannot read", str(exc)[:200], "invalid_json") from None


# -- answers and stored JSON ------------------------------------------------------------------------
def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (how Kiln writes NaN and infinities: null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


# orjson refuses (and the standard library then writes) what it would write its own way: dataclasses, dates,
# subclasses of str/int/dict/list (enums among them); and what it cannot: ints past 64 bits, lone surrogates
_ORJSON = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
_ORJSON |= orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps(obj: Any, compact: bool = True) -> str:
    """Strict JSON text: NaN and infinities are written as null, never as bare ``NaN``/``Infinity``.

    Compact text comes from orjson (every websocket message goes through here: the standard library took a
    sixth of a busy server's time), and from the standard library for what orjson refuses."""
    if compact:
        try:
            return orjson.dumps(obj, option=_ORJSON).decode()
        except (TypeError, orjson.JSONEncodeError):
            pass
    seps = (",", ":") if compact else None
    try:
        text = json.dumps(obj, separators=seps, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a non-finite float somewhere (a node's UI output, say): rare, so scrub only then
        obj = finite(obj)
        text = json.dumps(obj, separators=seps, ensure_ascii=False, allow_nan=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a node: escape it, so the text stays valid UTF-8
            text = json.dumps(obj, separators=seps, ensure_ascii=True, allow_nan=False)
    return text


PIECE = 512  # items per encode call in dumps_in_pieces


def dumps_in_pieces(obj: Any, depth: int = 3, **kw: Any) -> str:
    """``json.dumps(obj, **kw)`` (the same text; default separators) made of encode calls over at most
    ``PIECE`` items each, down to ``depth`` levels. One call over a 100,000-node graph holds the GIL for the
    whole encode, and the event loop thread with it; many short calls let it run in between."""
    encode = json.JSONEncoder(**kw).encode
    sort = bool(kw.get("sort_keys"))

    def piece(o: Any, level: int) -> str:
        if level <= 0 or not isinstance(o, (dict, list, tuple)) or not o:
            return encode(o)
        if isinstance(o, dict):
            if not all(isinstance(k, str) for k in o):
                return encode(o)
            keys = sorted(o) if sort else list(o)
            if len(keys) > PIECE:
                chunks = (keys[i : i + PIECE] for i in range(0, len(keys), PIECE))
                return "{" + ", ".join(encode({k: o[k] for k in c})[1:-1] for c in chunks) + "}"
            return "{" + ", ".join(encode(k) + ": " + piece(o[k], level - 1) for k in keys) + "}"
        items = list(o)
        if len(items) > PIECE:
            return "[" + ", ".join(encode(items[i : i + PIECE])[1:-1] for i in range(0, len(items), PIECE)) + "]"
        return "[" + ", ".join(piece(v, level - 1) for v in items) + "]"

    return piece(obj, depth)


def strict_text(obj: Any) -> str:
    """Strict JSON text of a possibly huge object, encoded in pieces (for a worker thread)."""
    try:
        return dumps_in_pieces(obj, allow_nan=False)
    except ValueError:
        return dumps_in_pieces(finite(obj), allow_nan=False)


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    """A strict JSON answer: non-finite numbers as null, non-ASCII escaped (a lone surrogate too, as \\u)."""
    try:
        body = json.dumps(data, allow_nan=False)
    except ValueError:
        body = json.dumps(finite(data), allow_nan=False)
    return web.Response(body=body.encode(), status=status, content_type="application/json", headers=headers)


# -- query parameters -------------------------------------------------------------------------------
def _raw(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None:
        return None
    value = value.strip()
    if len(value) > 64:
        raise BadParam(f"{name} is too long", f"{name} must be a short number")
    return value


def query_int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer query parameter in [lo, hi]; ``default`` when absent."""
    value = _raw(request, name)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadParam(f"{name} must be an integer", f"got {value!r}") from None
    if not lo <= n <= hi:
        raise BadParam(f"{name} is out of range", f"{name} must be between {lo} and {hi}")
    return n


def query_float(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    """A finite number query parameter in [lo, hi]; ``default`` when absent. nan and inf are refused."""
    value = _raw(request, name)
    if value is None or value == "":
        return default
    try:
        x = float(value)
    except ValueError:
        raise BadParam(f"{name} must be a number", f"got {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise BadParam(f"{name} is out of range", f"{name} must be a finite number between {lo:g} and {hi:g}")
    return x


def query_bool(request: web.Request, name: str) -> bool:
    value = _raw(request, name)
    return value is not None and value.lower() in ("1", "true", "yes")


def query_str(request: web.Request, name: str, default: str = "", limit: int = 4096) -> str:
    """A text query parameter; refuses lone surrogates and NUL bytes, and anything past ``limit`` chars."""
    value = request.query.get(name)
    if value is None:
        return default
    if len(value) > limit:
        raise BadParam(f"{name} is too long", f"at most {limit} characters")
    return check_text(value, name)


def check_text(value: str, what: str, nul_ok: bool = False) -> str:
    """``value`` if it is encodable text (no lone surrogates, no NUL); else :class:`BadParam`."""
    if not nul_ok and "\0" in value:
        raise BadParam(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParam(f"{what} is not valid text", "it contains a lone surrogate code point") from None
    return value


# -- heavy request work -----------------------------------------------------------------------------
_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


async def off_loop(fn, *args):
    """Run ``fn(*args)`` in a worker thread with the cyclic garbage collector paused meanwhile.

    Decoding or validating a huge request allocates hundreds of thousands of objects, which triggers full
    collections; each one holds the GIL for the whole heap walk (over half a second with a 30,000-node graph)
    and the event loop with it. The objects made here are acyclic (freed by reference counting) or live on
    in the queue, so pausing the collector for the duration costs nothing.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()
