"""The node registry: the one place node classes are looked up.

Sources: packs registered in code (Kiln's built-ins), Python entry points in the ``kiln.nodes`` group,
and a ``custom_nodes/`` folder of ComfyUI-style packs. A pack that fails to import is recorded in
``load_errors`` and skipped; it never stops the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
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


@dataclass
class PackReport:
    """What loading one ``custom_nodes/`` pack did: served as-is by ``kiln nodes --packs`` and the server.

    ``error``/``traceback``: why the pack did not load (empty when it did). ``classes``: node names it
    registered. ``class_errors``: one entry per class skipped (malformed, protected name). ``warnings``:
    names it took over from an earlier pack, prestartup script failures. ``needs_comfy_runtime``: classes
    (or, when no class could be named, module names) that reach into ComfyUI's model runtime, which Kiln
    does not provide: they load, and fail when run.
    """

    pack: str
    path: str
    error: str = ""
    traceback: str = ""
    classes: list[str] = field(default_factory=list)
    class_errors: list[PackLoadError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    import_seconds: float = 0.0
    web_directory: str | None = None
    needs_comfy_runtime: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, NodeSpec] = {}
        self.load_errors: list[PackLoadError] = []
        self.packs: list[str] = []
        # custom_nodes/ packs: one report each, in load order; WEB_DIRECTORY of each pack that has one
        # (the server serves it under /extensions/<pack>/)
        self.pack_reports: list[PackReport] = []
        self.web_directories: dict[str, Path] = {}
        self._clashes: list[str] = []
        self._prestartup_warnings: dict[str, list[str]] = {}

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
            before = self._specs.get(name)
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
                continue
            if before is not None and before.cls is not cls:
                # as in ComfyUI, the pack loaded last wins; say which two packs clashed
                msg = (
                    f"node {name!r} of {python_module} replaces the one of {before.python_module} "
                    f"(the pack loaded later wins, as in ComfyUI)"
                )
                log.warning("Node name clash: %s", msg)
                self._clashes.append(msg)
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

    def record_load_error(self, source: str, exc: BaseException) -> PackLoadError:
        """Report that a pack, or one class of it, failed to load: appended to ``load_errors`` (with the
        traceback of the exception being handled) and logged with it. Loaders outside the registry (such as
        ``kiln.nodes.register_builtin``) call this from their ``except`` block and carry on."""
        err = PackLoadError(source, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        self.load_errors.append(err)
        log.warning("Skipped node pack %s: %s\n%s", source, err.error, err.traceback.rstrip())
        return err

    def load_custom_nodes(
        self,
        folder: str | Path,
        before_load: Callable[[Path], Any] | None = None,
        read_other: Callable[[ModuleType], tuple[dict, dict] | None] | None = None,
    ) -> None:
        """Import each package or module in a ComfyUI-style ``custom_nodes/`` folder, as ComfyUI does.

        Packs load in alphabetical order (names ending in ``.disabled`` are skipped), each as
        ``custom_nodes.<name>`` under a real ``custom_nodes`` package whose ``__path__`` is the folder, so
        every import form a pack uses works (relative, nested relative, ``custom_nodes.<pack>...``). Every
        pack's ``prestartup_script.py`` runs first. ``before_load(folder)`` runs before any of that (the
        runtime installs ComfyUI's module names there; the engine itself imports none). A pack's failure is
        recorded in ``pack_reports`` and ``load_errors`` with its traceback and never stops the others.
        ``read_other(module)``: for a pack that exports neither ``NODE_CLASS_MAPPINGS`` nor ``NODES``, its
        ``(class mappings, display names)`` in another contract, or None (the runtime reads ComfyUI's V3
        entrypoint there).
        """
        folder = Path(folder)
        if not folder.is_dir():
            return
        entries = [e for e in sorted(folder.iterdir(), key=lambda e: e.name) if _is_pack(e)]
        if not entries:
            return
        if before_load is not None:
            before_load(folder)
        self._install_namespace(folder)
        protected = frozenset(self._specs)  # built-ins and installed packs win over the folder
        for entry in entries:  # ComfyUI's main.py runs every prestartup script before any pack loads
            script = entry / "prestartup_script.py"
            if entry.is_dir() and script.is_file():
                self._run_prestartup(entry, script)
        for entry in entries:
            self._load_pack(entry, protected, read_other)

    def _install_namespace(self, folder: Path) -> None:
        """``custom_nodes`` as a package whose ``__path__`` holds ``folder`` (added to one that exists)."""
        pkg = sys.modules.get("custom_nodes")
        path = str(folder.resolve())
        if pkg is None or not hasattr(pkg, "__path__"):
            spec = importlib.machinery.ModuleSpec("custom_nodes", None, is_package=True)
            spec.submodule_search_locations = [path]
            pkg = importlib.util.module_from_spec(spec)
            sys.modules["custom_nodes"] = pkg
        elif path not in list(pkg.__path__):
            pkg.__path__.append(path)

    def _run_prestartup(self, entry: Path, script: Path) -> None:
        name = f"custom_nodes_prestartup.{entry.name}"
        try:
            spec = importlib.util.spec_from_file_location(name, script)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException as exc:  # like a pack's import, never fatal
            err = self.record_load_error(f"{script}", exc)
            self._prestartup_warnings.setdefault(entry.name, []).append(
                f"prestartup_script.py failed: {err.error}\n{err.traceback}"
            )

    def _load_pack(
        self,
        entry: Path,
        protected: frozenset[str],
        read_other: Callable[[ModuleType], tuple[dict, dict] | None] | None = None,
    ) -> None:
        pack = entry.name if entry.is_dir() else entry.stem
        mod_name = f"custom_nodes.{pack}"
        init = entry / "__init__.py" if entry.is_dir() else entry
        report = PackReport(pack=pack, path=str(entry), warnings=self._prestartup_warnings.pop(entry.name, []))
        self.pack_reports.append(report)
        errors_before, clashes_before = len(self.load_errors), len(self._clashes)
        t0 = time.perf_counter()
        try:
            spec = importlib.util.spec_from_file_location(
                mod_name, init, submodule_search_locations=[str(entry)] if entry.is_dir() else None
            )
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            finally:
                report.import_seconds = time.perf_counter() - t0
            setattr(sys.modules["custom_nodes"], pack, module)
            mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
            other = None
            if mappings is None and not hasattr(module, "NODES"):
                other = read_other(module) if read_other is not None else None
                if other is None:
                    raise NodeDefinitionError("exports neither NODE_CLASS_MAPPINGS nor NODES")
            if mappings is not None and not isinstance(mappings, dict):
                raise NodeDefinitionError(f"NODE_CLASS_MAPPINGS is a {type(mappings).__name__}, not a dict")
            if other is not None:
                specs = self.register_mappings(other[0], other[1], mod_name, protected)
                self.packs.append(mod_name)
            else:
                specs = self.register_module(module, python_module=mod_name, protected=protected)
            report.classes = [s.name for s in specs]
            web = getattr(module, "WEB_DIRECTORY", None)
            if web is not None and entry.is_dir():
                web_dir = (entry / str(web)).resolve()
                if web_dir.is_dir():
                    self.web_directories[pack] = web_dir
                    report.web_directory = str(web_dir)
                else:
                    report.warnings.append(f"WEB_DIRECTORY {web!r} is not a folder of the pack; not served")
        except BaseException as exc:  # a pack's failure is never fatal, even SystemExit
            sys.modules.pop(mod_name, None)
            err = self.record_load_error(str(entry), exc)
            report.error, report.traceback = err.error, err.traceback
        report.class_errors = [e for e in self.load_errors[errors_before:] if e.source != str(entry)]
        report.warnings += self._clashes[clashes_before:]

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

    def pack_report(self, pack: str) -> PackReport | None:
        return next((r for r in self.pack_reports if r.pack == pack), None)

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


def _is_pack(entry: Path) -> bool:
    if entry.name.startswith((".", "__")) or entry.name.endswith(".disabled"):
        return False
    if entry.is_dir():
        return (entry / "__init__.py").is_file()
    return entry.suffix == ".py"
