"""How one node's inputs become calls, and what a call returns becomes output slots.

ComfyUI's list semantics (one call per element of the longest input list; ``INPUT_IS_LIST`` nodes get
whole lists), execution blockers, and the shapes a node may return (a value, a tuple, ``NodeResult``, a
classic ``{"ui", "result", "expand"}`` dict) are decided here, apart from the executor's scheduling.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from .expansion import GraphBuilder
from .node import ExecutionBlocker, NodeResult, NodeSpec


def accepts(fn: Callable) -> tuple[frozenset[str] | None, bool]:
    """(names a callable takes or None for **kwargs, takes input_types)."""
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return None, "input_types" in sig.parameters
    return frozenset(sig.parameters), "input_types" in sig.parameters


def call_filtered(fn: Callable, kwargs: dict) -> Any:
    names, _ = accepts(fn)
    return fn(**(kwargs if names is None else {k: v for k, v in kwargs.items() if k in names}))


class NanRepr:
    def __repr__(self) -> str:
        return "NaN"


NAN = NanRepr()


class BlockedCall:
    """A call skipped because an input was an ExecutionBlocker; its result is a silent blocker."""

    __slots__ = ("message",)

    def __init__(self, message: str | None):
        self.message = message


def blocker_in(values: Iterable[Any]) -> ExecutionBlocker | None:
    for x in values:
        if isinstance(x, ExecutionBlocker):
            return x
    return None


def is_lazy(spec: NodeSpec, name: str) -> bool:
    s = spec.inputs.get(name)
    return bool(s and s.lazy)


def map_calls(spec: NodeSpec, inputs: dict[str, list], for_lazy: bool = False) -> list:
    """ComfyUI's list semantics: one call per element of the longest input list, shorter lists repeat
    their last element; INPUT_IS_LIST nodes get one call with whole lists."""
    if spec.input_is_list:
        if not for_lazy:  # one call with whole lists: a blocker anywhere in them blocks it
            b = blocker_in(x for v in inputs.values() for x in v)
            if b is not None:
                return [BlockedCall(b.message)]
        return [inputs]
    n = max((len(v) for v in inputs.values()), default=1)
    n = max(n, 1)
    calls: list = []
    for i in range(n):
        kw = {k: (v[i] if i < len(v) else v[-1]) if v else None for k, v in inputs.items()}
        b = None if for_lazy else blocker_in(kw.values())
        calls.append(kw if b is None else BlockedCall(b.message))
    return calls


async def async_call(fn: Callable, kw: Any, prefix: tuple[str, int] | None = None) -> Any:
    """Run one call of a node; ``prefix`` is (node id, call index) for the ids of what it expands into."""
    if isinstance(kw, BlockedCall):
        return kw
    if prefix is not None:  # each call runs in its own task, so this setting is the call's own
        GraphBuilder.set_default_prefix(prefix[0], prefix[1], 0)
    r = fn(**kw)
    if inspect.isawaitable(r):
        r = await r
    return r


def normalise(spec: NodeSpec, ret: Any, n_out: int) -> tuple[tuple, dict | None, Any]:
    """(values, ui, expand) from whatever a node function returned."""
    if isinstance(ret, BlockedCall):  # blocked: the block travels on silently (reported once, here)
        return (ExecutionBlocker(None),) * n_out, None, None
    if isinstance(ret, ExecutionBlocker):
        return (ret,) * n_out, None, None
    if isinstance(ret, NodeResult):
        vals = ret.values
        return check_arity(spec, vals, n_out, allow_empty=ret.expand is None and bool(ret.ui)), ret.ui, ret.expand
    if spec.kind == "classic" or (isinstance(ret, dict) and n_out == 0):
        if isinstance(ret, dict):
            if "expand" in ret and ret["expand"] is not None:
                return tuple(ret.get("result", ())), ret.get("ui"), ret["expand"]
            vals = tuple(ret["result"]) if "result" in ret else ()
            return check_arity(spec, vals, n_out, allow_empty="result" not in ret), ret.get("ui"), None
        if ret is None:
            return check_arity(spec, (), n_out, allow_empty=True), None, None
        if isinstance(ret, tuple) or isinstance(ret, list):
            return check_arity(spec, tuple(ret), n_out), None, None
        raise TypeError(
            f"{spec.name}.{spec.function} returned a {type(ret).__name__}; classic nodes return "
            f"a tuple with one value per output or a dict with 'ui'/'result'"
        )
    if n_out == 0:
        return (), None, None
    if n_out == 1:
        return (ret,), None, None
    if not isinstance(ret, tuple):
        raise TypeError(
            f"{spec.name}.run must return a tuple of {n_out} values "
            f"({', '.join(spec.output_names)}), got {type(ret).__name__}"
        )
    return check_arity(spec, ret, n_out), None, None


def check_arity(spec: NodeSpec, vals: tuple, n_out: int, allow_empty: bool = False) -> tuple:
    if len(vals) != n_out and not (allow_empty and not vals):
        raise TypeError(f"{spec.name} returned {len(vals)} value(s) but declares {n_out} output(s) {spec.output_names}")
    return vals if vals else (None,) * n_out
