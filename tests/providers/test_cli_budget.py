"""`kiln run --max-cost` against the fake OpenAI server, through a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SAFETY_S

ROOT = Path(__file__).resolve().parents[2]


def kiln_run(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kiln", "run", *args, "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
    )


def test_max_cost_flag_stops_and_allows(tmp_path, openai_server):
    g = {
        "1": {
            "class_type": "OpenAIImageGenerate",
            "inputs": {"prompt": "a red fox", "model": "dall-e-3", "quality": "hd", "size": "1024x1024"},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    path = tmp_path / "g.json"
    path.write_text(json.dumps(g))
    r = kiln_run(tmp_path, str(path), "--max-cost", "0.01")
    assert r.returncode == 1 and "max_cost" in r.stderr
    assert openai_server.requests == []  # refused before any paid call
    r = kiln_run(tmp_path, str(path), "--max-cost", "5")
    assert r.returncode == 0, r.stderr
    assert "estimated cost $" in r.stdout and len(openai_server.requests) == 1
