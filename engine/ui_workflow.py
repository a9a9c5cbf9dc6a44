"""Editor (UI-format) workflows converted to API-format graphs, the way the editor's "Export (API)" does.

The editor saves ``{"nodes": [...], "links": [...], "definitions": {"subgraphs": [...]}, ...}``: each node
keeps its widget values as a positional list (``widgets_values``) and its connections in ``inputs``. To turn
that into ``{node_id: {"class_type", "inputs", "_meta"}}`` the converter needs the node declarations (the
registry's ``/object_info`` entries), because the positions of the widget values follow the declared input
order, with the editor's own extra widgets in between (the ``control_after_generate`` combo after a seed, a
filter box after a combo with one, the upload button of an image loader). The rules followed here:

- widget values map to widget inputs in declaration order; the editor-only widgets take a position and are
  dropped; ``widgets_values`` given as an object (or ``widgets_values_named``) is read by name;
- a connected input takes the link; links are followed through ``Reroute`` nodes, through bypassed nodes
  (mode 4: an output passes through the first input of a compatible type) and through subgraph instances,
  whose inner nodes get path ids (``"12:34"``: instance 12, inner node 34);
- a ``PrimitiveNode`` sets the widget it is connected to; notes, primitives and reroutes are not written;
- muted nodes (mode 2) are not written, and inputs linked to a node that is not written are dropped;
- ``_meta.title`` is the node's title, or the node's display name when the editor left the default.

Everything is resolved with explicit loops (no recursion), so long reroute chains and cycles are safe.
Anything malformed raises :class:`GraphFormatError` naming the node and the fix.

One file because the pieces (declaration layout, scopes, link resolution, PNG text chunks) share the
private data model and are only meaningful together; it reads top to bottom in that order.
"""

from __future__ import annotations

import json
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from .errors import GraphFormatError

MUTED, BYPASSED = 2, 4
VIRTUAL_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = -10, -20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_FIX_EXPORT = "Open it in the editor and save it again, or export it with Workflow > Export (API)"


def looks_like_ui_workflow(data: Any) -> bool:
    """True for an editor workflow (``nodes`` array plus ``links``/``version``/``last_node_id``)."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("nodes"), list)
        and ("links" in data or "last_node_id" in data or "version" in data)
    )


# -- the widget layout the editor builds from a node declaration ---------------------------------------------


@dataclass
class Widget:
    name: str
    type: str
    sent: bool = True  # False: an editor-only widget (control, filter, upload button): positional only
    dynamic_prompts: bool = False
    default: Any = None
    has_default: bool = False


@dataclass
class Layout:
    sockets: list[tuple[str, str]]  # non-widget inputs (name, type), in declaration order
    widgets: list[Widget]  # every widget, in the positions of widgets_values
    outputs: list[str]
    display_name: str


def _entry_type(entry: Any) -> tuple[str, dict]:
    if not isinstance(entry, (list, tuple)) or not entry:
        return "*", {}
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(entry[0], (list, tuple)):
        return "COMBO", opts
    return str(entry[0]), opts


def layout_from_object_info(info: dict) -> Layout:
    """The sockets and widgets the editor makes for one ``/object_info`` entry, in its order."""
    declared: dict = info["input"] if isinstance(info.get("input"), dict) else {}
    required: dict = declared.get("required") or {}
    optional: dict = declared.get("optional") or {}
    order: dict = info["input_order"] if isinstance(info.get("input_order"), dict) else {}
    names: list[str] = []
    for n in order.get("required") or []:
        if n in required and n not in names:
            names.append(n)
    for n in order.get("optional") or []:
        if n in optional and n not in names:
            names.append(n)
    names += [n for n in [*required, *optional] if n not in names]
    sockets: list[tuple[str, str]] = []
    widgets: list[Widget] = []
    upload = False
    required_widgets = -1  # widgets made for required inputs (where the upload button goes without input_order)
    for name in names:
        if required_widgets < 0 and name not in required:
            required_widgets = len(widgets)
        typ, opts = _entry_type(required[name] if name in required else optional[name])
        if typ not in WIDGET_TYPES or opts.get("forceInput"):
            sockets.append((name, typ))
            continue
        entry = required[name] if name in required else optional[name]
        choices = entry[0] if isinstance(entry[0], (list, tuple)) else opts.get("options")
        if "default" in opts:
            default, has_default = opts["default"], True
        elif typ == "COMBO" and isinstance(choices, (list, tuple)) and choices:
            default, has_default = choices[0], True  # the editor shows the first choice
        else:
            default, has_default = None, False
        widgets.append(
            Widget(name, typ, True, typ == "STRING" and opts.get("dynamicPrompts") is True, default, has_default)
        )
        control = opts.get("control_after_generate")
        if typ == "INT" and control is None:
            control = name in ("seed", "noise_seed")
        if control and typ in ("INT", "FLOAT"):
            widgets.append(Widget("control_after_generate", "COMBO", sent=False))
        elif control and typ == "COMBO":  # the mode combo and the filter box
            widgets += [
                Widget("control_after_generate", "COMBO", False),
                Widget("control_filter_list", "STRING", False),
            ]
        if typ == "COMBO" and name in required and any(opts.get(f) is True for f in UPLOAD_FLAGS):
            upload = True
    if upload:  # the upload button is declared last: after the optional inputs when input_order is given
        at = len(widgets) if order or required_widgets < 0 else required_widgets
        widgets.insert(at, Widget("upload", "IMAGEUPLOAD", sent=False))
    outputs = [str(t) if not isinstance(t, (list, tuple)) else "COMBO" for t in info.get("output") or []]
    return Layout(sockets, widgets, outputs, str(info.get("display_name") or info.get("name") or ""))


def _layout_from_spec(spec: Any) -> Layout:
    """Fallback when a declaration cannot produce its ``/object_info`` entry."""
    sockets, widgets = [], []
    for name, s in spec.inputs.items():
        if s.is_widget:
            widgets.append(Widget(name, s.type))
            if s.type == "INT" and (s.options.get("control_after_generate") or name in ("seed", "noise_seed")):
                widgets.append(Widget("control_after_generate", "COMBO", sent=False))
        else:
            sockets.append((name, s.type))
    return Layout(sockets, widgets, list(spec.output_types), spec.display_name or spec.name)


# -- dynamic prompts: what the editor does to {a|b} text when it queues ----------------------------------------

_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//[^\n\r]*")


def expand_dynamic_prompt(text: str, rng: random.Random) -> str:
    """Strip ``//`` and ``/* */`` comments, pick one option of each ``{a|b|c}`` (nested too), keep escapes."""

    def expand(s: str) -> str:
        s = _COMMENTS.sub("", s)
        out, i = [], 0
        while i < len(s):
            ch = s[i]
            if ch == "\\" and i + 1 < len(s):
                out.append(s[i : i + 2])
                i += 2
            elif ch == "{":
                options, cur, depth, i = [], [], 0, i + 1
                while i < len(s):
                    c = s[i]
                    i += 1
                    if c == "\\" and i < len(s):
                        cur.append(c + s[i])
                        i += 1
                        continue
                    if c == "{":
                        depth += 1
                    elif c == "}":
                        if not depth:
                            break
                        depth -= 1
                    elif c == "|" and not depth:
                        options.append("".join(cur))
                        cur = []
                        continue
                    cur.append(c)
                options.append("".join(cur))
                out.append(expand(rng.choice(options)))
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    return re.sub(r"\\([{}|])", r"\1", expand(text))


# -- the workflow's graphs ----------------------------------------------------------------------------------


@dataclass
class LinkRec:
    id: int
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int


@dataclass
class Slot:
    name: str
    type: str
    link: int | None


@dataclass
class Scope:
    """The root graph or one subgraph instance: its nodes and links, and the path that prefixes its ids."""

    definition: dict | None  # None for the root graph
    nodes: dict[str, dict]
    links: dict[int, LinkRec]
    path: tuple[str, ...] = ()
    instance: Item | None = None  # the subgraph node this scope is an instance of

    @property
    def key(self) -> str:
        return str(self.definition.get("id")) if self.definition else ""


@dataclass
class Item:
    exec_id: str
    node: dict
    scope: Scope
    cls: str
    mode: int
    layout: Layout | None
    inputs: list[Slot] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    child: Scope | None = None
    subgraph: dict | None = None

    @property
    def label(self) -> str:
        title = self.node.get("title")
        shown = f' "{title}"' if isinstance(title, str) and title and title != self.cls else ""
        return f"node #{self.exec_id}{shown} ({self.cls})"


def _fail(message: str, fix: str = _FIX_EXPORT) -> GraphFormatError:
    return GraphFormatError(f"UI workflow: {message}", fix)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _fail(f"{what} must be an integer, got {v!r}")
    return int(v)


def _read_links(raw: Any, where: str) -> dict[int, LinkRec]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise _fail(f"'links' of {where} must be a list")
    out: dict[int, LinkRec] = {}
    for entry in raw:
        if entry is None:
            continue
        if isinstance(entry, list) and len(entry) >= 5:
            lid, oid, oslot, tid, tslot = entry[:5]
        elif isinstance(entry, dict) and {"id", "origin_id", "origin_slot", "target_id", "target_slot"} <= set(entry):
            lid, oid, oslot, tid, tslot = (
                entry[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")
            )
        else:
            raise _fail(
                f"a link of {where} is not [id, origin_id, origin_slot, target_id, target_slot, type]: {entry!r}"
            )
        if not (type(lid) is int and type(oslot) is int and type(tslot) is int):  # checked only when unusual
            lid = _int(lid, f"a link id in {where}")
            oslot, tslot = _int(oslot, f"origin_slot of link {lid}"), _int(tslot, f"target_slot of link {lid}")
        out[lid] = LinkRec(lid, oid, oslot, tid, tslot)
    return out


def _read_nodes(raw: Any, where: str) -> dict[str, dict]:
    if not isinstance(raw, list):
        raise _fail(f"'nodes' of {where} must be a list of node objects")
    out: dict[str, dict] = {}
    for node in raw:
        if not isinstance(node, dict) or "id" not in node:
            raise _fail(f"an entry of 'nodes' in {where} is not a node object with an id: {str(node)[:80]}")
        if not isinstance(node.get("type"), str) or not node["type"]:
            raise _fail(f"node #{node['id']} in {where} has no 'type' (its node class)")
        nid = str(node["id"])
        if nid in out:
            raise _fail(f"node id {nid} appears twice in {where}", "Give every node its own id")
        out[nid] = node
    return out


def _collect_definitions(workflow: dict) -> dict[str, dict]:
    defs: dict[str, dict] = {}
    pending = [workflow]
    while pending:
        holder = pending.pop()
        d = holder.get("definitions")
        subgraphs = d.get("subgraphs") if isinstance(d, dict) else None
        if subgraphs is None:
            continue
        if not isinstance(subgraphs, list):
            raise _fail("'definitions.subgraphs' must be a list")
        for sg in subgraphs:
            if not isinstance(sg, dict) or not isinstance(sg.get("id"), str):
                raise _fail("a subgraph definition has no 'id'")
            if sg["id"] not in defs:
                defs[sg["id"]] = sg
                pending.append(sg)
    return defs


def _slot_list(raw: Any, label: str, key: str) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise _fail(f"{label}: '{key}' must be a list of slot objects")
    return raw


# -- conversion ------------------------------------------------------------------------------------------


class Converter:
    def __init__(self, workflow: dict, registry: Any, rng: random.Random | None = None):
        self.registry = registry
        self.rng = rng or random.Random()
        self.defs = _collect_definitions(workflow)
        self.items: dict[str, Item] = {}
        self.layouts: dict[str, Layout | None] = {}
        self.primitive_values: dict[tuple[str, str], dict[str, Any]] = {}
        self.def_scopes: dict[str, tuple[dict[str, dict], dict[int, LinkRec]]] = {}
        self.output_links: dict[str, dict[int, LinkRec]] = {}
        self.backed: dict[Any, list[bool]] = {}  # per subgraph: which inputs drive a widget inside
        root = Scope(
            None, _read_nodes(workflow["nodes"], "the workflow"), _read_links(workflow.get("links"), "the workflow")
        )
        self._collect_primitives(root)
        self._flatten(root)

    # -- declarations
    def layout(self, cls: str) -> Layout | None:
        if cls not in self.layouts:
            spec = self.registry.get(cls) if self.registry is not None else None
            if spec is None:
                self.layouts[cls] = None
            else:
                try:
                    self.layouts[cls] = layout_from_object_info(spec.object_info())
                except Exception:  # a declaration that cannot list itself: read the spec directly
                    self.layouts[cls] = _layout_from_spec(spec)
        return self.layouts[cls]

    # -- building the flat node table
    def _def_graph(self, sg: dict) -> tuple[dict[str, dict], dict[int, LinkRec]]:
        sid = sg["id"]
        if sid not in self.def_scopes:
            where = f"subgraph {sg.get('name') or sid!r}"
            self.def_scopes[sid] = (_read_nodes(sg.get("nodes") or [], where), _read_links(sg.get("links"), where))
        return self.def_scopes[sid]

    def subgraph_outputs(self, scope: Scope) -> dict[int, LinkRec]:
        """The links into a subgraph's output node, by output slot (the first one, as the editor keeps one)."""
        key = scope.key
        if key not in self.output_links:
            found: dict[int, LinkRec] = {}
            for lk in scope.links.values():
                if lk.target_id == SUBGRAPH_OUTPUT_NODE:
                    found.setdefault(lk.target_slot, lk)
            self.output_links[key] = found
        return self.output_links[key]

    def _collect_primitives(self, root: Scope) -> None:
        graphs = [("", root.nodes, root.links)]
        graphs += [(sid, *self._def_graph(sg)) for sid, sg in self.defs.items()]
        for key, nodes, links in graphs:
            by_origin: dict[str, list[LinkRec]] = {}
            for link in links.values():
                by_origin.setdefault(str(link.origin_id), []).append(link)
            for nid, node in nodes.items():
                if node["type"] != "PrimitiveNode":
                    continue
                values = node.get("widgets_values")
                if isinstance(values, dict):
                    values = list(values.values())
                if not isinstance(values, list) or not values:
                    continue
                for link in by_origin.get(nid, []):
                    if link.origin_slot != 0:
                        continue
                    target = nodes.get(str(link.target_id))
                    if target is None:
                        raise _fail(
                            f"link {link.id} from PrimitiveNode #{nid} points to missing node #{link.target_id}"
                        )
                    for entry in _slot_list(target.get("inputs"), f"node #{link.target_id}", "inputs"):
                        if entry.get("link") == link.id:
                            w = entry.get("widget")
                            name = w.get("name") if isinstance(w, dict) else entry.get("name")
                            if isinstance(name, str):
                                self.primitive_values.setdefault((key, str(link.target_id)), {})[name] = values[0]

    def _flatten(self, root: Scope) -> None:
        # (scope, nodes in order, chain of subgraph ids above) on an explicit stack, depth-first in order
        stack: list[tuple[Scope, list[dict], int, tuple[str, ...]]] = [(root, list(root.nodes.values()), 0, ())]
        while stack:
            scope, nodes, i, chain = stack.pop()
            if i >= len(nodes):
                continue
            stack.append((scope, nodes, i + 1, chain))
            item = self._make_item(scope, nodes[i])
            self.items[item.exec_id] = item
            if item.subgraph is None or item.mode in (MUTED, BYPASSED):
                continue
            sid = item.subgraph["id"]
            if sid in chain:
                raise _fail(
                    f"subgraph {item.subgraph.get('name') or sid!r} contains itself ({item.label})",
                    "Remove the nested instance",
                )
            inner_nodes, inner_links = self._def_graph(item.subgraph)
            child = Scope(item.subgraph, inner_nodes, inner_links, (*scope.path, str(item.node["id"])), item)
            item.child = child
            stack.append((child, list(inner_nodes.values()), 0, (*chain, sid)))

    def _make_item(self, scope: Scope, node: dict) -> Item:
        cls = node["type"]
        exec_id = ":".join((*scope.path, str(node["id"])))
        mode = node.get("mode", 0)
        mode = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0
        serial = _slot_list(node.get("inputs"), f"node #{exec_id} ({cls})", "inputs")
        item = Item(exec_id, node, scope, cls, mode, None)
        if cls.startswith(("workflow>", "workflow/")):
            raise _fail(
                f"{item.label} is a legacy group node",
                "In the editor, convert the group node to a subgraph (or ungroup it) and save the workflow again",
            )
        by_name = {}
        for entry in serial:
            w = entry.get("widget")
            name = w.get("name") if isinstance(w, dict) and isinstance(w.get("name"), str) else entry.get("name")
            by_name[str(name)] = entry
        declared: list[tuple[str, str]] = []
        if cls in self.defs and cls not in VIRTUAL_TYPES:
            item.subgraph = self.defs[cls]
            where = f"subgraph {item.subgraph.get('name') or cls!r}"
            declared = [
                (str(s.get("name")), str(s.get("type", "*")))
                for s in _slot_list(item.subgraph.get("inputs"), where, "inputs")
            ]
            item.outputs = [str(s.get("type", "*")) for s in _slot_list(item.subgraph.get("outputs"), where, "outputs")]
        elif cls not in VIRTUAL_TYPES:
            item.layout = self.layout(cls)
            if item.layout is None and _UUID.match(cls):
                raise _fail(
                    f"{item.label} is a subgraph whose definition is missing",
                    "Save the workflow again from the editor (it stores the definition under definitions.subgraphs)",
                )
        if item.layout is not None:
            declared = item.layout.sockets + [(w.name, w.type) for w in item.layout.widgets if w.sent]
            item.outputs = item.layout.outputs
        elif item.subgraph is None:
            item.outputs = [str(s.get("type", "*")) for s in _slot_list(node.get("outputs"), item.label, "outputs")]
        used = set()
        for name, typ in declared:
            used.add(name)
            item.inputs.append(Slot(name, typ, self._link_id(by_name.get(name), item)))
        for name, entry in by_name.items():
            if name not in used:
                item.inputs.append(
                    Slot(str(entry.get("name", name)), str(entry.get("type", "*")), self._link_id(entry, item))
                )
        return item

    @staticmethod
    def _link_id(entry: dict | None, item: Item) -> int | None:
        if entry is None or entry.get("link") is None:
            return None
        if type(entry["link"]) is int:
            return entry["link"]
        return _int(entry["link"], f"the link of input {entry.get('name')!r} of {item.label}")

    # -- widget values
    def widget_values(self, item: Item) -> dict[str, Any]:
        node, layout = item.node, item.layout
        raw = node.get("widgets_values")
        named = node.get("widgets_values_named")
        out: dict[str, Any] = {}
        if layout is None:  # unknown class: only values that carry their names can be placed
            known: dict = named if isinstance(named, dict) else raw if isinstance(raw, dict) else {}
            return {str(k): v for k, v in known.items()}
        if isinstance(named, dict) or isinstance(raw, dict):
            by_name: dict = named if isinstance(named, dict) else raw if isinstance(raw, dict) else {}
            out = {w.name: by_name[w.name] for w in layout.widgets if w.sent and w.name in by_name}
        elif raw is not None:
            if not isinstance(raw, list):
                raise _fail(f"{item.label}: 'widgets_values' must be a list or an object")
            if len(raw) > len(layout.widgets):
                expected = ", ".join(w.name for w in layout.widgets) or "none"
                raise _fail(
                    f"{item.label} has {len(raw)} widget value(s) but {item.cls} has {len(layout.widgets)} widget(s) "
                    f"({expected}), so the values cannot be matched to its inputs",
                    "The workflow was saved with another version of this node; open it in an editor that has the "
                    "same node definitions and save it again, or export it with Workflow > Export (API)",
                )
            # as the editor does on load: values by position, widgets past the saved ones keep their defaults
            out = {w.name: v for w, v in zip(layout.widgets, raw) if w.sent}
            out |= {w.name: w.default for w in layout.widgets[len(raw) :] if w.sent and w.has_default}
        primed = self.primitive_values.get((item.scope.key, str(node["id"])), {})
        out.update({w.name: primed[w.name] for w in layout.widgets if w.sent and w.name in primed})
        for w in layout.widgets:
            if w.dynamic_prompts and isinstance(out.get(w.name), str):
                out[w.name] = expand_dynamic_prompt(out[w.name], self.rng)
        return out

    def promoted_value(self, instance: Item, index: int) -> tuple[bool, Any]:
        """The value of an unconnected subgraph input that drives a widget inside (the instance's widget)."""
        sg = instance.subgraph or {}
        if sg.get("id") not in self.backed:
            self.backed[sg.get("id")] = [self._widget_backed(sg, k) for k in range(len(instance.inputs))]
        backed = self.backed[sg.get("id")]
        if index >= len(backed) or not backed[index]:
            return False, None
        name = instance.inputs[index].name
        named = instance.node.get("widgets_values_named")
        if isinstance(named, dict) and name in named:
            return True, named[name]
        values = instance.node.get("widgets_values")
        if isinstance(values, dict):
            return (name in values), values.get(name)
        position = sum(backed[:index])
        if isinstance(values, list) and position < len(values) and values[position] is not None:
            return True, values[position]
        return False, None

    def _widget_backed(self, sg: dict, index: int) -> bool:
        pending, seen = [(sg, index)], set()
        while pending:
            sg, index = pending.pop()
            if (sg.get("id"), index) in seen:
                continue
            seen.add((sg.get("id"), index))
            nodes, links = self._def_graph(sg)
            for link in links.values():
                if link.origin_id != SUBGRAPH_INPUT_NODE or link.origin_slot != index:
                    continue
                target = nodes.get(str(link.target_id))
                if target is None:
                    continue
                for entry in _slot_list(target.get("inputs"), f"node #{link.target_id}", "inputs"):
                    if entry.get("link") != link.id:
                        continue
                    if isinstance(entry.get("widget"), dict):
                        return True
                    inner = self.defs.get(target["type"])
                    if inner is not None:
                        names = [s.get("name") for s in _slot_list(inner.get("inputs"), "subgraph", "inputs")]
                        if entry.get("name") in names:
                            pending.append((inner, names.index(entry.get("name"))))
        return False

    # -- link resolution
    def resolve(self, item: Item, slot: int) -> tuple[str, Any, int] | None:
        """Follow input ``slot`` of ``item`` to ("link", exec_id, output) or ("value", v, -1), or None."""
        visited: set[tuple[str, str, int]] = set()
        state: tuple[str, Item, int, str | None] = ("in", item, slot, None)
        while True:
            kind, cur, idx, want = state
            if (kind, cur.exec_id, idx) in visited:
                raise _fail(
                    f"the links into {item.label} go round in a circle (through {cur.label})",
                    "Reconnect the reroutes so the chain starts at a real node's output",
                )
            visited.add((kind, cur.exec_id, idx))
            if kind == "in":
                slot_ = cur.inputs[idx]
                if slot_.link is None:
                    return None
                link = cur.scope.links.get(slot_.link)
                if link is None:
                    raise _fail(
                        f"input {slot_.name!r} of {cur.label} uses link {slot_.link}, which is not in 'links'",
                        "Reconnect the input in the editor and save again",
                    )
                inst = cur.scope.instance
                if inst is not None and link.origin_id == SUBGRAPH_INPUT_NODE:
                    if link.origin_slot >= len(inst.inputs):
                        raise _fail(f"{cur.label} is linked to subgraph input {link.origin_slot}, which does not exist")
                    if inst.inputs[link.origin_slot].link is None:
                        has, value = self.promoted_value(inst, link.origin_slot)
                        return ("value", value, -1) if has else None
                    primed = self.primitive_values.get((inst.scope.key, str(inst.node["id"])), {})
                    if inst.inputs[link.origin_slot].name in primed:  # a PrimitiveNode sets the promoted widget
                        return ("value", primed[inst.inputs[link.origin_slot].name], -1)
                    state = ("in", inst, link.origin_slot, None)
                    continue
                origin = self.items.get(":".join((*cur.scope.path, str(link.origin_id))))
                if origin is None:
                    raise _fail(
                        f"input {slot_.name!r} of {cur.label} is linked to node #{link.origin_id}, which is missing",
                        "Reconnect the input in the editor and save again",
                    )
                state = ("out", origin, link.origin_slot, want or slot_.type)
                continue
            # kind == "out": where does output idx of cur really come from?
            if cur.mode == BYPASSED:
                j = self._bypass_input(cur, idx, want or "*")
                if j < 0:
                    return None
                state = ("in", cur, j, None)
            elif cur.subgraph is not None:
                if cur.child is None:  # a muted instance: its consumers lose the input
                    return ("link", cur.exec_id, idx)
                inner = self.subgraph_outputs(cur.child).get(idx)
                if inner is None:
                    return None
                if inner.origin_id == SUBGRAPH_INPUT_NODE:
                    state = ("in", cur, inner.origin_slot, want)
                    continue
                origin = self.items.get(":".join((*cur.child.path, str(inner.origin_id))))
                if origin is None:
                    raise _fail(
                        f"output {idx} of subgraph {cur.label} comes from missing inner node #{inner.origin_id}"
                    )
                state = ("out", origin, inner.origin_slot, want)
            elif cur.cls in VIRTUAL_TYPES:
                if idx >= len(cur.inputs):
                    return None  # a primitive or a note: nothing flows out of it
                state = ("in", cur, idx, want)
            else:
                return ("link", cur.exec_id, idx)

    @staticmethod
    def _bypass_input(item: Item, slot: int, want: str) -> int:
        inputs = item.inputs
        if want in ("*", ""):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        out_type = item.outputs[slot] if slot < len(item.outputs) else "*"
        if slot < len(inputs) and types_connect(inputs[slot].type, out_type) and types_connect(inputs[slot].type, want):
            return slot
        for j, s in enumerate(inputs):
            if s.type == want:
                return j
        for j, s in enumerate(inputs):
            if types_connect(s.type, out_type) and types_connect(s.type, want):
                return j
        return -1

    # -- the API graph
    def prompt(self) -> dict:
        out: dict[str, dict] = {}
        for item in self.items.values():
            if item.cls in VIRTUAL_TYPES or item.subgraph is not None or item.mode in (MUTED, BYPASSED):
                continue
            inputs = {k: _wrap(v) for k, v in self.widget_values(item).items()}
            for i, s in enumerate(item.inputs):
                if s.link is None:
                    continue
                r = self.resolve(item, i)
                if r is None:
                    continue
                inputs[s.name] = _wrap(r[1]) if r[0] == "value" else [r[1], r[2]]
            title = item.node.get("title")
            if not isinstance(title, str) or not title:
                title = item.layout.display_name if item.layout and item.layout.display_name else item.cls
            out[item.exec_id] = {"inputs": inputs, "class_type": item.cls, "_meta": {"title": title}}
        for entry in out.values():
            inputs = entry["inputs"]
            for name in [n for n, v in inputs.items() if isinstance(v, list) and len(v) == 2 and v[0] not in out]:
                del inputs[name]
        return out


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


def types_connect(a: Any, b: Any) -> bool:
    """The editor's link type check: ``*``/empty match anything; otherwise case-insensitive, comma sets intersect."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    sa, sb = str(a).lower(), str(b).lower()
    if "," not in sa and "," not in sb:
        return sa == sb
    return bool(set(sa.split(",")) & set(sb.split(",")))


def workflow_to_prompt(workflow: Any, registry: Any, *, rng: random.Random | None = None) -> dict:
    """An editor workflow as the API-format prompt the editor's "Export (API)" would write.

    ``registry``: the node declarations (a :class:`~kiln.engine.Registry` or anything with ``get(name)``
    returning a NodeSpec). ``rng`` picks the options of ``{a|b}`` dynamic prompts (random by default, as in
    the editor). Nodes of unknown classes are kept with their ``class_type`` so validation names them.
    """
    if not looks_like_ui_workflow(workflow):
        raise _fail("this is not an editor workflow (no 'nodes' list)")
    if not workflow["nodes"]:
        raise GraphFormatError(
            "The UI-format workflow has no nodes", "Add nodes in the editor and save it again (or use Export (API))"
        )
    return Converter(workflow, registry, rng).prompt()


# -- workflows embedded in PNG files ---------------------------------------------------------------------


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file, keyword -> text."""
    if not data.startswith(PNG_SIGNATURE):
        raise GraphFormatError("Not a PNG file")
    out: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if len(body) < length:
            raise GraphFormatError("The PNG file is truncated", "Use the complete image file")
        try:
            if ctype == b"tEXt":
                key, _, text = body.partition(b"\0")
                out[key.decode("latin-1")] = text.decode("latin-1")
            elif ctype == b"zTXt":
                key, _, rest = body.partition(b"\0")
                out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif ctype == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed = rest[:1] == b"\1"
                _lang, _, rest = rest[2:].partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                out[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
            elif ctype == b"IEND":
                break
        except (zlib.error, UnicodeDecodeError) as exc:
            raise GraphFormatError("A text chunk of the PNG file cannot be read", str(exc)) from exc
    return out


def graph_data_from_png(data: bytes) -> Any:
    """The graph a PNG carries: its API ``prompt`` chunk when present, else its editor ``workflow`` chunk."""
    chunks = png_text_chunks(data)
    for key in ("prompt", "workflow"):
        if key in chunks:
            try:
                return json.loads(chunks[key], parse_constant=_no_constant)
            except ValueError as exc:
                raise GraphFormatError(f"The PNG's {key!r} text is not valid JSON", str(exc)[:200]) from exc
    raise GraphFormatError(
        "This PNG carries no workflow (no 'prompt' or 'workflow' text chunk)",
        "Use an image saved by SaveImage in Kiln or ComfyUI, with its metadata kept",
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
