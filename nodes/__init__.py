"""Kiln's built-in node packs, one family per module.

Every module in this package that defines ``NODES`` (a list of node classes) is a family and is
registered by :func:`register_builtin`. A family that fails to import (a missing optional dependency,
say) is reported in ``registry.load_errors`` and skipped; the others still load.
"""

from __future__ import annotations

import importlib
import pkgutil

from kiln.engine import Registry


def family_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and not m.ispkg and m.name != "common"
    )


def register_builtin(registry: Registry) -> Registry:
    for name in family_modules():
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except Exception as exc:  # optional dependency missing: report, keep going
            registry.record_load_error(f"nodes.{name}", exc)
            continue
        if hasattr(mod, "NODES"):
            for cls in mod.NODES:
                try:
                    registry.register(cls, python_module="nodes")
                except Exception as exc:
                    registry.record_load_error(f"nodes.{name}:{getattr(cls, '__name__', cls)}", exc)
            registry.packs.append(f"nodes.{name}")
    return registry
