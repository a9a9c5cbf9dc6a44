"""Assembles a working Kiln: the registry (built-in packs, entry points, custom_nodes), folders, executor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kiln.engine import Executor, Folders, Registry


def default_registry(custom_nodes: str | Path | None = None, entry_points: bool = True) -> Registry:
    """Built-in nodes, installed packs (entry point group ``kiln.nodes``) and a ``custom_nodes/`` folder."""
    from kiln import nodes

    reg = Registry()
    nodes.register_builtin(reg)
    if entry_points:
        reg.load_entry_points()
    folder = custom_nodes if custom_nodes is not None else os.environ.get("KILN_CUSTOM_NODES", "custom_nodes")
    reg.load_custom_nodes(folder, before_load=lambda _folder: _install_compat(reg), read_other=_read_v3)
    if reg.pack_reports:
        from kiln import compat

        compat.annotate_reports(reg)
    return reg


def _read_v3(module: Any) -> tuple[dict, dict] | None:
    """A ComfyUI V3 pack (``comfy_entrypoint``): its node classes, which answer the classic contract."""
    from kiln.compat.comfy_api.latest import mappings_from_entrypoint

    return mappings_from_entrypoint(module)


def _install_compat(reg: Registry) -> None:
    """ComfyUI's module names (``folder_paths``, ``comfy.utils``, ``server``, ...) for the packs about to
    load: see kiln/compat and docs/ARCHITECTURE.md. Only when a custom_nodes folder has packs."""
    from kiln import compat

    compat.install(reg)


def default_folders(base_dir: str | Path | None = None, output_dir: str | Path | None = None) -> Folders:
    base = base_dir or os.environ.get("KILN_BASE_DIR") or Path.cwd()
    return Folders(base, output_dir=output_dir)


def make_executor(
    cache: str | None = None,
    base_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    registry: Registry | None = None,
    custom_nodes: str | Path | None = None,
    provider_cache: bool = True,
) -> Executor:
    """An executor with the default registry and folders. ``provider_cache``: keep paid provider results on
    disk under the base folder (``cache/provider-results``), so a re-run in a new process does not pay again."""
    reg = registry or default_registry(custom_nodes)
    ex = Executor(reg, cache=cache, folders=default_folders(base_dir, output_dir))
    if provider_cache:
        from kiln.nodes.providers.result_cache import ProviderResultCache

        ProviderResultCache().install(ex)
    return ex
