"""Stand-ins for ComfyUI's model runtime (``comfy.sd``, ``comfy.model_patcher``, ``comfy.ops``, ...).

Kiln does not provide ComfyUI's model classes. A pack that imports them still loads: every name it reads
from such a module is a placeholder class that can be subclassed, referenced and stored, and that raises
:class:`NeedsComfyRuntime` (an ``ImportError``) as soon as it is called or looked into. Each access is logged
with the module that made it, so the loader can name the classes that will not run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from typing import Any

from kiln.engine.errors import KilnError

RUNTIME_HINT = "needs ComfyUI's model runtime, which Kiln does not provide"

_lock = threading.Lock()
# module that read a runtime name (the pack's module) -> the runtime names it read
accesses: dict[str, set[str]] = {}


class NeedsComfyRuntime(KilnError, ImportError):
    """Raised when a pack uses a part of ComfyUI that Kiln does not provide (its model runtime)."""

    def __init__(self, what: str):
        super().__init__(f"{what} {RUNTIME_HINT}")
        self.what = what


def _caller_module(depth: int = 2) -> str:
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if not name.startswith(("kiln.compat", "importlib")):
            return str(name)
        f = f.f_back  # type: ignore[assignment]
    return ""


def note_access(what: str, depth: int = 3) -> None:
    mod = _caller_module(depth)
    if mod:
        with _lock:
            accesses.setdefault(mod, set()).add(what)


class _PlaceholderMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise NeedsComfyRuntime(cls.__kiln_what__)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(f"{cls.__kiln_what__}.{name}")

    def __repr__(cls) -> str:
        return f"<ComfyUI runtime placeholder {cls.__kiln_what__}>"


def placeholder(what: str) -> type:
    """A class standing for ComfyUI's ``what``: subclassable; calling it (or a subclass) raises."""
    return _PlaceholderMeta(what.rsplit(".", 1)[-1], (), {"__kiln_what__": what, "__module__": "kiln.compat"})


class RuntimeStubModule(types.ModuleType):
    """A module of ComfyUI's model runtime: every attribute is a :func:`placeholder`."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        what = f"{self.__name__}.{name}"
        note_access(what)
        value = placeholder(what)
        setattr(self, name, value)
        return value


class StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        m = RuntimeStubModule(spec.name)
        m.__path__ = []  # a package: nested runtime modules (comfy.ldm.modules.attention) import too
        note_access(spec.name, depth=2)
        return m

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def runtime_getattr(module_name: str) -> Any:
    """A module-level ``__getattr__`` for partly-provided modules: unknown names are placeholders."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        what = f"{module_name}.{name}"
        note_access(what)
        return placeholder(what)

    return __getattr__
