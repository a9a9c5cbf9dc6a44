"""Graphs in ComfyUI's API format, read into an explicit model and written back unchanged.

On the wire: ``{node_id: {"class_type": str, "inputs": {name: literal | [src_id, slot]}, "_meta": {...}}}``.
Past this module nothing recognises a link by its shape: inputs hold :class:`Link` objects or literal
values (list literals unwrapped from ``{"__value__": [...]}``), and malformed link-like lists are kept as
:class:`BadLink` so validation can report them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GraphFormatError

MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Link:
    """A connection to output ``slot`` of node ``node_id``."""

    node_id: str
    slot: int
    raw_slot: int | float | None = None  # as written (a float slot round-trips as a float)

    def to_json(self) -> list:
        return [self.node_id, self.raw_slot if self.raw_slot is not None else self.slot]


@dataclass(frozen=True, slots=True)
class BadLink:
    """A list in an input position that is not a valid ``[node_id, slot]`` link."""

    value: list


@dataclass
class NodeEntry:
    id: str
    class_type: Any
    inputs: dict[str, Any] = field(default_factory=dict)
    meta: dict | None = None
    extra: dict = field(default_factory=dict)  # other keys of the node object, kept for round-trip
    wrapped: frozenset = frozenset()  # inputs written as {"__value__": x} with a non-list x
    parent: str | None = None  # for nodes created by expansion
    display_id: str | None = None

    @property
    def title(self) -> str | None:
        t = (self.meta or {}).get("title") if isinstance(self.meta, dict) else None
        return t if isinstance(t, str) else None

    def links(self) -> Iterator[tuple[str, Link]]:
        for name, v in self.inputs.items():
            if isinstance(v, Link):
                yield name, v

    def label(self) -> str:
        t = self.title
        return (
            f'#{self.id} "{t}" ({self.class_type})' if t and t != self.class_type else f"#{self.id} ({self.class_type})"
        )

    def to_json(self) -> dict:
        inputs: dict[str, Any] = {}
        for name, v in self.inputs.items():
            if isinstance(v, Link):
                inputs[name] = v.to_json()
            elif isinstance(v, BadLink):
                inputs[name] = v.value
            elif isinstance(v, (list, tuple)) or name in self.wrapped:
                # a tuple set from Python is a list in JSON: wrapped too, or it would load back as a link
                inputs[name] = {"__value__": list(v) if isinstance(v, tuple) else v}
            else:
                inputs[name] = v
        out: dict[str, Any] = {"inputs": inputs, "class_type": self.class_type}
        if self.meta is not None:
            out["_meta"] = self.meta
        out.update(self.extra)
        return out


def _is_link(v: list) -> bool:
    return (
        len(v) == 2
        and isinstance(v[0], str)
        and isinstance(v[1], (int, float))
        and not isinstance(v[1], bool)
        and math.isfinite(v[1])
        and float(v[1]).is_integer()
        and v[1] >= 0
    )


def parse_input(value: Any) -> tuple[Any, bool]:
    """One input value from JSON to the model: (value, was_wrapped_non_list)."""
    if isinstance(value, list):
        if _is_link(value):
            return Link(value[0], int(value[1]), value[1]), False
        return BadLink(value), False
    if isinstance(value, dict) and set(value) == {"__value__"}:
        inner = value["__value__"]
        return inner, not isinstance(inner, list)
    return value, False


class Graph:
    """A workflow graph: nodes by id, in insertion order."""

    def __init__(self, nodes: dict[str, NodeEntry] | None = None):
        self.nodes: dict[str, NodeEntry] = nodes or {}

    # -- reading ------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: Any, registry: Any = None) -> Graph:
        """Build from a decoded API-format prompt (not the envelope: see :func:`parse_submission`).

        An editor (UI-format) workflow is converted when ``registry`` (the node declarations, or a function
        that returns them, called only then) is given, and refused with the way out otherwise.
        """
        if not isinstance(data, dict):
            raise GraphFormatError(
                "A graph must be a JSON object mapping node ids to nodes", f"got {type(data).__name__}"
            )
        if _looks_like_ui_workflow(data):
            if registry is None:
                raise GraphFormatError(
                    "This is a UI-format workflow (it has 'nodes' and 'links' arrays), not an API-format graph",
                    "Kiln converts it when it knows the nodes: run it with 'kiln run'/'kiln validate', load it "
                    "with kiln.Graph.load, or pass registry= to Graph.load/loads/from_json. Or, in ComfyUI, use "
                    "'Export (API)' (Workflow > Export (API)) and submit that file.",
                )
            from .ui_workflow import workflow_to_prompt

            data = workflow_to_prompt(data, registry() if callable(registry) else registry)
        nodes: dict[str, NodeEntry] = {}
        for nid, obj in data.items():
            nid = str(nid)
            if not isinstance(obj, dict):
                raise GraphFormatError(
                    f"Node {nid!r} must be an object with class_type and inputs", f"Node ID '#{nid}'"
                )
            raw_inputs = obj.get("inputs", {})
            if raw_inputs is None:
                raw_inputs = {}
            if not isinstance(raw_inputs, dict):
                raise GraphFormatError(f"Node {nid!r}: 'inputs' must be an object", f"Node ID '#{nid}'")
            inputs: dict[str, Any] = {}
            wrapped = set()
            for name, v in raw_inputs.items():
                val, w = parse_input(v)
                inputs[str(name)] = val
                if w:
                    wrapped.add(str(name))
            meta = obj.get("_meta")
            # keys Kiln does not model (and a _meta that is not an object) are kept to be written back
            extra = {
                k: v
                for k, v in obj.items()
                if k not in ("inputs", "class_type", "_meta") or (k == "_meta" and not isinstance(v, dict))
            }
            nodes[nid] = NodeEntry(
                id=nid,
                class_type=obj.get("class_type"),
                inputs=inputs,
                meta=meta if isinstance(meta, dict) else None,
                extra=extra,
                wrapped=frozenset(wrapped),
            )
        return cls(nodes)

    @classmethod
    def loads(cls, text: str | bytes, registry: Any = None) -> Graph:
        """From JSON text, or the bytes of a PNG that carries a workflow (its ``prompt`` chunk preferred).
        With ``registry``, editor (UI-format) workflows are converted (see :mod:`.ui_workflow`)."""
        if isinstance(text, (bytes, bytearray)) and bytes(text[:8]) == b"\x89PNG\r\n\x1a\n":
            from .ui_workflow import graph_data_from_png

            return parse_submission(graph_data_from_png(bytes(text)), registry)[0]
        return parse_submission(decode_json(text), registry)[0]

    @classmethod
    def load(cls, path: str | Path, registry: Any = None) -> Graph:
        """From a JSON file or a PNG with an embedded workflow; ``registry`` as in :meth:`loads`."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise GraphFormatError(f"Cannot read graph file {str(p)!r}: {exc.strerror or exc}") from exc
        return cls.loads(raw, registry)

    # -- writing ------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {nid: n.to_json() for nid, n in self.nodes.items() if n.parent is None}

    def dumps(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json(), indent=indent, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        text = self.dumps()
        try:
            data = (text + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in some string: write it as a \\u escape instead
            data = (json.dumps(self.to_json(), indent=2, ensure_ascii=True) + "\n").encode("ascii")
        Path(path).write_bytes(data)

    # -- queries ------------------------------------------------------------------------------------
    def __contains__(self, nid: object) -> bool:
        return nid in self.nodes

    def __getitem__(self, nid: str) -> NodeEntry:
        return self.nodes[nid]

    def __len__(self) -> int:
        return len(self.nodes)

    def copy(self) -> Graph:
        return Graph(
            {
                nid: NodeEntry(
                    n.id, n.class_type, dict(n.inputs), n.meta, dict(n.extra), n.wrapped, n.parent, n.display_id
                )
                for nid, n in self.nodes.items()
            }
        )

    def find(self, ref: str) -> NodeEntry | None:
        """A node by id, else by exact title (unique), for ``--set`` style addressing."""
        if ref in self.nodes:
            return self.nodes[ref]
        hits = [n for n in self.nodes.values() if n.title == ref]
        if len(hits) > 1:
            raise GraphFormatError(
                f"Title {ref!r} names {len(hits)} nodes ({', '.join(n.id for n in hits)}); use the node id instead"
            )
        return hits[0] if hits else None


def _looks_like_ui_workflow(data: dict) -> bool:
    return isinstance(data.get("nodes"), list) and ("links" in data or "last_node_id" in data or "version" in data)


def decode_json(text: str | bytes) -> Any:
    """Decode JSON strictly: UTF-8 only, no NaN/Infinity, bounded size and depth."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_JSON_BYTES:
            raise GraphFormatError("Graph JSON is too large", f"{len(text)} bytes; the limit is {MAX_JSON_BYTES}")
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise GraphFormatError(
                "Graph JSON is not valid UTF-8", f"byte {exc.start}: {exc.reason}; save the file as UTF-8"
            ) from exc
    if len(text) > MAX_JSON_BYTES:
        raise GraphFormatError("Graph JSON is too large", f"the limit is {MAX_JSON_BYTES} bytes")

    def _no_constants(name: str) -> Any:
        raise GraphFormatError(f"Graph JSON contains {name}, which is not valid JSON", "Use a finite number instead")

    try:
        return json.loads(text, parse_constant=_no_constants)
    except GraphFormatError:
        raise
    except RecursionError as exc:
        raise GraphFormatError("Graph JSON is nested too deeply", "Flatten the structure") from exc
    except json.JSONDecodeError as exc:
        raise GraphFormatError("Graph JSON is malformed", f"line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except ValueError as exc:  # e.g. an integer literal with more digits than Python will convert
        raise GraphFormatError("Graph JSON contains a value Kiln cannot read", str(exc)[:200]) from exc


@dataclass
class Submission:
    """A graph plus ComfyUI's envelope fields."""

    graph: Graph
    client_id: str | None = None
    prompt_id: str | None = None
    extra_data: dict = field(default_factory=dict)
    partial_execution_targets: list[str] | None = None
    front: bool = False
    number: float | None = None


def parse_submission(data: Any, registry: Any = None) -> tuple[Graph, Submission]:
    """Accept a bare API graph or ComfyUI's ``{"prompt": {...}, "client_id", ...}`` envelope.

    With ``registry`` (the node declarations), an editor (UI-format) workflow in either place is converted.
    """
    if (
        isinstance(data, dict)
        and "prompt" in data
        and isinstance(data.get("prompt"), (dict, type(None)))
        and not _looks_like_node(data.get("prompt"))
    ):
        if data["prompt"] is None:
            raise GraphFormatError("No prompt provided", "The 'prompt' field is empty")
        g = Graph.from_json(data["prompt"], registry)
        extra = data.get("extra_data")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise GraphFormatError("'extra_data' must be an object")
        targets = data.get("partial_execution_targets")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise GraphFormatError("'partial_execution_targets' must be a list of node ids")
        cid = data.get("client_id")
        pid = data.get("prompt_id")
        number = data.get("number")
        return g, Submission(
            g,
            client_id=str(cid) if cid is not None else None,
            prompt_id=str(pid) if pid is not None else None,
            extra_data=extra,
            partial_execution_targets=targets,
            front=bool(data.get("front", False)),
            number=number if isinstance(number, (int, float)) and not isinstance(number, bool) else None,
        )
    g = Graph.from_json(data, registry)
    return g, Submission(g)


def _looks_like_node(v: Any) -> bool:
    # a graph whose node id happens to be "prompt" vs the envelope
    return isinstance(v, dict) and "class_type" in v
