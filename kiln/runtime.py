"""Assembles a working Kiln: the registry (built-in packs, entry points, custom_nodes), folders, executor."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.engine import Executor, Folders, Registry


def default_registry(custom_nodes: str | Path | None = None, entry_points: bool = True) -> Registry:
    """Built-in nodes, installed packs (entry point group ``kiln.nodes``) and a ``custom_nodes/`` folder."""
    from kiln import nodes

    reg = Registry()
    nodes.register_builtin(reg)
    if entry_points:
        reg.load_entry_points()
    folder = custom_nodes if custom_nodes is not None else os.environ.get("KILN_CUSTOM_NODES", "custom_nodes")
    reg.load_custom_nodes(folder)
    return reg


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
