"""What the service keeps about a prompt, and the helpers that shape a submission."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from kiln.engine import Graph, KilnError, ValidationResult
from kiln.engine.events import NodeEvent

from .params import TOO_LONG, dumps_in_pieces
from .store import encode, json_number

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)", re.I)
MAX_PROMPT_ID = 256
# Events of a re-run (after a crash) are numbered from attempt * SEQ_EPOCH, so they always follow anything a
# client may have seen of the attempt that died, even events that were sent but never reached the disk.
SEQ_EPOCH = 1_000_000


class ApiError(KilnError):
    """A request the service refuses; ``body`` is the JSON answer."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        details: str = "",
        node_errors: dict | None = None,
        body: dict | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status = status
        self.body = (
            body
            if body is not None
            else {
                "error": {"type": type_, "message": message, "details": details, "extra_info": extra},
                "node_errors": node_errors or {},
            }
        )


@dataclass
class Job:
    prompt_id: str
    number: float
    graph: Graph
    validation: ValidationResult
    prompt_json: dict
    extra_data: dict
    sensitive: dict
    client_id: str | None
    outputs: list
    seq: int = 0
    status: str = "pending"
    messages: list = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    last_node: str | None = None
    previews: bool = False
    state_nodes: dict = field(default_factory=dict)  # progress_state per node, for negotiated clients
    open_node: NodeEvent | None = None  # the node whose progress_state is 'running'
    terminal: bool = False  # a success/error/interrupted event was dispatched
    watched: bool = False  # a socket of its client was connected when it started (no late delivery needed)
    prompt_text: str | None = None  # prompt_json as stored (encoded once, off the loop for a large graph)
    queue_text_cache: str | None = field(default=None, repr=False)
    worker: Any = None  # the worker running it (None: the server's own executor thread)
    losses: int = 0  # workers that died while running it
    interrupt_requested: bool = False  # /interrupt reached it while it ran
    stop_reason: str | None = None  # why the server stopped it (a limit), which fails it
    trace_id: str | None = None  # its OpenTelemetry trace (with --otel)

    @property
    def queue_item(self) -> list:
        return [json_number(self.number), self.prompt_id, self.prompt_json, self.extra_data, self.outputs]

    @property
    def queue_text(self) -> str:
        """``queue_item`` as JSON text, built once: a large graph is then never re-encoded on the loop."""
        if self.queue_text_cache is None:
            if self.prompt_text is None:
                self.prompt_text = encode(self.prompt_json)
            parts = [json.dumps(json_number(self.number)), json.dumps(self.prompt_id), self.prompt_text]
            self.queue_text_cache = "[" + ", ".join([*parts, encode(self.extra_data), encode(self.outputs)]) + "]"
        return self.queue_text_cache


def body_hash(data: dict) -> str:
    """What makes two submissions of one prompt_id the same: graph, targets, extra data."""
    key = {
        "prompt": data.get("prompt"),
        "targets": data.get("partial_execution_targets"),
        "extra": {k: v for k, v in (data.get("extra_data") or {}).items() if not SECRET_KEY.search(str(k))},
    }
    text = dumps_in_pieces(key, sort_keys=True, default=str)  # the text of json.dumps(key, sort_keys=True, ...)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def split_sensitive(extra: dict) -> tuple[dict, dict]:
    """Secrets never reach the store, history or events: they live in memory for the run only."""
    keep: dict = {}
    secret: dict = {}
    for k, v in extra.items():
        (secret if SECRET_KEY.search(str(k)) else keep)[k] = v
    return keep, secret


def check_strings(data: dict, limit: int) -> None:
    """Refuse a submission with a string longer than ``limit`` bytes (UTF-8), naming the node and input."""
    prompt = data.get("prompt")
    if isinstance(prompt, dict) and isinstance(prompt.get("nodes"), list):  # an editor (UI-format) workflow
        for node in prompt["nodes"]:
            if _too_long(node, limit):
                n = node if isinstance(node, dict) else {}
                _refuse(str(n.get("id")), n.get("type"), "widgets_values", limit)
        if _too_long({k: v for k, v in prompt.items() if k != "nodes"}, limit):
            _refuse(None, None, "prompt", limit)
    elif isinstance(prompt, dict):
        for nid, node in prompt.items():
            if not isinstance(node, dict):
                continue
            for key, value in node.items():
                if key == "inputs" and isinstance(value, dict):
                    for name, v in value.items():
                        if _too_long(v, limit):
                            _refuse(str(nid), node.get("class_type"), str(name), limit)
                elif _too_long(value, limit):
                    _refuse(str(nid), node.get("class_type"), str(key), limit)
    for key, value in data.items():
        if key != "prompt" and _too_long(value, limit):
            _refuse(None, None, str(key), limit)


def _too_long(value: Any, limit: int) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if (
                len(v) > limit
                or v.startswith(TOO_LONG)
                or (len(v) * 4 > limit and len(v.encode("utf-8", "surrogatepass")) > limit)
            ):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _refuse(node_id: str | None, class_type: Any, name: str, limit: int) -> None:
    where = f"input {name!r} of node {node_id!r} ({class_type})" if node_id is not None else f"field {name!r}"
    message = f"Value too long: {where} is longer than {limit} bytes"
    details = f"the server's limit for one string is {limit} bytes (kiln serve --max-string-bytes)"
    issue = {"type": "value_too_long", "message": message, "details": details, "extra_info": {"input_name": name}}
    node_errors = {}
    if node_id is not None:
        node_errors[node_id] = {"errors": [issue], "dependent_outputs": [], "class_type": str(class_type)}
    raise ApiError(
        400,
        "",
        "",
        body={"error": {**issue, "extra_info": {"node_id": node_id, "input_name": name}}, "node_errors": node_errors},
    )
