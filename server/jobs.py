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

from .store import json_number

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

    @property
    def queue_item(self) -> list:
        return [json_number(self.number), self.prompt_id, self.prompt_json, self.extra_data, self.outputs]


def body_hash(data: dict) -> str:
    """What makes two submissions of one prompt_id the same: graph, targets, extra data."""
    key = {
        "prompt": data.get("prompt"),
        "targets": data.get("partial_execution_targets"),
        "extra": {k: v for k, v in (data.get("extra_data") or {}).items() if not SECRET_KEY.search(str(k))},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def split_sensitive(extra: dict) -> tuple[dict, dict]:
    """Secrets never reach the store, history or events: they live in memory for the run only."""
    keep: dict = {}
    secret: dict = {}
    for k, v in extra.items():
        (secret if SECRET_KEY.search(str(k)) else keep)[k] = v
    return keep, secret
