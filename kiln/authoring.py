"""Author graphs in Python.

    from kiln import Graph
    g = Graph()
    img = g.node("EmptyImage", width=64, height=64, color=0xFF0000)
    inv = g.node("ImageInvert", image=img.out.IMAGE)
    g.node("SaveImage", images=inv.out.IMAGE, filename_prefix="inverted")
    g.save("inverted.json")

Every registered node also has a typed builder method (``g.EmptyImage(width=64)``) generated into
:mod:`kiln.builders`, so an IDE completes input names. A wrong input name, a link of the wrong type or a
literal of the wrong kind raises at the line that makes it, naming the node, the input and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.engine import Graph as _EngineGraph, Link, NodeEntry, Registry
from kiln.engine.errors import GraphFormatError, KilnError
from kiln.engine.types import COMBO, types_compatible
from kiln.engine.validation import OBJECT_TYPES, coerce_literal

from .builders import NodeBuilders

_registry: Registry | None = None


def registry() -> Registry:
    """The registry authoring checks against (built-in nodes, installed packs, ./custom_nodes)."""
    global _registry
    if _registry is None:
        from .runtime import default_registry

        _registry = default_registry()
    return _registry


class AuthoringError(KilnError, TypeError):
    """A graph was wired wrongly in Python code."""


class Output:
    """One output of a node: pass it as another node's input to connect them."""

    __slots__ = ("node", "slot", "name", "type")

    def __init__(self, node: NodeRef, slot: int, name: str, type: str):
        self.node, self.slot, self.name, self.type = node, slot, name, type

    def __repr__(self) -> str:
        return f"<output {self.name} ({self.type}) of node {self.node.id} {self.node.class_type}>"


class _Outputs:
    def __init__(self, node: NodeRef):
        self._node = node

    def _all(self) -> list[Output]:
        spec = self._node.spec
        return [Output(self._node, i, o.name, o.type) for i, o in enumerate(spec.outputs)] if spec else []

    def __getattr__(self, name: str) -> Output:
        outs = self._all()
        for o in outs:
            if o.name == name:
                return o
        for o in outs:  # also by type when the name is unique for it
            if o.type == name and sum(x.type == name for x in outs) == 1:
                return o
        names = [o.name for o in outs]
        raise AttributeError(f"{self._node.class_type} has no output {name!r}; its outputs are {names}")

    def __getitem__(self, i: int | str) -> Output:
        if isinstance(i, str):
            return getattr(self, i)
        outs = self._all()
        if not 0 <= i < len(outs):
            raise IndexError(f"{self._node.class_type} has {len(outs)} output(s)")
        return outs[i]

    def __iter__(self) -> Iterator[Output]:
        return iter(self._all())

    def __dir__(self) -> list[str]:
        return [o.name for o in self._all()]


class NodeRef:
    """A node in a Python-authored graph."""

    def __init__(self, graph: Graph, entry: NodeEntry):
        self.graph = graph
        self.entry = entry
        self.out = _Outputs(self)

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def class_type(self) -> str:
        return self.entry.class_type

    @property
    def spec(self):
        return self.graph.registry.get(self.entry.class_type)

    @property
    def inputs(self) -> dict:
        return self.entry.inputs

    def set(self, **inputs: Any) -> NodeRef:
        """Change inputs (checked like at creation)."""
        for name, value in inputs.items():
            self.graph._set_input(self.entry, name, value)
        return self

    def __getitem__(self, name: str) -> Any:
        return self.entry.inputs[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.graph._set_input(self.entry, name, value)

    def __iter__(self) -> Iterator[Output]:  # unpack: model, clip, vae = g.CheckpointLoaderSimple(...)
        return iter(self.out)

    def __repr__(self) -> str:
        return f"<node {self.id} {self.class_type}>"


class Graph(NodeBuilders):
    """A workflow graph built in Python; saves as ComfyUI API-format JSON."""

    def __init__(self, registry_: Registry | None = None):
        self.registry = registry_ or registry()
        self._g = _EngineGraph()
        self._next = 1

    # -- building -------------------------------------------------------------------------------------
    def node(self, class_type: str, *, id: str | None = None, title: str | None = None, **inputs: Any) -> NodeRef:
        spec = self.registry.get(class_type)
        if spec is None:
            raise AuthoringError(self.registry.unknown_message(class_type))
        nid = str(id) if id is not None else self._new_id()
        if nid in self._g.nodes:
            raise AuthoringError(f"node id {nid!r} is already used in this graph")
        entry = NodeEntry(nid, class_type, {}, {"title": title or spec.display_name})
        self._g.nodes[nid] = entry
        try:
            for name, value in inputs.items():
                self._set_input(entry, name, value)
        except Exception:
            del self._g.nodes[nid]
            raise
        return NodeRef(self, entry)

    def _new_id(self) -> str:
        while str(self._next) in self._g.nodes:
            self._next += 1
        nid = str(self._next)
        self._next += 1
        return nid

    def _set_input(self, entry: NodeEntry, name: str, value: Any) -> None:
        spec = self.registry[entry.class_type]
        where = f"{entry.class_type} (node {entry.id})"
        ispec = spec.inputs.get(name)
        if ispec is None:
            close = difflib.get_close_matches(name, list(spec.inputs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; its inputs are {list(spec.inputs)}"
            raise AuthoringError(f"{where} has no input {name!r}{hint}")
        if isinstance(value, NodeRef):
            outs = list(value.out)
            if len(outs) != 1:
                raise AuthoringError(
                    f"{where}.{name}: node {value.id} ({value.class_type}) has {len(outs)} "
                    f"outputs; pass one of them, e.g. {value.class_type.lower()}.out."
                    f"{outs[0].name if outs else '...'}"
                )
            value = outs[0]
        if isinstance(value, Output):
            if value.node.graph is not self:
                raise AuthoringError(f"{where}.{name}: that output belongs to another graph")
            expected = ispec.type if ispec.type != COMBO else (ispec.resolve_choices() or [])
            if not (value.type == COMBO and ispec.type == COMBO) and not types_compatible(value.type, expected):
                raise AuthoringError(
                    f"{where}.{name} expects {ispec.type} but got output {value.name} "
                    f"({value.type}) of {value.node.class_type} (node {value.node.id})"
                )
            entry.inputs[name] = Link(value.node.id, value.slot)
            return
        if ispec.type in OBJECT_TYPES:
            raise AuthoringError(
                f"{where}.{name} takes a {ispec.type} from another node's output, not the value {value!r}"
            )
        try:
            value = coerce_literal(ispec, value)
        except (TypeError, ValueError) as exc:
            raise AuthoringError(f"{where}.{name}: {value!r} is not a valid {ispec.type} ({exc})") from None
        if ispec.type == COMBO:
            choices = ispec.resolve_choices() or []
            if choices and value not in choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                raise AuthoringError(
                    f"{where}.{name}: {value!r} is not one of the choices"
                    + (f"; did you mean {close[0]!r}?" if close else f" {choices[:20]}")
                )
        lo, hi = ispec.options.get("min"), ispec.options.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo or hi is not None and value > hi:
                raise AuthoringError(f"{where}.{name}: {value} is outside [{lo}, {hi}]")
        entry.inputs[name] = value

    # -- access ---------------------------------------------------------------------------------------
    def __getitem__(self, ref: str) -> NodeRef:
        entry = self._g.find(str(ref))
        if entry is None:
            raise KeyError(f"no node with id or title {ref!r}")
        return NodeRef(self, entry)

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, str) and self._g.find(ref) is not None

    def __len__(self) -> int:
        return len(self._g.nodes)

    def __iter__(self) -> Iterator[NodeRef]:
        return (NodeRef(self, e) for e in list(self._g.nodes.values()))

    def remove(self, ref: str | NodeRef) -> None:
        nid = ref.id if isinstance(ref, NodeRef) else self[ref].id
        del self._g.nodes[nid]

    def replace(self, old: str | NodeRef, class_type: str, **inputs: Any) -> NodeRef:
        """Swap a node for another class, keeping its id and the links that point at it."""
        old_ref = old if isinstance(old, NodeRef) else self[old]
        nid = old_ref.id
        keep = {k: v for k, v in old_ref.entry.inputs.items()}
        del self._g.nodes[nid]
        spec = self.registry.get(class_type)
        carried = {
            k: (
                Output(NodeRef(self, self._g.nodes[v.node_id]), v.slot, "", _out_type(self, v))
                if isinstance(v, Link)
                else v
            )
            for k, v in keep.items()
            if spec is not None and k in spec.inputs and k not in inputs
        }
        try:
            return self.node(class_type, id=nid, title=None, **carried, **inputs)
        except Exception:
            self._g.nodes[nid] = old_ref.entry
            raise

    # -- JSON -----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return self._g.to_json()

    def dumps(self, indent: int | None = 2) -> str:
        return self._g.dumps(indent)

    def save(self, path: str | Path) -> None:
        self._g.save(path)

    @classmethod
    def from_json(cls, data: Any, registry_: Registry | None = None) -> Graph:
        from kiln.engine import parse_submission

        g = cls(registry_)
        g._g = parse_submission(data, g.registry)[0]  # an editor (UI-format) workflow is converted
        return g

    @classmethod
    def load(cls, path: str | Path, registry_: Registry | None = None) -> Graph:
        g = cls(registry_)
        g._g = _EngineGraph.load(path, g.registry)  # API or editor JSON, or a PNG that carries a workflow
        return g

    @property
    def engine_graph(self) -> _EngineGraph:
        return self._g


def _out_type(g: Graph, link: Link) -> str:
    spec = g.registry.get(g._g.nodes[link.node_id].class_type)
    return spec.outputs[link.slot].type if spec and link.slot < len(spec.outputs) else "*"


def as_engine_graph(graph: Any) -> _EngineGraph:
    """A kiln.Graph, an engine Graph, a dict or a path, as an engine Graph."""
    if isinstance(graph, Graph):
        return graph.engine_graph
    if isinstance(graph, _EngineGraph):
        return graph
    if isinstance(graph, (str, Path)):
        return _EngineGraph.load(graph, registry)  # the registry is built only for a UI workflow
    if isinstance(graph, dict):
        from kiln.engine import parse_submission

        return parse_submission(graph, registry)[0]
    raise GraphFormatError(f"cannot run a {type(graph).__name__}; pass a kiln.Graph, a dict or a JSON path")
