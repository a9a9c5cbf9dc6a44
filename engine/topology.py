"""Walks over a graph's links: dependency order, cycles, and which outputs depend on which nodes.

Every walk is iterative and linear in nodes + links, so a 10,000-node chain neither recurses nor
goes quadratic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .graph import Graph, Link


def find_cycle(graph: Graph, start_nodes: Iterable[str]) -> list[list[str]]:
    """Cycles reachable upstream of the start nodes, each as the list of node ids on it (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color: dict[str, int] = {}
    cycles: list[list[str]] = []
    for root in start_nodes:
        if color.get(root, WHITE) != WHITE:
            continue
        stack: list[tuple[str, Any]] = [(root, iter(sources(graph, root)))]
        path = [root]
        color[root] = GREY
        while stack:
            nid, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[nid] = BLACK
                stack.pop()
                path.pop()
                continue
            c = color.get(nxt, WHITE)
            if c == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sources(graph, nxt))))
                path.append(nxt)
            elif c == GREY:
                i = path.index(nxt)
                cycles.append(list(reversed(path[i:])))
    return cycles


def sources(graph: Graph, nid: str) -> list[str]:
    n = graph.nodes.get(nid)
    if n is None:
        return []
    return [v.node_id for v in n.inputs.values() if isinstance(v, Link) and v.node_id in graph.nodes]


def upstream_order(graph: Graph, roots: Iterable[str]) -> list[str]:
    """Nodes reachable upstream of ``roots`` in dependency order (sources first). Graph must be acyclic."""
    order: list[str] = []
    seen: set[str] = set()
    for root in roots:
        if root in seen or root not in graph.nodes:
            continue
        seen.add(root)
        stack = [(root, iter(sources(graph, root)))]
        while stack:
            nid, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                order.append(nid)
                stack.pop()
            elif nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, iter(sources(graph, nxt))))
    return order


def acyclic_part(graph: Graph, outputs: list[str], in_cycle: set[str]) -> list[str]:
    pruned = graph.copy()
    for nid in in_cycle:
        pruned.nodes[nid].inputs = {k: v for k, v in pruned.nodes[nid].inputs.items() if not isinstance(v, Link)}
    order = upstream_order(pruned, outputs)
    return [n for n in order if n not in in_cycle]


def dependent_outputs(graph: Graph, outputs: list[str], errors: dict) -> dict[str, list[str]]:
    """For each node with errors, the outputs that depend on it (in ``outputs`` order).

    Walks from whichever side is smaller: downstream from each erroring node when there are fewer of
    them than outputs (one bad loader under thousands of previews), else upstream from each output.
    """
    if not errors:
        return {}
    if len(errors) <= len(outputs):
        consumers: dict[str, list[str]] = {}
        for nid in graph.nodes:
            for src in sources(graph, nid):
                consumers.setdefault(src, []).append(nid)
        rank = {o: i for i, o in enumerate(outputs)}
        found: dict[str, list[str]] = {}
        for nid in errors:
            seen = {nid}
            stack = [nid]
            hits = []
            while stack:
                cur = stack.pop()
                if cur in rank:
                    hits.append(cur)
                for c in consumers.get(cur, ()):
                    if c not in seen:
                        seen.add(c)
                        stack.append(c)
            if hits:
                found[nid] = sorted(hits, key=rank.__getitem__)
        return found
    dep: dict[str, list[str]] = {}
    for o in outputs:
        for nid in reach(graph, o):
            if nid in errors:
                dep.setdefault(nid, []).append(o)
    return dep


def reach(graph: Graph, root: str) -> set[str]:
    seen = {root}
    stack = [root]
    while stack:
        for s in sources(graph, stack.pop()):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return seen
