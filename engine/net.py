"""Host helpers shared by the layers above the engine (standard library only)."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


def is_loopback_host(host: str) -> bool:
    """True for a host name or address that only this machine can reach: ``localhost``, names under
    ``.localhost``, ``ip6-localhost`` and loopback addresses (IPv6 ones with or without brackets)."""
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
