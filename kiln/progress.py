"""Progress bars for the CLI: one bar for the run's nodes, one for the running node's steps.

:class:`ProgressBars` draws them on stderr; it knows nothing about where its news comes from. Two adapters
feed it: :meth:`ProgressBars.engine_event` takes the engine's typed events (``kiln run``, in-process) and
:meth:`ProgressBars.wire_message` takes a server's websocket messages (``kiln submit``), so both commands
show the same bars. Calls are thread-safe: the executor emits events from its worker thread.
"""

from __future__ import annotations

import threading
from typing import Any


class ProgressBars:
    """Node and step bars, labelled with ``label`` (e.g. ``"[2/6] "`` in a batch). ``enabled=False`` draws
    nothing, so callers never need to branch. ``total`` is the node count when known up front; ``console``
    (a ``rich.console.Console``) replaces the default one on stderr."""

    def __init__(self, *, enabled: bool = True, label: str = "", total: int | None = None, console: Any = None):
        self.enabled = enabled
        self.label = label
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._nodes_task: Any = None
        self._step_task: Any = None
        self._bars: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> ProgressBars:
        if self._bars is not None:
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)

    # -- what happened, in neutral terms ------------------------------------------------------------
    def start(self) -> None:
        """The run began: show the nodes bar (idempotent)."""
        with self._lock:
            self._ensure_nodes()

    def cached(self, count: int) -> None:
        """``count`` nodes were served from the cache; they count as done."""
        with self._lock:
            self._ensure_nodes()
            self.done += count
            if self._bars is not None:
                self._bars.update(self._nodes_task, completed=self.done)

    def node_started(self, node_id: str, title: str | None = None) -> None:
        """A node began running: count it and name it on the nodes bar; the previous node's steps go."""
        with self._lock:
            self._ensure_nodes()
            self.done += 1
            self._drop_steps()
            if self._bars is not None:
                name = f"#{node_id} {title}" if title else f"#{node_id}"
                self._bars.update(self._nodes_task, completed=self.done, description=f"{self.label}{name}")

    def step(self, node_id: str, value: int, maximum: int) -> None:
        """The running node reports ``value`` of ``maximum`` steps."""
        with self._lock:
            if self._bars is None:
                return
            if self._step_task is None:
                self._step_task = self._bars.add_task(f"  #{node_id} steps", total=maximum)
            self._bars.update(self._step_task, completed=value, total=maximum)

    def finish(self) -> None:
        """The run ended (whatever the outcome): the nodes bar shows what was done as complete."""
        with self._lock:
            self._drop_steps()
            if self._bars is not None and self._nodes_task is not None:
                n = max(self.done, 1)
                self._bars.update(self._nodes_task, total=n, completed=n, description=f"{self.label}done")

    # -- adapters -------------------------------------------------------------------------------------
    def engine_event(self, ev: Any, graph: Any = None) -> None:
        """Feed one of the engine's typed events; ``graph`` (an engine Graph) supplies node titles.

        Cached nodes are not counted here: ``kiln run`` reports them in its summary line instead.
        """
        from kiln.engine import events

        if isinstance(ev, events.ExecutionCached):
            self.start()
        elif isinstance(ev, events.NodeStarted):
            node = graph.nodes.get(ev.node) if graph is not None else None
            self.node_started(ev.display_node, (node.title if node else None) or ev.class_type)
        elif isinstance(ev, events.Progress):
            self.step(ev.display_node, ev.value, ev.max)
        elif isinstance(ev, events.TERMINAL):
            self.finish()

    def wire_message(self, msg: dict, graph: dict | None = None) -> None:
        """Feed one websocket message (``{"type", "data"}``, ComfyUI's protocol); ``graph`` is the API-format
        dict that was submitted, for node titles."""
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "execution_start":
            self.start()
        elif kind == "execution_cached":
            self.cached(len(data.get("nodes") or []))
        elif kind == "executing" and data.get("node") is not None:
            nid = str(data.get("display_node") or data["node"])
            node = (graph or {}).get(nid)
            title = None
            if isinstance(node, dict):
                title = (node.get("_meta") or {}).get("title") or node.get("class_type")
            self.node_started(nid, title if isinstance(title, str) else None)
        elif kind == "progress":
            self.step(
                str(data.get("display_node") or data.get("node")), int(data.get("value", 0)), int(data.get("max", 1))
            )
        elif kind in ("execution_success", "execution_interrupted") or (
            kind == "execution_error" and data.get("exception_type") != "ExecutionBlocked"
        ):
            self.finish()

    # -- internals ------------------------------------------------------------------------------------
    def _ensure_nodes(self) -> None:
        if self._bars is not None and self._nodes_task is None:
            self._nodes_task = self._bars.add_task(f"{self.label}nodes", total=self.total)

    def _drop_steps(self) -> None:
        if self._bars is not None and self._step_task is not None:
            self._bars.remove_task(self._step_task)
        self._step_task = None
