"""ComfyUI's websocket wire format: JSON messages and binary preview frames.

Binary frames start with a big-endian uint32 event type. Type 1: uint32 image format (1 JPEG, 2 PNG) then
the image bytes. Type 4: uint32 metadata length, metadata JSON, then the image bytes; only for sockets that
negotiated ``supports_preview_metadata``.

Per-prompt events carry a top-level ``"seq"`` (1, 2, ...) next to ``type`` and ``data``; ComfyUI clients
ignore it, Kiln's client uses it to ask for a replay from where it stopped.

``progress_state`` is a snapshot: the editor replaces its map of node states with each message's ``nodes``
(and applies only the last message of an animation frame), so a message must list every node it should
still know about. ComfyUI lists every node of the prompt that has started, on every change, which is
quadratic in the graph's size; ``ProgressStates`` does the same while at most ``SNAPSHOT_LIMIT`` nodes have
started (every graph a person draws), and past that lists the running nodes, the one that changed and the
``RECENT_FINISHED`` most recently finished ones, so a huge graph's messages stay small (linear in all).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kiln.engine
from kiln.engine import Graph, GraphFormatError, Issue, ValidationResult, events as ev

from . import params

PREVIEW_IMAGE = 1
PROGRESS_TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
FORMATS = {"JPEG": 1, "PNG": 2}
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}

# Kiln additions to the server feature flags
SERVER_FEATURES = {"submit_on_socket": True, "replay": True, "event_seq": True}


def dumps(obj) -> str:
    return params.dumps(obj)


def message(type_: str, data, seq: int | None = None) -> str:
    if seq is None:
        return dumps({"type": type_, "data": data})
    return dumps({"type": type_, "data": data, "seq": seq})


def message_from_json(type_: str, data_json: str, seq: int) -> str:
    """A logged event back into a message, without decoding its data."""
    return f'{{"type":{json.dumps(type_)},"data":{data_json},"seq":{int(seq)}}}'


def status_data(queue_remaining: int, sid: str | None = None) -> dict:
    d: dict = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
    if sid is not None:
        d["sid"] = sid
    return d


def preview_frame(fmt: str, data: bytes) -> bytes:
    return struct.pack(">II", PREVIEW_IMAGE, FORMATS.get(fmt.upper(), 1)) + data


def preview_frame_with_metadata(fmt: str, data: bytes, meta: dict) -> bytes:
    m = dumps({**meta, "image_type": MIME.get(fmt.upper(), "image/jpeg")}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(m)) + m + data


def progress_text_frame(node_id: str, text: str, prompt_id: str | None = None) -> bytes:
    """Binary type 3: a node's progress text. With ``prompt_id`` (for clients whose server flags include
    ``supports_progress_text_metadata``) the prompt id comes first, length-prefixed like the node id."""
    node = node_id.encode()
    head = struct.pack(">I", PROGRESS_TEXT)
    if prompt_id is not None:
        pid = prompt_id.encode()
        head += struct.pack(">I", len(pid)) + pid
    return head + struct.pack(">I", len(node)) + node + text.encode()


def error_message(type_: str, message_: str, details: str = "", **extra) -> str:
    return message("error", {"type": type_, "message": message_, "details": details, "extra_info": extra})


def server_features(max_upload: int) -> dict:
    return {"supports_preview_metadata": True, "max_upload_size": max_upload, "kiln": dict(SERVER_FEATURES)}


# -- progress_state --------------------------------------------------------------------------------------

SNAPSHOT_LIMIT = 64
RECENT_FINISHED = 8


class ProgressStates:
    """One prompt's node states, as ComfyUI's ``progress_state`` reports them (see the module docstring).

    ``update`` takes one node's change (an entry with ComfyUI's keys) and returns the message data to send,
    or None when nothing changed or the prompt has ended. A node that finishes keeps the ``max`` it last
    reported and its ``value`` becomes that ``max``; a node marked ``error`` stays so. ``nodes`` keeps the
    order in which nodes first appeared, like ComfyUI's.
    """

    def __init__(self, prompt_id: str, limit: int = SNAPSHOT_LIMIT, tail: int = RECENT_FINISHED) -> None:
        self.prompt_id = prompt_id
        self.limit = max(1, limit)
        self.tail = max(0, min(tail, self.limit))
        self.nodes: dict[str, dict] = {}
        self.first_seen: dict[str, int] = {}
        self.running: dict[str, None] = {}  # running (or failed) nodes, in order
        self.recent: dict[str, None] = {}  # finished nodes, least recently changed first
        self.failed: set[str] = set()
        self.ended = False

    def update(self, entry: dict) -> dict | None:
        if self.ended:
            return None
        node = str(entry.get("node_id"))
        changed = self._apply(node, entry)
        return self.message(node) if changed else None

    def _apply(self, node: str, entry: dict) -> bool:
        old = self.nodes.get(node)
        new = dict(entry)
        new["node_id"] = node
        new["prompt_id"] = self.prompt_id
        if node in self.failed:
            new["state"] = "error"
            if old is not None:
                new["value"], new["max"] = old["value"], old["max"]
        elif new.get("state") == "finished" and old is not None:
            new["value"] = new["max"] = old["max"]
        elif new.get("state") == "running" and new.get("value") == 0 and new.get("max") == 1:
            new["value"], new["max"] = 0.0, 1.0  # ComfyUI starts every node at 0.0 of 1.0
        if new == old:
            return False
        if old is None:
            self.first_seen[node] = len(self.first_seen)
        self.nodes[node] = new
        self.recent.pop(node, None)
        self.running.pop(node, None)
        if new["state"] == "finished":
            self.recent[node] = None
        else:
            self.running[node] = None
        return True

    def end(self, outcome: str, node_id: str | None = None) -> dict | None:
        """The prompt ended (``success``, ``error`` or ``interrupted``): the final message to send before the
        terminal event, if any, and no more after it. On success running nodes are finished; on an error
        the failed node (or, when none is named, every running one) is marked ``error``; an interruption
        leaves them as they are, as ComfyUI does."""
        if self.ended:
            return None
        self.ended = True
        if outcome == "success":
            hit = [n for n in self.running if self.nodes[n]["state"] == "running"]
            changed = [n for n in hit if self._apply(n, {**self.nodes[n], "state": "finished"})]
        elif outcome == "error":
            hit = [node_id] if node_id is not None and node_id in self.nodes else list(self.running)
            self.failed.update(hit)
            changed = [n for n in hit if self._apply(n, self.nodes[n])]
        else:
            changed = []
        return self.message(changed[-1]) if changed else None

    def message(self, changed: str | None = None) -> dict:
        return {"prompt_id": self.prompt_id, "nodes": self.snapshot(changed)}

    def snapshot(self, changed: str | None = None) -> dict:
        if len(self.nodes) <= self.limit:
            return dict(self.nodes)
        keep = dict.fromkeys(self.running)
        if changed is not None:
            keep[changed] = None
        room = len(keep) + self.tail
        for node in reversed(self.recent):
            if len(keep) >= room:
                break
            keep[node] = None
        return {n: self.nodes[n] for n in sorted(keep, key=self.first_seen.__getitem__)}


# -- engine events -> ComfyUI messages ---------------------------------------------------------------------
# The engine's events are neutral; this is the one place that knows ComfyUI's message names and shapes.


def event_message(event: ev.Event) -> tuple[str, dict]:
    """(message type, data) of the ComfyUI websocket message for an engine event."""
    render = _RENDER.get(type(event))
    if render is None:
        raise TypeError(f"no ComfyUI message for {type(event).__name__}")
    return render(event)


def node_ids(event: ev.NodeEvent) -> dict:
    """ComfyUI's four node ids of a node event (preview metadata and progress_state entries)."""
    return {
        "node_id": event.node,
        "display_node_id": event.display_node,
        "parent_node_id": event.parent_node,
        "real_node_id": event.real_node,
    }


def execution_error_data(e: ev.ExecutionError) -> dict:
    return {
        "prompt_id": e.prompt_id,
        "node_id": e.node_id,
        "node_type": e.node_type,
        "executed": list(e.executed),
        "exception_message": e.message,
        "exception_type": e.exception_type,
        "traceback": public_traceback(e.traceback),
        "current_inputs": e.inputs,
        "current_outputs": list(e.outputs),
        "timestamp": e.timestamp,
    }


def execution_error_from_data(data: dict, default_message: str = "") -> ev.ExecutionError:
    """The engine's typed error from a server's ``execution_error`` (or ``execution_interrupted``) data."""
    return ev.ExecutionError(
        str(data.get("prompt_id") or ""),
        node_id=data.get("node_id"),
        node_type=data.get("node_type"),
        executed=list(data.get("executed") or []),
        message=str(data.get("exception_message") or default_message),
        exception_type=str(data.get("exception_type") or ""),
        traceback=list(data.get("traceback") or []),
        inputs=dict(data.get("current_inputs") or {}),
        outputs=list(data.get("current_outputs") or []),
    )


def _blocked(e: ev.NodeBlocked) -> tuple[str, dict]:
    # ComfyUI reports a blocked call as a non-terminal execution_error of type ExecutionBlocked, without a
    # timestamp and with lists for inputs/outputs
    return "execution_error", {
        "prompt_id": e.prompt_id,
        "node_id": e.node_id,
        "node_type": e.node_type,
        "executed": list(e.executed),
        "exception_message": f"Execution Blocked: {e.message}",
        "exception_type": "ExecutionBlocked",
        "traceback": [],
        "current_inputs": [],
        "current_outputs": [],
    }


_RENDER: dict[type, Callable[[Any], tuple[str, dict]]] = {
    ev.ExecutionStart: lambda e: ("execution_start", {"prompt_id": e.prompt_id, "timestamp": e.timestamp}),
    ev.ExecutionCached: lambda e: (
        "execution_cached",
        {"nodes": list(e.nodes), "prompt_id": e.prompt_id, "timestamp": e.timestamp},
    ),
    ev.NodeStarted: lambda e: (
        "executing",
        {"node": e.display_node, "display_node": e.display_node, "prompt_id": e.prompt_id},
    ),
    ev.Progress: lambda e: (
        "progress",
        {"value": e.value, "max": e.max, "prompt_id": e.prompt_id, "node": e.display_node},
    ),
    ev.NodeOutput: lambda e: (
        "executed",
        {"node": e.node, "display_node": e.display_node, "output": e.output, "prompt_id": e.prompt_id},
    ),
    ev.ExecutionSuccess: lambda e: ("execution_success", {"prompt_id": e.prompt_id, "timestamp": e.timestamp}),
    ev.ExecutionError: lambda e: ("execution_error", execution_error_data(e)),
    ev.NodeBlocked: _blocked,
    ev.ExecutionInterrupted: lambda e: (
        "execution_interrupted",
        {
            "prompt_id": e.prompt_id,
            "node_id": e.node_id,
            "node_type": e.node_type,
            "executed": list(e.executed),
            "timestamp": e.timestamp,
        },
    ),
}


# -- validation results -> ComfyUI's {error, node_errors} body ------------------------------------------

_EXTRA_NAMES = {"error": "exception_message"}  # engine's name -> ComfyUI's extra_info key


def issue_data(issue: Issue) -> dict:
    extra = {_EXTRA_NAMES.get(k, k): v for k, v in issue.extra.items()}
    if isinstance(extra.get("traceback"), list):
        extra["traceback"] = public_traceback(extra["traceback"])
    return {"type": issue.kind, "message": issue.message, "details": issue.details, "extra_info": extra}


def node_errors(result: ValidationResult) -> dict:
    return {
        nid: {
            "errors": [issue_data(i) for i in p.issues],
            "dependent_outputs": list(p.dependent_outputs),
            "class_type": p.class_type,
        }
        for nid, p in result.problems.items()
    }


def node_warnings(result: ValidationResult, graph: Graph) -> dict:
    """What validation accepted but flagged (inputs a node does not declare, which are ignored), in the shape
    of ``node_errors``; sent only to a client that asks (``POST /prompt?warnings=true``)."""
    out = {}
    for nid, issues in result.warnings.items():
        node = graph.nodes.get(nid)
        out[nid] = {
            "errors": [issue_data(i) for i in issues],
            "dependent_outputs": [],
            "class_type": node.class_type if node is not None else None,
        }
    return out


def validation_body(result: ValidationResult) -> dict:
    """The body ComfyUI answers an invalid prompt with."""
    return {"error": issue_data(result.error) if result.error is not None else None, "node_errors": node_errors(result)}


def format_error_data(exc: GraphFormatError) -> dict:
    """A submission that is not a graph, as ComfyUI's ``invalid_prompt`` error."""
    return {"type": "invalid_prompt", "message": exc.message, "details": exc.details, "extra_info": {}}


# -- tracebacks as clients see them ------------------------------------------------------------------
# ComfyUI sends a failing node's traceback to clients. Kiln keeps the field but never shows where the server
# keeps its files: Kiln's own frames are relative to the package, a node pack's to its custom_nodes folder,
# and a frame of an installed library or of Python itself is reduced to its module name. The full traceback
# goes to the server log.

PACKAGE_ROOT = Path(kiln.engine.__file__).resolve().parents[1]
_LIBRARY_ROOTS = sorted(
    {
        os.path.realpath(p)
        for key in ("purelib", "platlib", "stdlib", "platstdlib")
        if (p := sysconfig.get_paths().get(key))
    },
    key=len,
    reverse=True,
)
_FILE = re.compile(r'File "([^"]+)"')


def _module_name(rel: str) -> str:
    rel = rel.replace(os.sep, "/")
    if rel.endswith(".py"):
        rel = rel[:-3]
    if rel.endswith("/__init__"):
        rel = rel[: -len("/__init__")]
    return rel.replace("/", ".")


def public_path(path: str) -> str:
    """How a source file is named to clients (see above)."""
    if path.startswith("<"):  # <frozen ...>, <string>
        return path
    real = os.path.realpath(path)
    parts = Path(real).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "<" + _module_name("/".join(parts[len(parts) - parts[::-1].index(marker) :])) + ">"
    if "custom_nodes" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("custom_nodes") :])
    try:
        return Path(real).relative_to(PACKAGE_ROOT).as_posix()
    except ValueError:
        pass
    for root in _LIBRARY_ROOTS:
        if real.startswith(root + os.sep):
            return "<" + _module_name(real[len(root) + 1 :]) + ">"
    return "<" + Path(real).name + ">"


def public_traceback(lines: Any) -> list:
    """A traceback (``traceback.format_exception`` chunks) with every path made public (see above)."""
    if not isinstance(lines, (list, tuple)):
        return []
    prefixes = [str(PACKAGE_ROOT) + os.sep, *(r + os.sep for r in _LIBRARY_ROOTS)]
    out = []
    for chunk in lines:
        text = _FILE.sub(lambda m: f'File "{public_path(m.group(1))}"', str(chunk))
        for prefix in prefixes:  # a path inside a message (a FileNotFoundError, say)
            if prefix in text:
                text = text.replace(prefix, "")
        out.append(text)
    return out
