"""Lay out an API-format graph as the workflow editor saves it, for the UI-format conversion tests.

The editor's rules, as ``engine/ui_workflow.py`` reads them back: each node lists its socket inputs (with the
link id or ``null``) and, for a widget fed by a link, an input entry carrying ``"widget": {"name": ...}``;
``widgets_values`` holds every widget in declaration order, with the editor's own widgets in place (the
``control_after_generate`` mode after a seed, the upload button of an image loader); links are
``[id, origin_id, origin_slot, target_id, target_slot, type]`` with ``target_slot`` the index in ``inputs``.
"""

from __future__ import annotations

from typing import Any

from kiln.engine.ui_workflow import layout_from_object_info

EDITOR_ONLY = {"control_after_generate": "fixed", "control_filter_list": "", "upload": "image"}


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def editor_workflow(api: dict, registry: Any) -> dict:
    """The UI-format workflow an editor would save for ``api`` (node ids must be integers)."""
    layouts = {nid: layout_from_object_info(registry[n["class_type"]].object_info()) for nid, n in api.items()}
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    nodes = []
    for order, (nid, n) in enumerate(api.items()):
        layout, inputs = layouts[nid], n["inputs"]
        known = {name for name, _ in layout.sockets} | {w.name for w in layout.widgets if w.sent}
        assert set(inputs) <= known, f"{nid}: inputs the declaration lacks: {set(inputs) - known}"
        slots: list[dict] = []

        def connect(name: str, typ: str, value: Any, widget: bool, slots: list[dict] = slots, nid: str = nid) -> None:
            entry: dict[str, Any] = {"name": name, "type": typ, "link": None}
            if widget:
                entry["widget"] = {"name": name}
            if _is_link(value):
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(nid), len(slots), typ])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
                entry["link"] = link_id
            if entry["link"] is not None or not widget:
                slots.append(entry)

        for name, typ in layout.sockets:
            connect(name, typ, inputs.get(name), False)
        values = []
        for w in layout.widgets:
            if not w.sent:
                values.append(EDITOR_ONLY[w.name])
                continue
            v = inputs.get(w.name, w.default)
            if _is_link(v):
                connect(w.name, w.type, v, True)
                v = w.default  # the widget keeps a value of its own under the link
            values.append(v["__value__"] if isinstance(v, dict) and set(v) == {"__value__"} else v)
        node: dict[str, Any] = {
            "id": int(nid),
            "type": n["class_type"],
            "pos": [order * 320, 100],
            "size": [300, 120],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": slots,
            "properties": {"Node name for S&R": n["class_type"]},
            "widgets_values": values,
        }
        title = (n.get("_meta") or {}).get("title")
        if title and title != layout.display_name:
            node["title"] = title
        nodes.append(node)
    for node in nodes:
        layout = layouts[str(node["id"])]
        node["outputs"] = [
            {"name": t, "type": t, "links": out_links.get((str(node["id"]), i), []), "slot_index": i}
            for i, t in enumerate(layout.outputs)
        ]
    return {
        "id": "00000000-0000-4000-8000-000000000000",
        "revision": 0,
        "last_node_id": max((n["id"] for n in nodes), default=0),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": 0.4,
    }


def expected_api(api: dict, registry: Any) -> dict:
    """What Export (API) writes for the editor's copy of ``api``: every widget has a value (the default
    where the API graph left it out) and every node a title (the display name where it had none)."""
    out = {}
    for nid, n in api.items():
        layout = layout_from_object_info(registry[n["class_type"]].object_info())
        inputs = dict(n["inputs"])
        for w in layout.widgets:
            if w.sent and w.name not in inputs and w.has_default:
                inputs[w.name] = w.default
        title = (n.get("_meta") or {}).get("title") or layout.display_name
        out[nid] = {"inputs": inputs, "class_type": n["class_type"], "_meta": {"title": title}}
    return out
