"""``ComfyAPI`` / ``ComfyAPISync``: the object a pack creates at import (``api = ComfyAPI()``) to report
progress of the node that is running, from async or plain code, without holding a ``ProgressBar``.

Only ``execution.set_progress`` exists here (what packs call); it reports through Kiln's progress events of
the node running in this context, so it reaches the same clients and is a cancellation point. Progress is
whole numbers in Kiln's events: a fractional ``value``/``max_value`` (``0.37`` of ``1.0``) is sent as
per-mille (``370`` of ``1000``).
"""

from __future__ import annotations

from typing import Any

from kiln.engine import Preview, context as _context

_SCALE = 1000


def _whole(value: float, max_value: float) -> tuple[int, int]:
    if float(value).is_integer() and float(max_value).is_integer() and max_value >= 1:
        return int(value), int(max_value)
    if max_value <= 0:
        return 0, 1
    return round(min(max(value / max_value, 0.0), 1.0) * _SCALE), _SCALE


def set_progress(
    value: float,
    max_value: float,
    node_id: str | None = None,
    preview_image: Any = None,
    ignore_size_limit: bool = False,
) -> None:
    """Report ``value`` of ``max_value`` for the running node. Raises outside a node's execution (there is
    no node to report for), as ComfyUI does; ``node_id``, when given, must be the running node."""
    ctx = _context.current()
    if ctx is None:
        raise RuntimeError("set_progress called outside of a node's execution")
    if node_id is not None and str(node_id) not in {str(ctx.node_id), str(ctx.display_id), str(ctx.real_id)}:
        raise ValueError(f"set_progress for node {node_id!r}, but node {ctx.node_id!r} is running")
    v, m = _whole(float(value), float(max_value))
    ctx.progress(v, m, preview_image if isinstance(preview_image, Preview) else None)


class _AsyncExecution:
    async def set_progress(
        self,
        value: float,
        max_value: float,
        node_id: str | None = None,
        preview_image: Any = None,
        ignore_size_limit: bool = False,
    ) -> None:
        set_progress(value, max_value, node_id, preview_image, ignore_size_limit)


class _SyncExecution:
    def set_progress(
        self,
        value: float,
        max_value: float,
        node_id: str | None = None,
        preview_image: Any = None,
        ignore_size_limit: bool = False,
    ) -> None:
        set_progress(value, max_value, node_id, preview_image, ignore_size_limit)


class ComfyAPI:
    """The async flavour: ``await api.execution.set_progress(value, max_value)``."""

    def __init__(self) -> None:
        self.execution = _AsyncExecution()


class ComfyAPISync:
    """The plain flavour: ``api.execution.set_progress(value, max_value)``."""

    def __init__(self) -> None:
        self.execution = _SyncExecution()


__all__ = ["ComfyAPI", "ComfyAPISync", "set_progress"]
