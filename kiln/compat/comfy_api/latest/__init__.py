"""``comfy_api.latest``: ComfyUI's V3 node API (``io.ComfyNode``, ``io.Schema``, ``ComfyExtension``), read
by Kiln as a third contract: each V3 class also answers the classic one (``INPUT_TYPES``,
``RETURN_TYPES``, ...), derived from its schema, so the engine runs it and ``/object_info`` shows it in the
V1 shape. See :func:`mappings_from_entrypoint` for how a pack's ``comfy_entrypoint`` becomes mappings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import Any

from .._api import ComfyAPI, ComfyAPISync
from . import _io as io, _ui as ui


class ComfyExtension:
    """What a V3 pack's ``comfy_entrypoint()`` returns: ``get_node_list()`` names its node classes."""

    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


def _resolve(value: Any) -> Any:
    """The value of a maybe-coroutine, also when called from inside a running event loop."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def mappings_from_entrypoint(module: Any) -> tuple[dict[str, type], dict[str, str]] | None:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` of a V3 pack (one with ``comfy_entrypoint``),
    None for a module that is not one. Raises what the pack's entrypoint raises."""
    entry = getattr(module, "comfy_entrypoint", None)
    if entry is None:
        return None
    if not callable(entry):
        raise TypeError("comfy_entrypoint is not callable")
    extension = _resolve(entry())
    if not isinstance(extension, ComfyExtension):
        raise TypeError(f"comfy_entrypoint() returned {type(extension).__name__}, not a ComfyExtension")
    _resolve(extension.on_load())
    mappings: dict[str, type] = {}
    names: dict[str, str] = {}
    for cls in _resolve(extension.get_node_list()) or []:
        schema = cls.GET_SCHEMA()
        mappings[schema.node_id] = cls
        if schema.display_name:
            names[schema.node_id] = schema.display_name
    return mappings, names


__all__ = ["ComfyAPI", "ComfyAPISync", "ComfyExtension", "io", "ui", "mappings_from_entrypoint"]
