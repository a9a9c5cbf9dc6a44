"""Architecture rules: engine/ stays pure; every shipped graph at least validates."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_engine_imports_nothing_heavy():
    code = (
        "import sys, kiln.engine, kiln.engine.executor, kiln.engine.validation, kiln.engine.cache, kiln.engine.folders;"
        "bad = [m for m in ('torch', 'aiohttp', 'kiln.nodes', 'kiln.server', 'kiln.api', 'diffusers', 'numpy')"
        " if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("path", sorted((ROOT / "graphs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_graphs_are_api_format(path):
    from kiln.engine import Graph

    g = Graph.load(path)
    assert g.to_json() == json.loads(path.read_text())  # round-trip stable
