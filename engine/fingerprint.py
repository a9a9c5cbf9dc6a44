"""Canonical, type-tagged encoding of literal values for content-addressed cache keys.

Never uses Python's ``hash()`` (salted per process). Fails closed: a value that cannot be encoded
(an unknown object, NaN, too deep or too large) raises :class:`Unfingerprintable`, and the node that
holds it becomes uncacheable.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

from .errors import KilnError

MAX_DEPTH = 64
MAX_BYTES = 8 * 1024 * 1024


class Unfingerprintable(KilnError):
    pass


def encode(value: Any, out: bytearray, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise Unfingerprintable("value nested too deeply")
    if len(out) > MAX_BYTES:
        raise Unfingerprintable("value too large")
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, int):
        s = format(value, "x").encode()  # hex: decimal str() refuses ints over 4300 digits
        out += b"i" + struct.pack(">I", len(s)) + s
    elif isinstance(value, float):
        if math.isnan(value):
            raise Unfingerprintable("NaN never equals itself")
        out += b"f" + struct.pack(">d", value)
    elif isinstance(value, str):
        b = value.encode("utf-8", "surrogatepass")
        out += b"s" + struct.pack(">I", len(b)) + b
    elif isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        out += b"b" + struct.pack(">I", len(b)) + b
    elif isinstance(value, (list, tuple)):
        out += (b"l" if isinstance(value, list) else b"t") + struct.pack(">I", len(value))
        for item in value:
            encode(item, out, depth + 1)
    elif isinstance(value, dict):
        try:
            items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, kv[0]))
        except TypeError as exc:
            raise Unfingerprintable("dict keys cannot be ordered") from exc
        out += b"d" + struct.pack(">I", len(items))
        for k, v in items:
            encode(k, out, depth + 1)
            encode(v, out, depth + 1)
    else:
        fp = getattr(value, "__kiln_fingerprint__", None)
        if fp is None:
            raise Unfingerprintable(f"cannot fingerprint a {type(value).__name__}")
        try:
            b = fp()
        except Exception as exc:  # fail closed: the node is just not cached
            raise Unfingerprintable(f"{type(value).__name__}.__kiln_fingerprint__ raised {exc!r}") from exc
        if not isinstance(b, (bytes, str)):
            raise Unfingerprintable(f"{type(value).__name__}.__kiln_fingerprint__ must return bytes or str")
        b = b.encode() if isinstance(b, str) else b
        out += b"o" + struct.pack(">I", len(b)) + b


def fingerprint(value: Any) -> bytes:
    """A 16-byte digest of the canonical encoding."""
    buf = bytearray()
    encode(value, buf)
    return hashlib.blake2b(bytes(buf), digest_size=16).digest()
