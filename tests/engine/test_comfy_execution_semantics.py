"""ComfyUI's execution semantics on Kiln's engine: while-loops by node expansion, the DYNPROMPT hidden input,
expansion ids derived from the expanding node, expanding and plain calls of one list-mapped node, hidden
inputs of kinds the engine does not fill, ComfyUI's module paths for ExecutionBlocker and ProgressBar, and an
async VALIDATE_INPUTS through a real server.

The nodes are classic (ComfyUI-style) classes written here, so the engine sees what a custom pack gives it.
"""

from __future__ import annotations

import asyncio
import importlib

import pytest

from kiln import compat, engine
from kiln.engine import Executor, Graph, GraphBuilder, Registry
from kiln.engine.events import NodeBlocked, NodeOutput, NodeStarted, Progress

LOOP_SLOTS = 2


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


class XConst:
    RETURN_TYPES = ("INT",)
    FUNCTION = "go"
    CALLS: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -1000, "max": 1000})}}

    def go(self, value):
        XConst.CALLS.append(value)
        return (value,)


class XAdd:
    RETURN_TYPES = ("INT",)
    FUNCTION = "go"
    CALLS: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}), "b": ("INT", {"default": 1})}}

    def go(self, a, b):
        XAdd.CALLS.append((a, b))
        return (a + b,)


class XLess:
    RETURN_TYPES = ("BOOLEAN",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}), "b": ("INT", {"default": 0})}}

    def go(self, a, b):
        return (a < b,)


class XShow:
    """Output node: shows every value it got (a whole list)."""

    RETURN_TYPES = ()
    FUNCTION = "go"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    def go(self, value):
        return {"ui": {"value": list(value)}}


class XLoopOpen:
    """Start of a while loop: passes its initial values on, plus a handle the close node links back to."""

    RETURN_TYPES = ("FLOW_CONTROL",) + ("*",) * LOOP_SLOTS
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {f"init{i}": ("*",) for i in range(LOOP_SLOTS)}}

    def go(self, **kw):
        return ("open",) + tuple(kw.get(f"init{i}") for i in range(LOOP_SLOTS))


class XLoopClose:
    """End of a while loop: while ``more`` is true, expands into a copy of the loop body (open node to this
    one) fed with this iteration's values; its outputs become the copy's outputs."""

    RETURN_TYPES = ("*",) * LOOP_SLOTS
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"flow": ("FLOW_CONTROL", {"rawLink": True}), "more": ("BOOLEAN", {"forceInput": True})},
            "optional": {f"value{i}": ("*",) for i in range(LOOP_SLOTS)},
            "hidden": {"dynprompt": "DYNPROMPT", "me": "UNIQUE_ID"},
        }

    def go(self, flow, more, dynprompt=None, me=None, **kw):
        values = [kw.get(f"value{i}") for i in range(LOOP_SLOTS)]
        if not more:
            return tuple(values)
        # the body: nodes downstream of the open node that this node depends on
        feeds: dict[str, set] = {}  # node -> nodes that take one of its outputs, within my upstream
        todo = [me]
        while todo:
            nid = todo.pop()
            for v in dynprompt.get_node(nid)["inputs"].values():
                if _is_link(v):
                    first = v[0] not in feeds
                    feeds.setdefault(v[0], set()).add(nid)
                    if first:
                        todo.append(v[0])
        body = {flow[0], me}
        todo = [flow[0]]
        while todo:
            for nxt in feeds.get(todo.pop(), ()):
                if nxt not in body:
                    body.add(nxt)
                    todo.append(nxt)
        b = GraphBuilder()
        name = {nid: ("again" if nid == me else nid) for nid in body}
        for nid in body:
            node = b.node(dynprompt.get_node(nid)["class_type"], name[nid])
            node.set_override_display_id(nid)
        for nid in body:
            node = b.lookup_node(name[nid])
            for k, v in dynprompt.get_node(nid)["inputs"].items():
                if _is_link(v) and v[0] in body:
                    node.set_input(k, b.lookup_node(name[v[0]]).out(v[1]))
                else:
                    node.set_input(k, v)
        opener = b.lookup_node(flow[0])
        for i in range(LOOP_SLOTS):
            opener.set_input(f"init{i}", values[i])
        again = b.lookup_node("again")
        return {"result": tuple(again.out(i) for i in range(LOOP_SLOTS)), "expand": b.finalize()}


class XLinkBack:
    """Expands into ``XAdd(<node named by target>, x)``: a link back to a node that ran before."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True}), "target": ("STRING", {"default": ""})}}

    def go(self, x, target):
        b = GraphBuilder()
        s = b.node("XAdd", a=[target, 0], b=x)
        return {"result": (s.out(0),), "expand": b.finalize()}


class XRange:
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 3})}}

    def go(self, n):
        return (list(range(1, n + 1)),)


class XOddExpands:
    """Called once per list item: odd items expand into ``x + 100``, even items return ``x * 10`` directly."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}

    def go(self, x):
        if x % 2 == 0:
            return (x * 10,)
        b = GraphBuilder()
        c = b.node("XConst", value=x)
        s = b.node("XAdd", a=c.out(0), b=100)
        return {"result": (s.out(0),), "expand": b.finalize()}


class XWhoAmI:
    """Reports what the DYNPROMPT hidden input says about this node."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"
    SEEN: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"value": ("INT", {"default": 0})},
            "hidden": {"dynprompt": "DYNPROMPT", "uid": "UNIQUE_ID"},
        }

    def go(self, value, dynprompt, uid):
        parent = dynprompt.get_parent_node_id(uid)
        XWhoAmI.SEEN.append(
            {
                "uid": uid,
                "class": dynprompt.get_node(uid)["class_type"],
                "value": dynprompt.get_node(uid)["inputs"]["value"],
                "parent": parent,
                "parent_class": dynprompt.get_node(parent)["class_type"] if parent else None,
                "real": dynprompt.get_real_node_id(uid),
                "display": dynprompt.get_display_node_id(uid),
                "has_self": dynprompt.has_node(uid),
                "has_bogus": dynprompt.has_node("no-such-node"),
                "all": dynprompt.all_node_ids(),
                "original": set(dynprompt.get_original_prompt()),
            }
        )
        return (value,)


class XWrapWho:
    """Expands into one XWhoAmI (shown as ``show_as`` when given) and returns its output."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0}), "show_as": ("STRING", {"default": ""})}}

    def go(self, value, show_as):
        b = GraphBuilder()
        n = b.node("XWhoAmI", value=value)
        if show_as:
            n.set_override_display_id(show_as)
        return {"result": (n.out(0),), "expand": b.finalize()}


class XTwoBuilders:
    """Each call builds two subgraphs' worth of ids (two GraphBuilders) and returns the sum."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}

    def go(self, x):
        b1, b2 = GraphBuilder(), GraphBuilder()
        c = b1.node("XConst", value=x)
        s = b2.node("XAdd", a=c.out(0), b=1)
        return {"result": (s.out(0),), "expand": {**b1.finalize(), **b2.finalize()}}


class XAsyncExpand:
    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}

    async def go(self, x):
        await asyncio.sleep(0)
        b = GraphBuilder()
        c = b.node("XConst", value=x + 500)
        return {"result": (c.out(0),), "expand": b.finalize()}


class XOddHidden:
    """Hidden inputs of kinds the engine does not fill (ComfyUI passes them what the graph gives)."""

    RETURN_TYPES = ("STRING",)
    FUNCTION = "go"
    CALLS: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"value": ("INT", {"default": 0})},
            "hidden": {"note": "STRING", "anything": ("*",), "unset": "INT"},
        }

    def go(self, value, note="(none)", anything="(none)", unset="(none)"):
        XOddHidden.CALLS.append((note, anything, unset))
        return (f"{value}:{note}:{anything}:{unset}",)


CLASSES = [
    XConst,
    XAdd,
    XLess,
    XShow,
    XLoopOpen,
    XLoopClose,
    XLinkBack,
    XRange,
    XOddExpands,
    XWhoAmI,
    XWrapWho,
    XTwoBuilders,
    XAsyncExpand,
    XOddHidden,
]


@pytest.fixture
def xreg() -> Registry:
    for cls in (XConst, XAdd, XOddHidden):
        cls.CALLS.clear()
    XWhoAmI.SEEN.clear()
    reg = Registry()
    for cls in CLASSES:
        reg.register(cls, python_module="custom_nodes.exec_semantics")
    return reg


def _run(reg_or_ex, graph: dict, **kw):
    ex = reg_or_ex if isinstance(reg_or_ex, Executor) else Executor(reg_or_ex)
    events: list = []
    r = ex.run(Graph.from_json(graph), sink=events.append, **kw)
    r.events = events
    return r


def loop_graph(n: int) -> dict:
    """count = 0; while count + step < n: count += step (step comes from a node outside the loop)."""
    return {
        "step": {"class_type": "XConst", "inputs": {"value": 1}},
        "open": {"class_type": "XLoopOpen", "inputs": {"init0": 0, "init1": "tag"}},
        "add": {"class_type": "XAdd", "inputs": {"a": ["open", 1], "b": ["step", 0]}},
        "less": {"class_type": "XLess", "inputs": {"a": ["add", 0], "b": n}},
        "close": {
            "class_type": "XLoopClose",
            "inputs": {"flow": ["open", 0], "more": ["less", 0], "value0": ["add", 0], "value1": ["open", 2]},
        },
        "out": {"class_type": "XShow", "inputs": {"value": ["close", 0]}},
        "tag": {"class_type": "XShow", "inputs": {"value": ["close", 1]}},
    }


# -- while loops by expansion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["keep-current", "none"])
def test_while_loop_counts_to_n(xreg, cache):
    r = _run(Executor(xreg, cache=cache), loop_graph(5))
    assert r.ok, r.error
    assert r.outputs["out"]["value"] == [5]
    assert r.outputs["tag"]["value"] == ["tag"]  # a value carried through every iteration unchanged
    assert [a for a, _ in XAdd.CALLS] == [0, 1, 2, 3, 4]  # one body pass per iteration, in order
    # "step" is outside the loop and has no consumer left once "add" ran, yet every copy of the body links
    # back to it: a run with a DYNPROMPT node keeps its results to the end, so it ran once, cache or not
    assert XConst.CALLS == [1]
    # the loop's copies report as the nodes of the submitted graph they copy, under the close node
    started = [e for e in r.events if isinstance(e, NodeStarted)]
    adds = [e for e in started if e.node != "add" and e.display_node == "add"]
    assert len(adds) == 4
    assert all(e.real_node == "close" and e.parent_node is not None for e in adds)
    closes = [e for e in started if e.display_node == "close"]
    assert len(closes) == 5 and closes[0].node == "close"
    assert closes[1].node == "close.0.0.again" and closes[1].parent_node == "close"
    assert closes[2].parent_node == "close.0.0.again" and closes[2].real_node == "close"


@pytest.mark.parametrize("cache", ["keep-current", "none"])
def test_expansion_links_back_to_a_released_result(xreg, cache):
    g = {
        "c": {"class_type": "XConst", "inputs": {"value": 7}},
        "a": {"class_type": "XAdd", "inputs": {"a": ["c", 0], "b": 1}},
        "back": {"class_type": "XLinkBack", "inputs": {"x": ["a", 0], "target": "c"}},
        "out": {"class_type": "XShow", "inputs": {"value": ["back", 0]}},
    }
    r = _run(Executor(xreg, cache=cache), g)
    assert r.ok, r.error
    assert r.outputs["out"]["value"] == [15]  # 7 + (7 + 1)
    # "c" had no consumer left when "back" expanded: served again from the cache, or run again without one
    assert XConst.CALLS == ([7] if cache == "keep-current" else [7, 7])


def test_while_loop_reruns_and_caches(xreg):
    ex = Executor(xreg)
    assert _run(ex, loop_graph(3)).outputs["out"]["value"] == [3]
    XAdd.CALLS.clear()
    r = _run(ex, loop_graph(3))
    assert r.ok and r.ran == [] and XAdd.CALLS == []  # the whole loop is one cached result
    r = _run(ex, loop_graph(4))
    assert r.outputs["out"]["value"] == [4]


def test_while_loop_that_never_loops(xreg):
    r = _run(xreg, loop_graph(1))
    assert r.ok and r.outputs["out"]["value"] == [1]
    assert not any(e.parent_node for e in r.events if isinstance(e, NodeStarted))


# -- one node, one call per list item, some calls expanding ---------------------------------------------------


def test_mixed_expanding_and_plain_calls_keep_every_result_in_order(xreg):
    g = {
        "r": {"class_type": "XRange", "inputs": {"n": 5}},
        "m": {"class_type": "XOddExpands", "inputs": {"x": ["r", 0]}},
        "out": {"class_type": "XShow", "inputs": {"value": ["m", 0]}},
    }
    r = _run(xreg, g)
    assert r.ok, r.error
    assert r.outputs["out"]["value"] == [101, 20, 103, 40, 105]
    # each expanding call got ids of its own call index
    expanded = sorted(e.node for e in r.events if isinstance(e, NodeStarted) and e.parent_node == "m")
    assert expanded == ["m.0.0.1", "m.0.0.2", "m.2.0.1", "m.2.0.2", "m.4.0.1", "m.4.0.2"]


def test_plain_calls_only_still_merge(xreg):
    g = {
        "r": {"class_type": "XRange", "inputs": {"n": 4}},
        "m": {"class_type": "XOddExpands", "inputs": {"x": ["r", 0]}},
        "out": {"class_type": "XShow", "inputs": {"value": ["m", 0]}},
    }
    g["r"]["inputs"]["n"] = 1  # one odd item: expansion only
    assert _run(xreg, g).outputs["out"]["value"] == [101]


# -- DYNPROMPT ------------------------------------------------------------------------------------------------


def test_dynprompt_for_a_top_level_node(xreg):
    g = {
        "w": {"class_type": "XWhoAmI", "inputs": {"value": 3}},
        "out": {"class_type": "XShow", "inputs": {"value": ["w", 0]}},
    }
    assert _run(xreg, g).ok
    (seen,) = XWhoAmI.SEEN
    assert seen["uid"] == "w" and seen["class"] == "XWhoAmI" and seen["value"] == 3
    assert seen["parent"] is None and seen["real"] == "w" and seen["display"] == "w"
    assert seen["has_self"] and not seen["has_bogus"]
    assert seen["all"] == {"w", "out"} == seen["original"]


def test_dynprompt_for_an_expanded_node(xreg):
    g = {
        "p": {"class_type": "XWrapWho", "inputs": {"value": 4, "show_as": ""}},
        "q": {"class_type": "XWrapWho", "inputs": {"value": 5, "show_as": "out"}},
        "out": {"class_type": "XShow", "inputs": {"value": ["p", 0]}},
        "out2": {"class_type": "XShow", "inputs": {"value": ["q", 0]}},
    }
    r = _run(xreg, g)
    assert r.ok, r.error
    by_uid = {s["uid"]: s for s in XWhoAmI.SEEN}
    p = by_uid["p.0.0.1"]
    assert p["parent"] == "p" and p["parent_class"] == "XWrapWho" and p["real"] == "p" and p["display"] == "p"
    assert p["has_self"] and "p.0.0.1" in p["all"] and "p.0.0.1" not in p["original"]
    assert p["original"] == {"p", "q", "out", "out2"}
    q = by_uid["q.0.0.1"]
    assert q["parent"] == "q" and q["real"] == "q" and q["display"] == "out"  # override_display_id


def test_dynprompt_unknown_node_raises(xreg):
    from kiln.engine.expansion import DynamicPrompt, NodeNotFoundError

    dp = DynamicPrompt(Graph.from_json({"1": {"class_type": "XConst", "inputs": {"value": 1}}}).nodes)
    with pytest.raises(NodeNotFoundError):
        dp.get_node("2")
    assert dp.get_node("1") == {"class_type": "XConst", "inputs": {"value": 1}}
    assert dp.ephemeral_prompt == {} and dp.get_display_node_id("2") == "2"


# -- expansion ids --------------------------------------------------------------------------------------------


def test_expansion_ids_follow_comfyui_scheme(xreg):
    g = {
        "r": {"class_type": "XRange", "inputs": {"n": 2}},
        "t": {"class_type": "XTwoBuilders", "inputs": {"x": ["r", 0]}},
        "a": {"class_type": "XAsyncExpand", "inputs": {"x": ["r", 0]}},
        "out": {"class_type": "XShow", "inputs": {"value": ["t", 0]}},
        "out2": {"class_type": "XShow", "inputs": {"value": ["a", 0]}},
    }
    r = _run(xreg, g)
    assert r.ok, r.error
    assert r.outputs["out"]["value"] == [2, 3] and r.outputs["out2"]["value"] == [501, 502]
    started = [e for e in r.events if isinstance(e, NodeStarted) and e.parent_node]
    ids = {e.node: (e.display_node, e.parent_node, e.real_node) for e in started}
    # <node>.<call index>.<builder index within the call>.<n>
    assert {k for k in ids if k.startswith("t.")} == {"t.0.0.1", "t.0.1.1", "t.1.0.1", "t.1.1.1"}
    assert {k for k in ids if k.startswith("a.")} == {"a.0.0.1", "a.1.0.1"}  # async calls too
    assert all(v == (k.split(".")[0],) * 3 for k, v in ids.items())


def test_graphbuilder_api():
    GraphBuilder.set_default_prefix("9", 2, 0)
    b = GraphBuilder()
    assert b.prefix == "9.2.0." and GraphBuilder().prefix == "9.2.1."
    x = b.node("XConst", value=1)
    assert x.id == "9.2.0.1" and b.node("XConst", "1") is x
    y = b.node("XAdd", "named", a=x.out(0))
    assert y.id == "9.2.0.named" and b.lookup_node("named") is y and b.lookup_node("nope") is None
    y.set_input("b", 5)
    y.set_input("b", None)
    assert y.get_input("b") is None
    y.set_override_display_id("shown")
    b.replace_node_output("1", 0, 7)
    assert b.finalize()["9.2.0.named"] == {
        "class_type": "XAdd",
        "inputs": {"a": 7},
        "override_display_id": "shown",
    }
    b.remove_node("1")
    assert list(b.finalize()) == ["9.2.0.named"]


# -- hidden inputs of kinds the engine does not fill ----------------------------------------------------------


def test_literal_for_unknown_hidden_kind_reaches_the_node(xreg):
    def g(note):
        return {
            "h": {"class_type": "XOddHidden", "inputs": {"value": 1, "note": note, "anything": 2.5}},
            "out": {"class_type": "XShow", "inputs": {"value": ["h", 0]}},
        }

    ex = Executor(xreg)
    r = _run(ex, g("hello"))
    assert r.ok, r.error
    assert r.outputs["out"]["value"] == ["1:hello:2.5:(none)"]  # "unset" was not given: not passed
    assert _run(ex, g("hello")).ran == []  # same literal: cached
    r = _run(ex, g("bye"))  # the literal is part of the node's identity
    assert r.outputs["out"]["value"] == ["1:bye:2.5:(none)"]
    assert XOddHidden.CALLS == [("hello", 2.5, "(none)"), ("bye", 2.5, "(none)")]


def test_link_for_unknown_hidden_kind_reaches_the_node(xreg):
    g = {
        "c": {"class_type": "XConst", "inputs": {"value": 8}},
        "h": {"class_type": "XOddHidden", "inputs": {"value": 1, "unset": ["c", 0]}},
        "out": {"class_type": "XShow", "inputs": {"value": ["h", 0]}},
    }
    assert _run(xreg, g).outputs["out"]["value"] == ["1:(none):(none):8"]


# -- ComfyUI's module paths -----------------------------------------------------------------------------------


@pytest.fixture
def comfy_modules(xreg):
    compat.install(xreg)
    try:
        yield (
            importlib.import_module("comfy_execution.graph"),
            importlib.import_module("comfy_execution.graph_utils"),
            importlib.import_module("comfy.utils"),
        )
    finally:
        compat.uninstall()


def test_comfy_paths_blocker_and_progress_behave_as_kilns(xreg, comfy_modules):
    graph_mod, utils_mod, comfy_utils = comfy_modules
    assert graph_mod.ExecutionBlocker is engine.ExecutionBlocker
    assert utils_mod.GraphBuilder is GraphBuilder
    assert utils_mod.is_link(["3", 0]) and not utils_mod.is_link([3, 0])

    class XGate:
        RETURN_TYPES = ("INT",)
        FUNCTION = "go"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("INT", {"forceInput": True}), "block": ("BOOLEAN", {"default": False})}}

        def go(self, value, block):
            if block:
                return (graph_mod.ExecutionBlocker("held back"),)
            return (value,)

    class XSteps:
        RETURN_TYPES = ("INT",)
        FUNCTION = "go"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("INT", {"forceInput": True})}}

        def go(self, value):
            bar = comfy_utils.ProgressBar(4)
            for _ in range(4):
                bar.update(1)
            return (value,)

    xreg.register(XGate)
    xreg.register(XSteps)

    def g(block):
        return {
            "c": {"class_type": "XConst", "inputs": {"value": 6}},
            "s": {"class_type": "XSteps", "inputs": {"value": ["c", 0]}},
            "gate": {"class_type": "XGate", "inputs": {"value": ["s", 0], "block": block}},
            "out": {"class_type": "XShow", "inputs": {"value": ["gate", 0]}},
        }

    r = _run(xreg, g(False))
    assert r.ok and r.outputs["out"]["value"] == [6]
    ticks = [(e.value, e.max) for e in r.events if isinstance(e, Progress) and e.node == "s"]
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    r = _run(xreg, g(True))
    assert r.ok and "out" not in r.outputs  # the blocked output node did not run
    blocked = [e for e in r.events if isinstance(e, NodeBlocked)]
    assert [(e.node_id, e.message) for e in blocked] == [("out", "held back")]
    assert not any(isinstance(e, NodeOutput) and e.node == "out" for e in r.events)


# -- async VALIDATE_INPUTS through a real server --------------------------------------------------------------


class XAsyncChecked:
    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100})}}

    @classmethod
    async def VALIDATE_INPUTS(cls, value):
        await asyncio.sleep(0)
        return value % 2 == 0 or f"value must be even, got {value}"

    def go(self, value):
        return (value * 3,)


def test_async_validate_inputs_through_a_live_server(tmp_path):
    from tests.server.srv_helpers import LiveServer, make_registry, wait_for

    reg = make_registry()
    reg.register(XAsyncChecked)
    s = LiveServer(tmp_path, registry=reg)
    try:

        def graph(value):
            return {
                "prompt": {
                    "1": {"class_type": "XAsyncChecked", "inputs": {"value": value}},
                    "out": {"class_type": "TShow", "inputs": {"value": ["1", 0]}},
                }
            }

        bad = s.post("/prompt", graph(3))
        assert bad.status_code == 400
        err = bad.json()["node_errors"]["1"]["errors"][0]
        assert err["type"] == "custom_validation_failed" and "must be even, got 3" in err["details"]
        ok = s.post("/prompt", graph(4))
        assert ok.status_code == 200 and ok.json()["node_errors"] == {}
        pid = ok.json()["prompt_id"]
        wait_for(lambda: pid in s.get(f"/history/{pid}").json(), "the prompt's history")
        entry = s.get(f"/history/{pid}").json()[pid]
        assert entry["status"]["status_str"] == "success"
        assert entry["outputs"]["out"] == {"text": ["12"]}
    finally:
        s.stop()
