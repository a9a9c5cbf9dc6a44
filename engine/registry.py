"""The node registry: the one place node classes are looked up.

Sources: packs registered in code (Kiln's built-ins), Python entry points in the ``kiln.nodes`` group,
and a ``custom_nodes/`` folder of ComfyUI-style packs. A pack that fails to import is recorded in
``load_errors`` and skipped; it never stops the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from .classic import is_classic, spec_from_classic
from .errors import NodeDefinitionError
from .node import Node, NodeSpec, spec_from_native

log = logging.getLogger("kiln.registry")
ENTRY_POINT_GROUP = "kiln.nodes"


@dataclass
class PackLoadError:
    source: str
    error: str
    traceback: str


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, NodeSpec] = {}
        self.load_errors: list[PackLoadError] = []
        self.packs: list[str] = []

    # -- registration -------------------------------------------------------------------------------
    def register(
        self,
        cls: type,
        name: str | None = None,
        *,
        display_name: str | None = None,
        python_module: str | None = None,
        replace: bool = False,
    ) -> NodeSpec:
        """Register a native :class:`Node` subclass or a classic ComfyUI class. Returns its spec."""
        if isinstance(cls, type) and issubclass(cls, Node):
            spec = spec_from_native(cls, name)
            if display_name:
                spec.display_name = display_name
            if python_module:
                spec.python_module = python_module
        elif is_classic(cls):
            spec = spec_from_classic(name or cls.__name__, cls, display_name, python_module or "custom_nodes")
        else:
            raise NodeDefinitionError(
                f"{cls!r} is neither an engine.Node subclass nor a ComfyUI class with INPUT_TYPES/RETURN_TYPES"
            )
        if spec.name in self._specs and not replace and self._specs[spec.name].cls is not spec.cls:
            raise NodeDefinitionError(
                f"a node named {spec.name!r} is already registered "
                f"(by {self._specs[spec.name].cls.__module__}); pass replace=True to override"
            )
        self._specs[spec.name] = spec
        return spec

    def register_mappings(
        self,
        mappings: dict[str, type],
        display_names: dict[str, str] | None = None,
        python_module: str = "custom_nodes",
        protected: frozenset[str] | set[str] | None = None,
    ) -> list[NodeSpec]:
        """Register a ComfyUI pack's NODE_CLASS_MAPPINGS; bad classes are reported and skipped.

        Names in ``protected`` (the nodes registered before custom packs load) are not replaced: as in
        ComfyUI, a pack cannot swap out a built-in node; the attempt is reported in ``load_errors``.
        """
        out = []
        for name, cls in mappings.items():
            if protected and name in protected and self._specs[name].cls is not cls:
                self.load_errors.append(
                    PackLoadError(
                        f"{python_module}:{name}",
                        f"NodeDefinitionError: {name!r} is already provided by "
                        f"{self._specs[name].python_module}; the pack's class was not registered",
                        "",
                    )
                )
                log.warning("Pack %s tried to replace node %s; kept the existing one", python_module, name)
                continue
            try:
                out.append(
                    self.register(
                        cls,
                        name,
                        display_name=(display_names or {}).get(name),
                        python_module=python_module,
                        replace=True,
                    )
                )
            except Exception as exc:
                self.record_load_error(f"{python_module}:{name}", exc)
        return out

    def register_module(
        self, module: ModuleType, python_module: str | None = None, protected: frozenset[str] | set[str] | None = None
    ) -> list[NodeSpec]:
        """Register every node a module exports: ``NODE_CLASS_MAPPINGS`` or ``NODES`` (a list of classes)."""
        pm = python_module or module.__name__
        if hasattr(module, "NODE_CLASS_MAPPINGS"):
            specs = self.register_mappings(
                module.NODE_CLASS_MAPPINGS, getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None), pm, protected
            )
        else:
            specs = []
            for c in getattr(module, "NODES", []):  # one bad class never takes the rest of the pack down
                try:
                    specs.append(self.register(c, python_module=pm))
                except Exception as exc:
                    self.record_load_error(f"{pm}:{getattr(c, '__name__', c)}", exc)
        self.packs.append(pm)
        return specs

    def record_load_error(self, source: str, exc: BaseException) -> None:
        """Report that a pack, or one class of it, failed to load: appended to ``load_errors`` (with the
        traceback of the exception being handled) and logged. Loaders outside the registry (such as
        ``kiln.nodes.register_builtin``) call this from their ``except`` block and carry on."""
        err = PackLoadError(source, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        self.load_errors.append(err)
        log.warning("Skipped node pack %s: %s", source, err.error)

    def load_custom_nodes(self, folder: str | Path) -> None:
        """Import each package or module in a ComfyUI-style ``custom_nodes/`` folder."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        protected = frozenset(self._specs)  # built-ins and installed packs win over the folder
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith((".", "__")) or entry.name.endswith(".disabled"):
                continue
            if entry.is_dir() and (entry / "__init__.py").exists():
                init = entry / "__init__.py"
            elif entry.suffix == ".py":
                init = entry
            else:
                continue
            mod_name = f"custom_nodes.{entry.stem}"
            try:
                spec = importlib.util.spec_from_file_location(
                    mod_name, init, submodule_search_locations=[str(entry)] if entry.is_dir() else None
                )
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
                if not hasattr(module, "NODE_CLASS_MAPPINGS") and not hasattr(module, "NODES"):
                    raise NodeDefinitionError("exports neither NODE_CLASS_MAPPINGS nor NODES")
                self.register_module(module, python_module=mod_name, protected=protected)
            except BaseException as exc:  # a pack's failure is never fatal, even SystemExit
                sys.modules.pop(mod_name, None)
                self.record_load_error(str(entry), exc)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load node packs installed as Python distributions (entry point group ``kiln.nodes``).

        An entry point may name a module (registered like a custom_nodes pack) or a callable that takes
        the registry.
        """
        for ep in metadata.entry_points(group=group):
            try:
                obj = ep.load()
                if isinstance(obj, ModuleType):
                    self.register_module(obj)
                else:
                    obj(self)
                    self.packs.append(ep.value)
            except Exception as exc:
                self.record_load_error(f"entry point {ep.name} = {ep.value}", exc)

    # -- lookup -------------------------------------------------------------------------------------
    def get(self, name: str) -> NodeSpec | None:
        return self._specs.get(name)

    def __getitem__(self, name: str) -> NodeSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(self.unknown_message(name))
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return list(self._specs)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        lowered = {k.lower(): k for k in self._specs}
        if len(str(name)) > 200:
            return []
        hits = difflib.get_close_matches(str(name).lower(), list(lowered), n=n, cutoff=0.6)
        return [lowered[h] for h in hits]

    def unknown_message(self, name: Any) -> str:
        sugg = self.suggest(str(name))
        hint = f" Did you mean {' or '.join(repr(s) for s in sugg)}?" if sugg else ""
        shown = repr(name) if len(str(name)) <= 200 else repr(str(name)[:197] + "...")
        return f"Unknown node type {shown}.{hint}"

    def object_info(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        out = {}
        for name in names if names is not None else self._specs:
            spec = self._specs.get(name)
            if spec is None:
                continue
            try:
                out[name] = spec.object_info()
            except Exception as exc:  # one bad class never breaks the catalogue
                log.warning("object_info for %s failed: %s", name, exc)
        return out
