"""Purity of engine/, progress reporting, raw links, expansion cycles, run context."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import engine_testnodes as tn
from engine_testnodes import G

from kiln import engine
from kiln.engine import Executor, NodeResult
from kiln.engine.events import Preview, Progress
from kiln.server.protocol import event_message

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_engine_imports_no_heavy_or_upper_layers():
    code = (
        "import sys, kiln.engine, kiln.engine.executor, kiln.engine.validation, kiln.engine.cache, "
        "kiln.engine.classic, kiln.engine.registry, kiln.engine.graph, kiln.engine.events, kiln.engine.context, "
        "kiln.engine.folders, kiln.engine.fingerprint;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'aiohttp', 'numpy', 'PIL', 'diffusers')"
        " or (m.startswith('kiln.') and not m.startswith('kiln.engine'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net only: a loaded machine imports slowly
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_engine_source_does_not_import_upper_layers():
    import ast

    bad = []
    for fn in sorted(os.listdir(os.path.join(ROOT, "engine"))):
        if not fn.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "engine", fn), encoding="utf-8").read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top in ("torch", "aiohttp", "nodes", "server") or (
                    top == "kiln" and not n.startswith("kiln.engine")
                ):
                    bad.append((fn, n))
    assert bad == []


class Ticker(engine.Node):
    outputs = ("INT",)

    def run(self, n: engine.Int(min=1) = 3):
        pb = engine.ProgressBar(n)
        for i in range(n):
            pb.update(1, preview=Preview("JPEG", b"\xff\xd8fake") if i == 0 else None)
        engine.progress(n + 5, n)  # over max: clamped
        return n


def test_progress_events(reg):
    reg.register(Ticker)
    events = []
    g = {"t": {"class_type": "Ticker", "inputs": {"n": 3}}, "o": {"class_type": "Show", "inputs": {"value": ["t", 0]}}}
    Executor(reg).run(G(g), sink=events.append)
    prog = [e for e in events if isinstance(e, Progress)]
    assert [(e.value, e.max) for e in prog] == [(1, 3), (2, 3), (3, 3), (3, 3)]
    assert prog[0].preview.data.startswith(b"\xff\xd8") and prog[1].preview is None
    assert all(event_message(e)[1] == {"value": e.value, "max": 3, "prompt_id": e.prompt_id, "node": "t"} for e in prog)


def test_progress_outside_a_run_is_a_noop():
    engine.progress(1, 2)
    engine.check_interrupted()
    engine.ProgressBar(3).update(1)
    assert engine.current() is None


def test_raw_link_input(reg):
    class Raw(engine.Node):
        outputs = ("STRING",)

        def run(self, src: engine.Socket("*", raw_link=True)):
            return json.dumps(src)

    reg.register(Raw)
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "r": {"class_type": "Raw", "inputs": {"src": ["1", 0]}},
        "o": {"class_type": "Show", "inputs": {"value": ["r", 0]}},
    }
    r = Executor(reg).run(G(g))
    assert r.ok and r.outputs["o"]["value"] == [repr('["1", 0]')]
    assert reg["Raw"].object_info()["input"]["required"]["src"] == ["*", {"rawLink": True}]


def test_expansion_cycle_is_a_node_error(reg):
    class Loop(engine.Node):
        outputs = ("INT",)

        def run(self, x: engine.Int() = 0):
            b = engine.GraphBuilder()
            a_id, c_id = b.prefix + "a", b.prefix + "c"
            sub = {
                a_id: {"class_type": "Add", "inputs": {"a": [c_id, 0]}},
                c_id: {"class_type": "Add", "inputs": {"a": [a_id, 0]}},
            }
            return NodeResult(result=([a_id, 0],), expand=sub)

    reg.register(Loop)
    g = {"l": {"class_type": "Loop", "inputs": {}}, "o": {"class_type": "Show", "inputs": {"value": ["l", 0]}}}
    r = Executor(reg).run(G(g))
    assert r.status == "error"
    assert "cycle" in r.error.message.lower()


def test_run_context_exposes_prompt_and_extra(reg):
    seen = {}

    class Ctx(engine.Node):
        output_node = True

        def run(self, x: engine.Int() = 0):
            c = engine.current()
            seen.update(node=c.node_id, prompt=c.prompt_id, extra=c.extra_data, cls=c.class_type)
            return NodeResult(ui={"x": [x]})

    reg.register(Ctx)
    Executor(reg).run(G({"c": {"class_type": "Ctx", "inputs": {}}}), prompt_id="P", extra_data={"k": 1})
    assert seen == {"node": "c", "prompt": "P", "extra": {"k": 1}, "cls": "Ctx"}


def test_instances_persist_per_id_and_class(reg):
    class Counter(engine.Node):
        outputs = ("INT",)
        cacheable = False

        def __init__(self):
            self.n = 0

        def run(self, x: engine.Int() = 0):
            self.n += 1
            return self.n

    reg.register(Counter)
    ex = Executor(reg)
    g = {"c": {"class_type": "Counter", "inputs": {}}, "o": {"class_type": "Show", "inputs": {"value": ["c", 0]}}}
    assert ex.run(G(g)).outputs["o"]["value"] == ["1"]
    assert ex.run(G(g)).outputs["o"]["value"] == ["2"]  # like ComfyUI's objects cache keyed by (id, class)


def test_validation_result_reused_by_run(reg):
    graph = G(tn.chain_graph(2))
    res = engine.validate(graph, reg)
    r = Executor(reg).run(graph, validation=res)
    assert r.ok and r.validation is res
