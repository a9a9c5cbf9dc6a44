import pytest

from kiln import nodes
from kiln.engine import Executor, Folders, Graph, Registry


@pytest.fixture(scope="session")
def registry():
    reg = Registry()
    nodes.register_builtin(reg)
    return reg


@pytest.fixture
def folders(tmp_path):
    for d in ("input", "output", "temp"):
        (tmp_path / d).mkdir()
    return Folders(tmp_path)


@pytest.fixture
def run_graph(registry, folders):
    ex = Executor(registry, folders=folders)

    def _run(graph: dict, **kw):
        events = []
        res = ex.run(Graph.from_json(graph), sink=events.append, **kw)
        res.events = events
        return res

    _run.executor = ex
    return _run
