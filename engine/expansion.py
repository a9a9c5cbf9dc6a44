"""Building subgraphs that a node expands into, with node ids unique within the run."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from . import context as _ctx


class GraphBuilder:
    """Builds a subgraph for node expansion with ids unique within the run.

    ``b = GraphBuilder(); n = b.node("ImageInvert", image=...); return NodeResult(n.out(0), expand=b.finalize())``
    """

    _counter = itertools.count()

    def __init__(self, prefix: str | None = None):
        ctx = _ctx.current()
        base = prefix or (f"{ctx.node_id}." if ctx else "x.")
        self.prefix = f"{base}{next(self._counter)}."
        self.nodes: dict[str, dict] = {}
        self._n = 0

    def node(self, class_type: str, id: str | None = None, **inputs: Any) -> _BuiltNode:
        nid = self.prefix + (id or str(self._n))
        self._n += 1
        self.nodes[nid] = {
            "class_type": class_type,
            "inputs": {k: (v.to_json() if isinstance(v, _BuiltOut) else v) for k, v in inputs.items()},
        }
        return _BuiltNode(nid)

    def finalize(self) -> dict:
        return self.nodes


@dataclass(frozen=True)
class _BuiltOut:
    node_id: str
    slot: int

    def to_json(self) -> list:
        return [self.node_id, self.slot]


@dataclass(frozen=True)
class _BuiltNode:
    id: str

    def out(self, slot: int) -> list:
        return [self.id, slot]
