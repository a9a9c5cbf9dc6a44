"""The engine's boundaries: neutral typed events and errors, run options, annotations, explicit folders,
async validators under a running loop, and validation results bound to their graph."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import engine_testnodes as tn
import pytest

from kiln import engine
from kiln.engine import events as ev


def test_expanded_nodes_carry_parent_and_real_ids(run):
    r = run(
        {
            "1": {"class_type": "Const", "inputs": {"value": 3}},
            "2": {"class_type": "Doubler", "inputs": {"x": ["1", 0], "times": 1}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
        }
    )
    assert r.ok
    started = {e.node: e for e in r.events if isinstance(e, ev.NodeStarted)}
    inner = [e for nid, e in started.items() if nid.startswith("2.")]
    assert inner, sorted(started)
    for e in inner:
        assert e.parent_node == "2" and e.real_node == "2" and e.display_node == "2"
    assert started["1"].parent_node is None and started["1"].real_node == "1"


def test_node_error_is_a_typed_event(run):
    r = run(
        {"1": {"class_type": "Boom", "inputs": {"x": 8}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    )
    assert r.status == "error" and isinstance(r.error, ev.ExecutionError)
    assert r.error.node_id == "1" and r.error.node_type == "Boom" and "boom" in r.error.message
    with pytest.raises(engine.ExecutionFailed) as ei:
        r.raise_for_status()
    assert ei.value.error is r.error


def test_run_options_reach_nodes(reg):
    ex = engine.Executor(reg, cache="none")
    seen = []

    class Watcher(engine.Node):
        output_node = True
        outputs = ()

        def run(self):
            seen.append(engine.current().wants_previews)
            return engine.NodeResult(ui={"ok": [True]})

    reg.register(Watcher)
    g = tn.G({"1": {"class_type": "Watcher", "inputs": {}}})
    ex.run(g)
    ex.run(tn.G({"1": {"class_type": "Watcher", "inputs": {}}}), options=engine.RunOptions(previews=True))
    assert seen == [False, True]


def test_annotations_are_a_generic_per_run_channel(reg, ex):
    class Note(engine.Node):
        output_node = True
        outputs = ()

        def run(self, n: Annotated[int, engine.Int()] = 1):
            for i in range(n):
                engine.current().run.annotate("notes", {"i": i})
            return engine.NodeResult(ui={"n": [n]})

    reg.register(Note)
    r = ex.run(tn.G({"1": {"class_type": "Note", "inputs": {"n": 2}}}))
    assert r.annotations == {"notes": [{"i": 0}, {"i": 1}]}
    assert ex.run(tn.G({"1": {"class_type": "Note", "inputs": {"n": 2}}})).annotations == {}  # cached: nothing ran


def test_second_executor_does_not_change_the_first_ones_folders(reg, tmp_path):
    a = engine.Folders(tmp_path / "a")
    b = engine.Folders(tmp_path / "b")
    ex_a = engine.Executor(reg, folders=a)
    engine.Executor(reg, folders=b)
    seen = []

    class Where(engine.Node):
        output_node = True
        outputs = ()

        def run(self):
            seen.append(engine.get_folders())
            return engine.NodeResult(ui={"ok": [True]})

    reg.register(Where)
    ex_a.run(tn.G({"1": {"class_type": "Where", "inputs": {}}}))
    assert seen == [a]
    assert engine.get_folders() is not b  # constructing an executor set no process-wide default


def test_cache_base_class_answers_membership():
    assert b"k" not in engine.Cache()
    c = engine.make_cache("lru:4")
    assert b"k" not in c


def _async_validated_registry():
    class AsyncChecked(engine.Node):
        output_node = True
        outputs = ()

        @classmethod
        async def validate(cls, x):
            await asyncio.sleep(0)
            return True if x < 5 else f"x must be below 5, got {x}"

        def run(self, x: Annotated[int, engine.Int()] = 0):
            return engine.NodeResult(ui={"x": [x]})

    reg = tn.make_registry()
    reg.register(AsyncChecked)
    return reg


def test_async_validator_runs_with_and_without_a_running_loop():
    reg = _async_validated_registry()

    def check(x: int) -> Any:
        return engine.validate(tn.G({"1": {"class_type": "AsyncChecked", "inputs": {"x": x}}}), reg)

    assert check(1).ok and not check(9).ok  # no loop in this thread

    async def on_a_loop():  # a server validating on its event-loop thread
        return check(1).ok, check(9)

    ok, bad = asyncio.run(on_a_loop())
    assert ok and not bad.ok
    assert "x must be below 5" in bad.summary()


def test_validation_result_belongs_to_its_graph(ex, reg):
    g1 = tn.G(
        {
            "1": {"class_type": "Const", "inputs": {"value": 1}},
            "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        }
    )
    g2 = tn.G(
        {
            "1": {"class_type": "Const", "inputs": {"value": 1}},
            "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        }
    )
    v1 = engine.validate(g1, reg)
    assert ex.run(g1, validation=v1).ok
    with pytest.raises(ValueError, match="another graph"):
        ex.run(g2, validation=v1)
