"""ComfyUI's pure API surface for classic custom node packs, written for Kiln (clean-room).

Packs written for ComfyUI import ``folder_paths``, ``comfy.utils``, ``comfy.model_management``,
``server``, ``nodes``, ``node_helpers``, ``latent_preview``, ``comfy_execution`` and ``comfy_api`` while
they load. :func:`install` (called by :func:`kiln.runtime.default_registry` just before ``custom_nodes/``
loads, never by Kiln's own code) makes those top-level names resolve to the modules of this package,
built on Kiln's folders, samplers, progress events and nodes. A name another project already provides
in this environment is left alone (and logged). ComfyUI's model runtime (``comfy.sd``, ``ModelPatcher``,
``comfy.ops``, ...) is not provided: see :mod:`kiln.compat._runtime`.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from ._finder import SURFACE, CompatFinder
from ._runtime import RUNTIME_HINT, NeedsComfyRuntime, accesses

log = logging.getLogger("kiln.compat")

__all__ = ["install", "uninstall", "installed_names", "annotate_reports", "NeedsComfyRuntime", "RUNTIME_HINT"]

_finder: CompatFinder | None = None
_registry: Any = None
_KILN_ROOT = Path(__file__).resolve().parents[2]  # the repository (or site-packages) holding kiln/


def _kiln_dirs() -> set[Path]:
    """Kiln's own package folders (``nodes/``, ``server/``, ...): importable as top-level names only by
    accident (the repository root on sys.path), so they never count as another project's module."""
    out = set()
    for sub in ("kiln.nodes", "kiln.server", "kiln.engine", "kiln.training"):
        try:
            spec = importlib.util.find_spec(sub)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            out.add(Path(loc).resolve())
    return out


def _provided_elsewhere(name: str) -> str | None:
    """Where ``name`` already imports from (None: nowhere, or only from Kiln's own source tree)."""
    mod = sys.modules.get(name)
    if mod is not None:
        if getattr(mod, "__name__", "").startswith("kiln.compat"):
            return None
        locs = list(getattr(mod, "__path__", []) or []) or [getattr(mod, "__file__", None) or "?"]
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        locs = list(spec.submodule_search_locations or []) or [spec.origin or "?"]
    own = _kiln_dirs()
    if all(Path(loc).resolve() in own for loc in locs if loc != "?") and "?" not in locs:
        sys.modules.pop(name, None)  # Kiln's own folder under a bare name: the compat surface takes it
        return None
    return ", ".join(map(str, locs))


def install(registry: Any = None) -> set[str]:
    """Make ComfyUI's module names importable (idempotent). Returns the names this surface claims."""
    global _finder, _registry
    if registry is not None:
        _registry = registry
    if _finder is not None:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        return set(_finder.claimed)
    claimed = set()
    for name in SURFACE:
        other = _provided_elsewhere(name)
        if other is None:
            claimed.add(name)
        else:
            log.info("ComfyUI module name %r is provided by %s in this environment; Kiln leaves it alone", name, other)
    _finder = CompatFinder(claimed)
    sys.meta_path.insert(0, _finder)
    log.info("ComfyUI compatibility modules installed for custom nodes: %s", ", ".join(sorted(claimed)))
    return claimed


def installed_names() -> set[str]:
    return set(_finder.claimed) if _finder is not None else set()


def uninstall() -> None:
    """Remove the finder and the aliases it created (for tests)."""
    global _finder
    if _finder is None:
        return
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name in list(sys.modules):
        if name.partition(".")[0] in _finder.claimed:
            del sys.modules[name]
    _finder = None


def current_registry() -> Any:
    return _registry


def _uses_runtime(cls: type, mods: set[str]) -> bool:
    """True when a class's module read ComfyUI's runtime, holds a runtime module or name, or the class
    derives from a runtime placeholder."""
    from ._runtime import RuntimeStubModule, _PlaceholderMeta

    if any(isinstance(base, _PlaceholderMeta) for base in type.mro(cls)):
        return True
    mod_name = getattr(cls, "__module__", "")
    if mod_name in mods:
        return True
    module = sys.modules.get(mod_name)
    if module is None:
        return False
    if any(isinstance(v, (RuntimeStubModule, _PlaceholderMeta)) for v in vars(module).values()):
        return True
    return any(isinstance(sys.modules.get(n), RuntimeStubModule) for n in _imported_names(module))


def _imported_names(module: Any) -> set[str]:
    """Absolute module names a module's source imports (``import a.b``, ``from a import b`` -> a, a.b)."""
    import ast

    try:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, TypeError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def annotate_reports(registry: Any) -> None:
    """Fill each pack report's ``needs_comfy_runtime``: the classes that reach ComfyUI's model runtime
    (their module imported or read it), or the pack's modules that did when no class can be named."""
    for report in getattr(registry, "pack_reports", []):
        prefix = f"custom_nodes.{report.pack}"
        mods = {m for m in accesses if m == prefix or m.startswith(prefix + ".")}
        names = []
        for cname in report.classes:
            spec = registry.get(cname)
            if spec is not None and _uses_runtime(spec.cls, mods):
                names.append(cname)
        if not names and mods:
            names = sorted(f"{m}: {', '.join(sorted(accesses[m]))}" for m in mods)
        if not names:
            continue
        report.needs_comfy_runtime = names
        msg = f"{', '.join(names)} {RUNTIME_HINT}: loaded, but fail when run"
        if msg not in report.warnings:
            report.warnings.append(msg)
