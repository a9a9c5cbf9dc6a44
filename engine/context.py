"""What a running node can reach: progress reporting, cancellation, folders, the prompt id.

Nodes call :func:`progress` (or use :class:`ProgressBar`) and :func:`check_interrupted`; both find the
current node through a context variable, so they work from sync nodes, async nodes and helper code.
Every progress tick is also a cancellation point.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Interrupted
from .events import Event, Preview, Progress, ProgressText


@dataclass(frozen=True)
class RunOptions:
    """How the caller wants a run carried out, as opposed to what the graph says.

    ``previews``: someone is watching and wants preview images, so nodes that can render them should.
    """

    previews: bool = False


@dataclass
class RunContext:
    prompt_id: str
    emit: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    extra_data: dict = field(default_factory=dict)
    folders: Any = None
    services: dict = field(default_factory=dict)  # shared objects nodes may look up (model manager, ...)
    options: RunOptions = field(default_factory=RunOptions)
    annotations: dict[str, list] = field(default_factory=dict)
    _annotate_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def annotate(self, channel: str, entry: Any) -> None:
        """Attach ``entry`` to this run under ``channel``; the run's result carries every channel.

        A generic per-run channel that nodes write to (a node pack owns the meaning of its channels,
        e.g. a pack's ledger of paid API calls). Safe to call from async nodes running concurrently.
        """
        with self._annotate_lock:
            self.annotations.setdefault(channel, []).append(entry)

    def annotations_of(self, channel: str) -> list:
        with self._annotate_lock:
            return list(self.annotations.get(channel, ()))

    def check_interrupted(self) -> None:
        if self.cancel.is_set():
            raise Interrupted("Run was interrupted")


@dataclass
class NodeContext:
    run: RunContext
    node_id: str
    display_id: str
    class_type: str
    parent_id: str | None = None
    real_id: str = ""
    # the node's cache key in this run (content-derived: the same class, inputs and upstream give the same
    # bytes in any process), None when the node is not cacheable; lets a node keep its own durable results
    cache_key: bytes | None = None

    @property
    def prompt_id(self) -> str:
        return self.run.prompt_id

    @property
    def folders(self) -> Any:
        return self.run.folders

    @property
    def extra_data(self) -> dict:
        return self.run.extra_data

    def check_interrupted(self) -> None:
        self.run.check_interrupted()

    def progress(self, value: float, total: float, preview: Preview | None = None) -> None:
        self.run.check_interrupted()
        total = max(1, int(total))
        value = min(int(value), total)
        self.run.emit(
            Progress(
                self.run.prompt_id,
                node=self.node_id,
                display_node=self.display_id,
                parent_node=self.parent_id,
                real_node=self.real_id,
                value=value,
                max=total,
                preview=preview,
            )
        )

    def progress_text(self, text: str) -> None:
        """Show a line of status text for this node while it runs."""
        self.run.emit(
            ProgressText(
                self.run.prompt_id,
                node=self.node_id,
                display_node=self.display_id,
                parent_node=self.parent_id,
                real_node=self.real_id,
                text=str(text),
            )
        )

    @property
    def wants_previews(self) -> bool:
        """True when some client asked for preview images, so nodes can skip the work otherwise."""
        return bool(
            self.run.extra_data.get("preview_method", "none") not in ("none", None, False) or self.run.options.previews
        )


_current: contextvars.ContextVar[NodeContext | None] = contextvars.ContextVar("kiln_node_context", default=None)


def current() -> NodeContext | None:
    return _current.get()


_active_folders: contextvars.ContextVar[Any] = contextvars.ContextVar("kiln_active_folders", default=None)


def active_folders() -> Any:
    """The Folders of the executor that is validating or running now (None outside one).

    Combo choices that list model files read this, since validation runs before any node context exists.
    """
    ctx = _current.get()
    if ctx is not None and ctx.folders is not None:
        return ctx.folders
    return _active_folders.get()


class use_folders:
    """``with use_folders(folders): ...`` makes :func:`active_folders` return ``folders`` in the block."""

    def __init__(self, folders: Any):
        self.folders = folders
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Any:
        self._token = _active_folders.set(self.folders)
        return self.folders

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None:
            _active_folders.reset(self._token)


def progress(value: float, total: float, preview: Preview | None = None) -> None:
    """Report progress of the running node; a no-op outside a run. Raises Interrupted if cancelled."""
    ctx = _current.get()
    if ctx is not None:
        ctx.progress(value, total, preview)


def progress_text(text: str) -> None:
    """Show a line of status text for the running node; a no-op outside a run."""
    ctx = _current.get()
    if ctx is not None:
        ctx.progress_text(text)


def check_interrupted() -> None:
    ctx = _current.get()
    if ctx is not None:
        ctx.check_interrupted()


class ProgressBar:
    """ComfyUI-style progress bar: ``pbar = ProgressBar(steps); pbar.update(1)``."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.current = 0
        self._ctx = _current.get()

    def update_absolute(self, value: float, total: float | None = None, preview: Preview | None = None) -> None:
        if total is not None:
            self.total = max(1, int(total))
        self.current = min(int(value), self.total)
        ctx = _current.get() or self._ctx
        if ctx is not None:
            ctx.progress(self.current, self.total, preview)

    def update(self, n: float = 1, preview: Preview | None = None) -> None:
        self.update_absolute(self.current + n, None, preview)
