"""Test-only node classes for the engine suite (no built-in nodes are used).

Every node appends to ``CALLS`` when its function runs, so tests can check what really executed
independently of what the executor reports.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Annotated, Any

from kiln import engine
from kiln.engine import (
    Boolean,
    Combo,
    ExecutionBlocker,
    Float,
    GraphBuilder,
    Hidden,
    Int,
    Node,
    NodeResult,
    Socket,
    String,
)

CALLS: list[tuple[str, Any]] = []
STATE: dict[str, Any] = {}


def calls_of(cls_name: str) -> list:
    return [v for c, v in CALLS if c == cls_name]


def _log(name: str, value: Any = None) -> None:
    ctx = engine.current()
    CALLS.append((name, (ctx.node_id if ctx else None, value)))


class Payload:
    """A weak-referenceable object travelling along links."""

    def __init__(self, value: Any, size: int = 0):
        self.value = value
        self.size = size

    def __kiln_sizeof__(self) -> int:
        return self.size


class Const(Node):
    """An integer source."""

    outputs = {"INT": "INT"}
    category = "test"

    def run(self, value: Annotated[int, Int(min=-1000, max=1000, step=1)] = 0):
        _log("Const", value)
        return value


class Add(Node):
    outputs = {"sum": "INT"}

    def run(self, a: Annotated[int, Socket("INT")], b: Annotated[int, Int(min=-1000, max=1000)] = 1):
        _log("Add", (a, b))
        return a + b


class FloatIn(Node):
    outputs = ("FLOAT",)

    def run(self, x: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5):
        _log("FloatIn", x)
        return x


class TextIn(Node):
    outputs = ("STRING",)

    def run(self, text: Annotated[str, String(multiline=True)] = ""):
        _log("TextIn", text)
        return text


class Pick(Node):
    outputs = ("STRING",)

    def run(self, mode: Annotated[str, Combo(["alpha", "beta", "gamma"])] = "alpha"):
        _log("Pick", mode)
        return mode


class Flag(Node):
    outputs = ("BOOLEAN",)

    def run(self, on: Annotated[bool, Boolean()] = False):
        _log("Flag", on)
        return on


class MakeImage(Node):
    """Produces an IMAGE-typed object (a Payload)."""

    outputs = {"IMAGE": "IMAGE"}

    def run(self, seed: Annotated[int, Int(min=0, max=10**9)] = 0):
        _log("MakeImage", seed)
        p = Payload(("img", seed))
        STATE.setdefault("made", []).append(weakref.ref(p))
        return p


class Invert(Node):
    outputs = {"IMAGE": "IMAGE"}

    def run(self, image: Annotated[Any, Socket("IMAGE")]):
        _log("Invert", image.value)
        return Payload(("inv", image.value))


class Show(Node):
    """Output node: reports what it received as UI."""

    output_node = True
    outputs = ()

    def run(self, value: Annotated[Any, Socket("*")], tag: Annotated[str, String()] = ""):
        _log("Show", value)
        v = value.value if isinstance(value, Payload) else value
        return NodeResult(ui={"value": [repr(v)], "tag": [tag]})


class ShowImage(Node):
    output_node = True

    def run(self, image: Annotated[Any, Socket("IMAGE")]):
        _log("ShowImage", image.value)
        return NodeResult(ui={"images": [{"filename": f"{image.value}.png", "subfolder": "", "type": "temp"}]})


class Pair(Node):
    """Two named outputs."""

    outputs = {"first": "INT", "second": "STRING"}

    def run(self, n: Annotated[int, Int()] = 3):
        _log("Pair", n)
        return n, str(n)


class Boom(Node):
    """Fails when asked to."""

    outputs = ("INT",)

    def run(
        self,
        x: Annotated[int, Socket("INT")],
        fail: Annotated[bool, Boolean()] = True,
        note: Annotated[str, String()] = "",
    ):
        _log("Boom", x)
        if fail:
            raise ValueError(f"boom on {x}")
        return x


class Checked(Node):
    """Custom validation: value must be even; hint text returned on failure."""

    outputs = ("INT",)

    @classmethod
    def validate(cls, value):
        return True if value % 2 == 0 else f"{value} is odd; give an even number"

    def run(self, value: Annotated[int, Int(min=0, max=10)] = 0):
        _log("Checked", value)
        return value


class Lazy(Node):
    """Picks one of two lazy inputs; only the chosen branch should run."""

    outputs = {"out": "*"}

    def check_lazy_status(self, use_first, first=None, second=None):
        _log("Lazy.check", use_first)
        return ["first"] if use_first else ["second"]

    def run(
        self,
        use_first: Annotated[bool, Boolean()] = True,
        first: Annotated[Any, Socket("*", lazy=True)] = None,
        second: Annotated[Any, Socket("*", lazy=True)] = None,
    ):
        _log("Lazy", use_first)
        return first if use_first else second


class Sleep(Node):
    outputs = ("INT",)
    cacheable = True

    async def run(self, value: Annotated[int, Int()] = 0, seconds: Annotated[float, Float(min=0, max=10)] = 0.3):
        _log("Sleep", value)
        await asyncio.sleep(seconds)
        if (done := STATE.get("sleep_done")) is not None:  # the sleep ran to its end (was not cancelled)
            done.set()
        return value


class SlowTicks(Node):
    """Sync node that sleeps in ticks and reports progress at each."""

    outputs = ("INT",)

    def run(
        self,
        value: Annotated[int, Int()] = 0,
        ticks: Annotated[int, Int(min=1)] = 5,
        tick_seconds: Annotated[float, Float(min=0)] = 0.05,
    ):
        _log("SlowTicks", value)
        ev = STATE.get("started_event")
        for i in range(ticks):
            time.sleep(tick_seconds)
            engine.progress(i + 1, ticks)
            if ev is not None and i >= 2:
                ev.set()
        return value


class Gate(Node):
    """Waits on an event without ticking (cancellation has to happen between nodes)."""

    outputs = ("INT",)

    def run(self, value: Annotated[int, Int()] = 0):
        _log("Gate", value)
        STATE["gate_entered"].set()
        STATE["gate_release"].wait(300)  # a safety net: the test releases it
        return value


class Block(Node):
    outputs = ("INT",)

    def run(
        self,
        value: Annotated[int, Socket("INT")],
        block: Annotated[bool, Boolean()] = True,
        message: Annotated[str, String()] = "",
    ):
        _log("Block", value)
        if block:
            return ExecutionBlocker(message or None)
        return value


class Doubler(Node):
    """Expands into two Add nodes built with GraphBuilder: out = (x + 1) + 1 ... by ``times``."""

    outputs = ("INT",)

    def run(self, x: Annotated[int, Socket("INT")], times: Annotated[int, Int(min=1, max=20)] = 2):
        _log("Doubler", x)
        b = GraphBuilder()
        cur = b.node("Const", value=x)
        for _ in range(times):
            cur = b.node("Add", a=cur.out(0), b=1)
        return NodeResult(result=(cur.out(0),), expand=b.finalize())


class Hidden3(Node):
    output_node = True

    def run(
        self,
        x: Annotated[int, Int()] = 0,
        prompt: Hidden("PROMPT") = None,
        png: Hidden("EXTRA_PNGINFO") = None,
        uid: Hidden("UNIQUE_ID") = None,
    ):
        _log("Hidden3", (uid, sorted(prompt) if prompt else None, png))
        return NodeResult(ui={"uid": [uid], "png": [png], "nodes": [sorted(prompt)]})


class Fingerprinted(Node):
    """fingerprint() returns STATE['fp'] (NaN forces a re-run)."""

    outputs = ("INT",)

    @classmethod
    def fingerprint(cls, value):
        return STATE.get("fp", 0)

    def run(self, value: Annotated[int, Int()] = 0):
        _log("Fingerprinted", value)
        return value


class AnyLiteral(Node):
    """Takes any literal (e.g. an object that cannot be fingerprinted)."""

    outputs = ("*",)

    def run(self, value: Annotated[Any, Socket("*")] = None):
        _log("AnyLiteral", value)
        return value


class Random(Node):
    not_idempotent = True
    outputs = ("INT",)

    def run(self, value: Annotated[int, Int()] = 0):
        _log("Random", value)
        return value


class Uncacheable(Node):
    cacheable = False
    outputs = ("INT",)

    def run(self, value: Annotated[int, Int()] = 0):
        _log("Uncacheable", value)
        return value


class Big(Node):
    """An entry of a declared size, cheap or slow to make (for the RAM budget cache)."""

    outputs = ("*",)

    def run(
        self,
        tag: Annotated[str, String()] = "",
        size: Annotated[int, Int(min=0)] = 0,
        seconds: Annotated[float, Float(min=0)] = 0.0,
    ):
        _log("Big", tag)
        if seconds:
            time.sleep(seconds)
        return Payload(tag, size)


class Holder(Node):
    """Consumes a payload, checks earlier payloads were freed, returns a small value."""

    outputs = ("INT",)

    def run(self, value: Annotated[Any, Socket("*")]):
        _log("Holder", None)
        return 1


class Probe(Node):
    """Output node that records which Payloads made so far are still alive."""

    output_node = True

    def run(self, value: Annotated[Any, Socket("*")]):
        import gc

        gc.collect()
        alive = [r() is not None for r in STATE.get("made", [])]
        _log("Probe", alive)
        return NodeResult(ui={"alive": alive})


_MEETINGS: dict[str, int] = {}
_MEET_LOCK = threading.Lock()
MEET_BOUND_S = 300.0  # only a run where the nodes never overlap waits this long, and then fails


def _arrive(name: str) -> None:
    with _MEET_LOCK:
        _MEETINGS[name] = _MEETINGS.get(name, 0) + 1


def _all_here(name: str, n: int) -> bool:
    with _MEET_LOCK:
        return _MEETINGS.get(name, 0) >= n


class Meet(Node):
    """Async: arrives at meeting ``name`` and returns only once ``n`` nodes are there. Nodes that run one after
    another never all arrive, so the run fails instead of passing slowly: overlap is shown without a clock."""

    outputs = ("INT",)
    cacheable = False

    async def run(
        self, value: Annotated[int, Int()] = 0, name: Annotated[str, String()] = "", n: Annotated[int, Int(min=1)] = 2
    ):
        _arrive(name)
        end = time.monotonic() + MEET_BOUND_S
        while not _all_here(name, n):
            if time.monotonic() > end:
                raise RuntimeError(f"meeting {name!r}: the other nodes never ran at the same time")
            await asyncio.sleep(0.005)
        return value


class MeetSync(Node):
    """The same meeting, from synchronous node code (it waits in its worker thread)."""

    outputs = ("INT",)
    cacheable = False

    def run(
        self, value: Annotated[int, Int()] = 0, name: Annotated[str, String()] = "", n: Annotated[int, Int(min=1)] = 2
    ):
        _arrive(name)
        end = time.monotonic() + MEET_BOUND_S
        while not _all_here(name, n):
            if time.monotonic() > end:
                raise RuntimeError(f"meeting {name!r}: the other nodes never ran at the same time")
            time.sleep(0.005)
        return value


TEST_NODES = [
    Const,
    Add,
    FloatIn,
    TextIn,
    Pick,
    Flag,
    MakeImage,
    Invert,
    Show,
    ShowImage,
    Pair,
    Boom,
    Checked,
    Lazy,
    Sleep,
    SlowTicks,
    Gate,
    Block,
    Doubler,
    Hidden3,
    Fingerprinted,
    AnyLiteral,
    Random,
    Uncacheable,
    Big,
    Holder,
    Probe,
    Meet,
    MeetSync,
]


def make_registry() -> engine.Registry:
    reg = engine.Registry()
    for cls in TEST_NODES:
        reg.register(cls, python_module="tests.engine")
    return reg


def chain_graph(n: int, *, out: str = "Show", start: int = 0) -> dict:
    """Const -> Add x n -> Show, ids "1".."n+2"."""
    g: dict = {"1": {"class_type": "Const", "inputs": {"value": start}}}
    prev = "1"
    for i in range(2, n + 2):
        g[str(i)] = {"class_type": "Add", "inputs": {"a": [prev, 0], "b": 1}}
        prev = str(i)
    g[str(n + 2)] = {"class_type": out, "inputs": {"value": [prev, 0]}}
    return g


def G(data: dict) -> engine.Graph:
    """A Graph from an API-format dict (deep-copied so tests can reuse the dict)."""
    import copy

    return engine.Graph.from_json(copy.deepcopy(data))
