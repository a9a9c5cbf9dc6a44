"""Random graphs and random JSON: the engine answers with a typed error or a result, never a crash."""

from __future__ import annotations

import json

import engine_testnodes as tn
from hypothesis import HealthCheck, given, settings, strategies as st

from kiln import engine
from kiln.engine import Executor, GraphFormatError, ValidationFailed
from kiln.server.protocol import event_message, format_error_data, validation_body

SAFE_CLASSES = [
    "Const",
    "Add",
    "FloatIn",
    "TextIn",
    "Pick",
    "Flag",
    "MakeImage",
    "Invert",
    "Show",
    "ShowImage",
    "Pair",
    "Checked",
    "Lazy",
    "Doubler",
    "Fingerprinted",
    "AnyLiteral",
    "Random",
    "Block",
    "Nope",
]
INPUT_NAMES = [
    "value",
    "a",
    "b",
    "x",
    "text",
    "mode",
    "on",
    "seed",
    "image",
    "n",
    "use_first",
    "first",
    "second",
    "times",
    "block",
    "message",
    "tag",
    "zz",
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)),
    max_leaves=6,
)


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 8))
    ids = [str(i) for i in range(n)]
    g = {}
    for nid in ids:
        inputs = {}
        for name in draw(st.lists(st.sampled_from(INPUT_NAMES), max_size=4, unique=True)):
            kind = draw(st.integers(0, 3))
            if kind == 0:
                inputs[name] = [draw(st.sampled_from(ids + ["missing"])), draw(st.integers(0, 2))]
            elif kind == 1:
                inputs[name] = {"__value__": draw(st.lists(json_scalars, max_size=3))}
            else:
                inputs[name] = draw(json_values)
        node = {"class_type": draw(st.sampled_from(SAFE_CLASSES)), "inputs": inputs}
        if draw(st.booleans()):
            node["_meta"] = {"title": draw(st.text(max_size=6))}
        g[nid] = node
    return g


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_never_crash(g):
    text = json.dumps(g)
    graph = engine.Graph.loads(text)
    assert json.loads(graph.dumps()) == g  # round trip holds for every graph
    reg = tn.make_registry()
    res = engine.validate(graph, reg)
    json.dumps(validation_body(res))
    if not res.ok:
        assert res.error is not None
        return
    r = Executor(reg).run(graph, validation=res)
    assert r.status in ("success", "error")
    if r.status == "error":
        json.dumps(event_message(r.error))
        assert r.error.node_id is not None


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.text(max_size=64),
        json_values.map(json.dumps),
        graphs().map(lambda g: json.dumps({"prompt": g})),
    )
)
def test_random_text_is_a_graph_or_a_format_error(data):
    try:
        graph = engine.Graph.loads(data)
    except GraphFormatError as exc:
        assert exc.message
        json.dumps(format_error_data(exc))
        return
    try:
        Executor(tn.make_registry()).run(graph)
    except ValidationFailed as exc:
        json.dumps(validation_body(exc.result))
