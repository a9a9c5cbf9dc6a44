"""ComfyUI's ``comfy`` package as packs see it under Kiln: ``utils``, ``model_management``, ``samplers``,
``cli_args``, ``comfy_types``. Any other ``comfy.*`` module is ComfyUI's model runtime (stubbed)."""

from __future__ import annotations

import importlib
import sys
from typing import Any


def __getattr__(name: str) -> Any:
    """``comfy.sd1_clip`` read as an attribute without importing it first (ComfyUI's own imports make that
    work there): the submodule, imported now (Kiln's, or a runtime stub)."""
    if name.startswith("__"):
        raise AttributeError(name)
    aliased = sys.modules.get("comfy") is sys.modules[__name__]
    try:
        module = importlib.import_module(f"comfy.{name}" if aliased else f"{__name__}.{name}")
    except ImportError:
        if aliased:
            raise AttributeError(f"module 'comfy' has no attribute {name!r}") from None
        from .._runtime import RuntimeStubModule

        module = RuntimeStubModule(f"comfy.{name}")
        module.__path__ = []
    globals()[name] = module
    return module
