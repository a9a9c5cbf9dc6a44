"""Fixtures for the engine suite: a registry of test-only nodes and helpers to build and run graphs."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import engine_testnodes as tn  # noqa: E402

from kiln import engine  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_calls():
    tn.CALLS.clear()
    tn.STATE.clear()
    yield
    tn.CALLS.clear()
    tn.STATE.clear()


@pytest.fixture
def reg() -> engine.Registry:
    return tn.make_registry()


@pytest.fixture
def ex(reg) -> engine.Executor:
    return engine.Executor(reg)


@pytest.fixture
def run(ex):
    """run(graph_dict, **kw) -> RunResult with the events collected in result.events."""

    def _run(data, executor=None, **kw):
        events = []
        res = (executor or ex).run(tn.G(data) if isinstance(data, dict) else data, sink=events.append, **kw)
        res.events = events
        return res

    return _run
