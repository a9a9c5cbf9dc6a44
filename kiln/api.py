"""In-process running: ``kiln.run(graph)`` validates, runs and returns outputs and images."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kiln.engine import Executor, Folders, Graph as EngineGraph, RunResult
from kiln.engine.events import Event

from .authoring import as_engine_graph

_executor: Executor | None = None
_lock = threading.Lock()


def executor(
    cache: str | None = None, base_dir: str | Path | None = None, output_dir: str | Path | None = None
) -> Executor:
    """The process-wide executor (its cache persists across ``kiln.run`` calls)."""
    global _executor
    with _lock:
        if _executor is None:
            from .runtime import make_executor

            _executor = make_executor(cache=cache, base_dir=base_dir, output_dir=output_dir)
        else:
            if cache is not None and cache != _executor.cache.describe():
                _executor.set_cache(cache)
            if base_dir is not None or output_dir is not None:
                from .runtime import default_folders

                _executor.folders = default_folders(base_dir, output_dir)
        return _executor


class Result:
    """What a run produced: status, UI outputs, output files and images, values of targets, costs."""

    def __init__(self, result: RunResult, folders: Folders):
        self.raw = result
        self.folders = folders

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    @property
    def costs(self) -> list[dict]:
        """Estimated cost of each paid provider call the run made (the providers' ``costs`` annotations)."""
        from kiln.nodes.providers.ledger import costs_of

        return costs_of(self.raw.annotations)

    @property
    def files(self) -> list[Path]:
        paths = []
        for ui in self.raw.outputs.values():
            for item in (ui or {}).get("images", []) or []:
                if isinstance(item, dict) and "filename" in item:
                    try:
                        paths.append(
                            self.folders.safe_path(
                                item.get("type", "output"), item["filename"], item.get("subfolder", "")
                            )
                        )
                    except Exception:
                        continue
        return paths

    @property
    def images(self) -> list:
        """The saved/previewed images as PIL images."""
        from PIL import Image

        out = []
        for p in self.files:
            with Image.open(p) as im:
                im.load()
                out.append(im.copy())
        return out

    def __repr__(self) -> str:
        return f"<kiln.Result {self.raw.status}: {len(self.raw.outputs)} output node(s), {len(self.files)} file(s)>"


def apply_settings(graph: EngineGraph, settings: dict[str, Any], registry: Any = None) -> None:
    """Apply ``{"NODE.INPUT": value}`` edits; NODE is an id or a title. Raises with the fix on a bad key.

    A value is a literal, or a :class:`kiln.engine.graph.Link` to connect the input to another node's output.
    With a ``registry``, an INPUT the node does not declare is an error (with the nearest name), never a value
    silently ignored.
    """
    import difflib

    from kiln.engine import GraphFormatError

    for key, value in settings.items():
        ref, dot, inp = key.rpartition(".")
        if not dot or not ref or not inp:
            raise GraphFormatError(f"--set {key!r}: write NODE.INPUT=VALUE, NODE being a node id or title")
        node = graph.find(ref)
        if node is None:
            known = ", ".join(f"{n.id} ({n.title or n.class_type})" for n in graph.nodes.values())
            raise GraphFormatError(f"--set {key!r}: no node with id or title {ref!r}", f"nodes: {known}")
        spec = registry.get(node.class_type) if registry is not None else None
        if spec is not None and spec.kind == "native" and inp not in spec.inputs:
            near = difflib.get_close_matches(inp, list(spec.inputs), n=1, cutoff=0.6)
            raise GraphFormatError(
                f"--set {key!r}: node {ref} ({node.class_type}) has no input {inp!r}"
                + (f"; did you mean {ref}.{near[0]}?" if near else ""),
                f"its inputs: {', '.join(spec.inputs) or 'none'}",
            )
        # Past the loader a link is a Link object, never a list of a certain shape: a list (even ["4", 0] or
        # ["a", True]) is a literal value. The CLI turns JSON [id, slot] text into a Link at its boundary.
        node.inputs[inp] = value


def run(
    graph: Any,
    *,
    set: dict[str, Any] | None = None,
    cache: str | None = None,
    output_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
    targets: Iterable[str] | None = None,
    on_event: Callable[[Event], None] | None = None,
    extra_data: dict | None = None,
    raise_on_error: bool = True,
) -> Result:
    """Run a graph in this process. ``graph``: a kiln.Graph, API-format dict or JSON path.

    Raises ``engine.ValidationFailed`` for an invalid graph and ``engine.ExecutionFailed`` when a node fails
    (unless ``raise_on_error=False``). ``targets`` runs only those nodes (and what they need) and returns their
    output values in ``result.values``.
    """
    g = as_engine_graph(graph)
    ex = executor(cache=cache, base_dir=base_dir, output_dir=output_dir)
    if set:
        g = g.copy()
        apply_settings(g, set, ex.registry)
    res = ex.run(g, targets=list(targets) if targets else None, sink=on_event, extra_data=extra_data)
    if raise_on_error:
        res.raise_for_status()
    from kiln.engine import get_folders

    return Result(res, ex.folders or get_folders())
