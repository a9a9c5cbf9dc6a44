"""Node expansion: building the subgraph a node expands into, and the live view of a run's graph.

:class:`GraphBuilder` names the nodes it builds the way ComfyUI does: while node ``5`` runs its call ``i``,
builders get the prefixes ``5.i.0.``, ``5.i.1.``, ... and number their nodes from 1, so an expanded node's
id says which node (and which call) made it and is the same in every run (good for caching).
:class:`DynamicPrompt` is what a ``DYNPROMPT`` hidden input receives: the graph as it stands during the
run, expanded nodes included, with their parent, real (top-level) and display ids.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Mapping
from typing import Any

from .errors import KilnError
from .graph import NodeEntry


def is_link(value: Any) -> bool:
    """True for ``[node_id, slot]``, the shape of a link in a graph's JSON."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
        and not isinstance(value[1], bool)
    )


class BuiltNode:
    """One node of a :class:`GraphBuilder`; ``out(slot)`` is a link to one of its outputs."""

    def __init__(self, id: str, class_type: str, inputs: dict[str, Any]):
        self.id = id
        self.class_type = class_type
        self.inputs = inputs
        self.override_display_id: str | None = None

    def out(self, slot: int) -> list:
        return [self.id, slot]

    def set_input(self, name: str, value: Any) -> None:
        """Set an input; ``None`` removes it."""
        if value is None:
            self.inputs.pop(name, None)
        else:
            self.inputs[name] = value

    def get_input(self, name: str) -> Any:
        return self.inputs.get(name)

    def set_override_display_id(self, display_id: str) -> None:
        """Report this node's events under ``display_id`` (a node of the submitted graph, say)."""
        self.override_display_id = display_id

    def serialize(self) -> dict:
        out: dict[str, Any] = {"class_type": self.class_type, "inputs": self.inputs}
        if self.override_display_id is not None:
            out["override_display_id"] = self.override_display_id
        return out


class GraphBuilder:
    """Builds a subgraph for node expansion.

    ``b = GraphBuilder(); n = b.node("ImageInvert", image=...); return NodeResult(n.out(0), expand=b.finalize())``

    Without ``prefix`` the ids follow ComfyUI's scheme (``<node>.<call>.<builder>.<n>``, see the module
    docstring). An explicit ``prefix`` gets a counter appended (``7.0.``, ``7.1.``, ...), so two builders
    given the same prefix still never collide.
    """

    _default_prefix: contextvars.ContextVar[tuple[str, int, int]] = contextvars.ContextVar(
        "kiln_graph_builder_prefix", default=("", 0, 0)
    )
    _counter = itertools.count()

    def __init__(self, prefix: str | None = None):
        self.prefix = GraphBuilder.alloc_prefix() if prefix is None else f"{prefix}{next(self._counter)}."
        self.nodes: dict[str, BuiltNode] = {}
        self.id_gen = 1

    @classmethod
    def set_default_prefix(cls, prefix_root: str, call_index: int, graph_index: int = 0) -> None:
        """Where default prefixes start (the executor sets it before each call of a node)."""
        cls._default_prefix.set((prefix_root, call_index, graph_index))

    @classmethod
    def alloc_prefix(
        cls, root: str | None = None, call_index: int | None = None, graph_index: int | None = None
    ) -> str:
        """The next default prefix, ``<root>.<call>.<graph>.``; each allocation moves ``<graph>`` on."""
        d_root, d_call, d_graph = cls._default_prefix.get()
        root = d_root if root is None else root
        call_index = d_call if call_index is None else call_index
        graph_index = d_graph if graph_index is None else graph_index
        cls._default_prefix.set((d_root, d_call, d_graph + 1))
        return f"{root}.{call_index}.{graph_index}."

    def node(self, class_type: str, id: str | None = None, **inputs: Any) -> BuiltNode:
        """Add a node (or return the one already built under ``id``)."""
        if id is None:
            id = str(self.id_gen)
            self.id_gen += 1
        nid = self.prefix + id
        if nid in self.nodes:
            return self.nodes[nid]
        node = BuiltNode(nid, class_type, dict(inputs))
        self.nodes[nid] = node
        return node

    def lookup_node(self, id: str) -> BuiltNode | None:
        return self.nodes.get(self.prefix + id)

    def remove_node(self, id: str) -> None:
        del self.nodes[self.prefix + id]

    def replace_node_output(self, id: str, index: int, new_value: Any) -> None:
        """Make every input linked to output ``index`` of node ``id`` take ``new_value`` (None: drop it)."""
        target = self.prefix + id
        for node in self.nodes.values():
            for name, v in list(node.inputs.items()):
                if is_link(v) and v[0] == target and v[1] == index:
                    node.set_input(name, new_value)

    def finalize(self) -> dict:
        return {nid: node.serialize() for nid, node in self.nodes.items()}


class NodeNotFoundError(KilnError, KeyError):
    """Asked a DynamicPrompt for a node id that is not in the run."""


class DynamicPrompt:
    """The graph of a running prompt as ComfyUI's ``DYNPROMPT`` hidden input shows it.

    Nodes come back in the API format (``{"class_type", "inputs"}``, links as ``[id, slot]``); nodes made by
    expansion are included and know their parent. A live view: it reflects expansions made after it was
    handed out.
    """

    def __init__(self, nodes: Mapping[str, NodeEntry]):
        self._nodes = nodes

    def get_node(self, node_id: str) -> dict:
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFoundError(f"Node {node_id} not found")
        return entry.to_json()

    def has_node(self, node_id: str) -> bool:
        return node_id in self._nodes

    def get_real_node_id(self, node_id: str) -> str:
        entry = self._nodes.get(node_id)
        while entry is not None and entry.parent is not None:
            node_id = entry.parent
            entry = self._nodes.get(node_id)
        return node_id

    def get_parent_node_id(self, node_id: str) -> str | None:
        entry = self._nodes.get(node_id)
        return entry.parent if entry is not None else None

    def get_display_node_id(self, node_id: str) -> str:
        entry = self._nodes.get(node_id)
        return (entry.display_id or node_id) if entry is not None else node_id

    def all_node_ids(self) -> set[str]:
        return set(self._nodes)

    def get_original_prompt(self) -> dict:
        return {nid: e.to_json() for nid, e in self._nodes.items() if e.parent is None}

    @property
    def original_prompt(self) -> dict:
        return self.get_original_prompt()

    @property
    def ephemeral_prompt(self) -> dict:
        return {nid: e.to_json() for nid, e in self._nodes.items() if e.parent is not None}

    @property
    def ephemeral_parents(self) -> dict:
        return {nid: e.parent for nid, e in self._nodes.items() if e.parent is not None}

    @property
    def ephemeral_display(self) -> dict:
        return {nid: e.display_id or e.parent for nid, e in self._nodes.items() if e.parent is not None}
