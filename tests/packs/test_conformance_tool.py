"""tools/comfy_conformance.py on a tiny fake suite written here (ComfyUI's own suite is GPL-3.0 and never part
of Kiln): a test class whose fixture starts ComfyUI's ``main.py`` the way ComfyUI's tests/execution do gets a
real ``kiln serve`` with the suite's test pack loaded, and the tool counts one pass and one failure, with the
failing test's reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "comfy_conformance.py"

# tests/packs is also loaded as a custom_nodes/ folder (tests/engine/test_custom_packs.py): as a pack, this
# file is an empty one rather than a failed one.
NODE_CLASS_MAPPINGS: dict = {}

# A pack in the fake suite's testing_nodes/ folder, loaded the way ComfyUI's tests load theirs.
FAKE_PACK = """
class FakeDouble:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, value):
        return (value * 2,)


NODE_CLASS_MAPPINGS = {"FakeDouble": FakeDouble}
"""

# Written like ComfyUI's test classes: a class-scoped fixture launching main.py with ComfyUI's flags, a
# client reading args_pytest (provided by the tool, as ComfyUI's tests/conftest.py would).
FAKE_TESTS = """
import json
import subprocess
import time
import urllib.request

import pytest


class TestFake:
    @pytest.fixture(scope="class", autouse=True)
    def _server(self, args_pytest):
        pargs = [
            "python", "main.py",
            "--output-directory", args_pytest["output_dir"],
            "--listen", args_pytest["listen"],
            "--port", str(args_pytest["port"]),
            "--extra-model-paths-config", "tests/execution/extra_model_paths.yaml",
            "--cpu", "--cache-none",
        ]
        p = subprocess.Popen(pargs)
        yield
        p.kill()

    def _get(self, args_pytest, path):
        url = "http://{}:{}{}".format(args_pytest["listen"], args_pytest["port"], path)
        for _ in range(50):
            try:
                with urllib.request.urlopen(url) as r:
                    return json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        raise AssertionError("server never answered")

    def test_pack_is_loaded(self, args_pytest):
        info = self._get(args_pytest, "/object_info/FakeDouble")
        assert info["FakeDouble"]["output"] == ["INT"]

    def test_always_fails(self, args_pytest):
        assert 1 + 1 == 3, "arithmetic is broken on purpose"
"""


def _fake_suite(root: Path) -> Path:
    suite = root / "comfy" / "tests" / "execution"
    pack = suite / "testing_nodes" / "fake-pack"
    pack.mkdir(parents=True)
    (pack / "__init__.py").write_text(FAKE_PACK)
    (suite / "extra_model_paths.yaml").write_text("testing:\n    custom_nodes: testing_nodes\n")
    (suite / "test_fake.py").write_text(FAKE_TESTS)
    return suite


def test_tool_runs_a_suite_against_kiln_serve(tmp_path):
    suite = _fake_suite(tmp_path)
    out = tmp_path / "summary.json"
    work = tmp_path / "work"
    cmd = [sys.executable, str(TOOL), "--suite", str(suite), "--json", str(out), "--keep", str(work), "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one test fails
    summary = json.loads(out.read_text())
    assert (summary["total"], summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (
        2,
        1,
        1,
        0,
        0,
    ), summary
    [failing] = summary["failing"]
    assert failing["id"].endswith("TestFake::test_always_fails")
    assert "arithmetic is broken on purpose" in failing["reason"]
    # the printed summary says the same, with the failing test's one-line reason
    assert "total 2  passed 1  failed 1  errors 0  skipped 0" in proc.stdout
    assert "test_always_fails: AssertionError: arithmetic is broken on purpose" in proc.stdout
    # ComfyUI's main.py flags became kiln serve's: the suite's pack folder, the cache, the workers
    command = (work / "server-0" / "command.txt").read_text()
    assert "-m kiln serve" in command and "--cache none" in command and "--workers 0" in command
    assert f"--custom-nodes {(work / 'root' / 'tests' / 'execution' / 'testing_nodes').resolve()}" in command
    # the suite's files were copied, never edited in place
    assert (suite / "test_fake.py").read_text() == FAKE_TESTS


def test_comfy_flags_map_to_kiln(tmp_path):
    sys.path.insert(0, str(TOOL.parent))
    try:
        import comfy_conformance as cc
    finally:
        sys.path.remove(str(TOOL.parent))
    (tmp_path / "cfg.yaml").write_text("t:\n    custom_nodes: nodes_here\n")
    args, ignored = cc.translate_comfy_args(
        ["--listen", "127.0.0.1", "--port", "9", "--extra-model-paths-config", "cfg.yaml", "--cache-lru", "100"]
        + ["--cpu", "--cache-lru", "0", "--weird"],
        tmp_path,
    )
    assert args == [
        "--host",
        "127.0.0.1",
        "--port",
        "9",
        "--custom-nodes",
        str((tmp_path / "nodes_here").resolve()),
        "--cache",
        "lru:100",
    ]
    assert ignored == ["--weird"]
    assert cc.translate_comfy_args(["--cache-none"], tmp_path)[0] == ["--cache", "none"]
    # a test that failed in its body and then errored in teardown counts once, as a failure
    s = cc.summarise(
        [
            {"nodeid": "a", "when": "call", "outcome": "failed", "reason": "boom"},
            {"nodeid": "a", "when": "teardown", "outcome": "failed", "reason": "later"},
            {"nodeid": "b", "when": "setup", "outcome": "failed", "reason": "no server"},
            {"nodeid": "c", "when": "call", "outcome": "passed"},
            {"nodeid": "d", "when": "setup", "outcome": "skipped", "reason": "x"},
        ]
    )
    assert (s["total"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (4, 1, 1, 1, 1)
    assert s["failing"] == [
        {"id": "a", "outcome": "failed", "reason": "boom"},
        {"id": "b", "outcome": "error", "reason": "no server"},
    ]


# ComfyUI's testing pack creates ``ComfyAPI()``/``ComfyAPISync()`` from ``comfy_api.v0_0_2`` at import; until
# kiln/compat had them the whole pack was skipped, so every test of the suite failed. Their set_progress is
# Kiln's progress of the running node.
PROGRESS_PACK = """
from comfy_api.v0_0_2 import ComfyAPI, ComfyAPISync

api = ComfyAPI()
api_sync = ComfyAPISync()


class SyncSteps:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, value):
        api_sync.execution.set_progress(value=0.25, max_value=1.0)
        api_sync.execution.set_progress(value=3, max_value=4)
        return (value + 1,)


class AsyncSteps(SyncSteps):
    async def run(self, value):
        await api.execution.set_progress(value=2.5, max_value=5.0)
        return (value * 10,)


NODE_CLASS_MAPPINGS = {"SyncSteps": SyncSteps, "AsyncSteps": AsyncSteps}
"""


def test_comfy_api_progress_is_kiln_progress(tmp_path):
    from kiln import compat
    from kiln.engine import Executor, Folders, Graph
    from kiln.engine.events import Progress
    from kiln.runtime import default_registry

    cn = tmp_path / "custom_nodes"
    (cn / "progress_pack").mkdir(parents=True)
    (cn / "progress_pack" / "__init__.py").write_text(PROGRESS_PACK)
    try:
        reg = default_registry(custom_nodes=cn, entry_points=False)
        report = reg.pack_report("progress_pack")
        assert report is not None and report.ok, report
        ex = Executor(reg, folders=Folders(tmp_path))
        events: list = []
        graph = {
            "1": {"class_type": "SyncSteps", "inputs": {"value": 4}},
            "2": {"class_type": "AsyncSteps", "inputs": {"value": ["1", 0]}},
        }
        r = ex.run(Graph.from_json(graph), targets=["2"], sink=events.append)
        assert r.ok, r.error
        assert r.values["2"] == (50,)
        progress = [(e.node, e.value, e.max) for e in events if isinstance(e, Progress)]
        # fractions of 1.0 as per-mille, whole numbers as they are, each for the node that reported it
        assert ("1", 250, 1000) in progress and ("1", 3, 4) in progress and ("2", 500, 1000) in progress
        # outside a node's execution there is no node to report for
        from comfy_api.v0_0_2 import ComfyAPISync

        with pytest.raises(RuntimeError, match="outside of a node"):
            ComfyAPISync().execution.set_progress(0.5, 1.0)
    finally:
        for name in [m for m in sys.modules if m == "custom_nodes" or m.startswith("custom_nodes.")]:
            del sys.modules[name]
        compat.uninstall()
