"""The meta-path finder that makes ComfyUI's top-level module names resolve to :mod:`kiln.compat`.

``import folder_paths`` in a pack gets ``kiln.compat.folder_paths``; ``import comfy.utils`` gets
``kiln.compat.comfy.utils``; a ``comfy.*`` / ``comfy_extras.*`` module Kiln does not write (the model
runtime) gets a :class:`~kiln.compat._runtime.RuntimeStubModule`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import types
from collections.abc import Sequence

from ._runtime import StubLoader

# ComfyUI top-level name -> module under kiln.compat
SURFACE = {
    "folder_paths": "folder_paths",
    "comfy": "comfy",
    "comfy_execution": "comfy_execution",
    "comfy_api": "comfy_api",
    "comfy_extras": "comfy_extras",
    "nodes": "nodes",
    "server": "server",
    "node_helpers": "node_helpers",
    "latent_preview": "latent_preview",
    "execution": "execution",
}
# names under which any unknown submodule is ComfyUI's model runtime (stubbed, never an error at import)
RUNTIME_PACKAGES = ("comfy", "comfy_extras", "comfy_api")


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class CompatFinder(importlib.abc.MetaPathFinder):
    """Resolves the claimed top-level names (and their submodules) to Kiln's compat surface."""

    def __init__(self, claimed: set[str]):
        self.claimed = set(claimed)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        top, _, rest = fullname.partition(".")
        if top not in self.claimed:
            return None
        target_name = f"kiln.compat.{SURFACE[top]}" + (f".{rest}" if rest else "")
        try:
            found = importlib.util.find_spec(target_name)
        except (ImportError, ValueError):
            found = None
        if found is not None:
            spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name), origin=found.origin)
            if found.submodule_search_locations is not None:
                spec.submodule_search_locations = list(found.submodule_search_locations)
            return spec
        if top in RUNTIME_PACKAGES:
            spec = importlib.machinery.ModuleSpec(fullname, StubLoader(), is_package=True)
            return spec
        return None
