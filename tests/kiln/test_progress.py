"""The shared progress renderer behind ``kiln run`` (engine events) and ``kiln submit`` (websocket messages)."""

from __future__ import annotations

import io

from rich.console import Console

from kiln.engine import Graph, events
from kiln.progress import ProgressBars

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {}, "_meta": {"title": "Base"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
}


def bars(**kw) -> tuple[ProgressBars, io.StringIO]:
    out = io.StringIO()
    return ProgressBars(console=Console(file=out, width=100, force_terminal=False), **kw), out


def test_engine_events_draw_node_and_step_bars():
    g = Graph.from_json(GRAPH)
    pb, out = bars(label="[1/2] ")
    with pb:
        pb.engine_event(events.ExecutionStart("p"), g)
        pb.engine_event(events.ExecutionCached("p", nodes=["1"]), g)
        pb.engine_event(events.NodeStarted("p", node="2", class_type="ImageInvert"), g)
        pb.engine_event(events.Progress("p", node="2", value=3, max=4), g)
        pb.engine_event(events.NodeStarted("p", node="3", class_type="SaveImage"), g)
        pb.engine_event(events.ExecutionSuccess("p"), g)
    assert pb.done == 2  # kiln run counts nodes that ran; its summary line reports the cached ones
    assert "[1/2] done" in out.getvalue() and "2/2" in out.getvalue()


def test_wire_messages_count_cached_nodes_and_name_them():
    pb, out = bars(total=len(GRAPH))
    with pb:
        for m in [
            {"type": "execution_start", "data": {}},
            {"type": "execution_cached", "data": {"nodes": ["1"]}},
            {"type": "executing", "data": {"node": "2"}},
            {"type": "progress", "data": {"node": "2", "value": 1, "max": 2}},
            {"type": "executing", "data": {"node": "3"}},
            {"type": "execution_success", "data": {}},
            {"type": "executing", "data": {"node": None}},
        ]:
            pb.wire_message(m, GRAPH)
    assert pb.done == 3
    assert "done" in out.getvalue() and "3/3" in out.getvalue()


def test_disabled_draws_nothing_and_still_counts():
    pb, out = bars(enabled=False)
    with pb:
        pb.wire_message({"type": "executing", "data": {"node": "1"}}, GRAPH)
        pb.wire_message({"type": "progress", "data": {"node": "1", "value": 1, "max": 2}}, GRAPH)
        pb.wire_message({"type": "execution_error", "data": {"node_id": "1"}}, GRAPH)
    assert pb.done == 1 and out.getvalue() == ""
