"""Kiln loads and explains itself when the optional openai / boto3 packages are not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SAFETY_S

ROOT = Path(__file__).resolve().parents[2]

CODE = r"""
import json, sys
for name in ("openai", "boto3", "botocore"):
    sys.modules[name] = None  # import fails as if not installed
from kiln import engine, nodes
reg = engine.Registry(); nodes.register_builtin(reg)
out = {"load_errors": [str(e) for e in reg.load_errors],
       "have": [n for n in ("OpenAIImageGenerate", "SaveImageS3", "ReplicateRun") if n in reg]}
ex = engine.Executor(reg)
for g in ({"1": {"class_type": "OpenAIImageGenerate", "inputs": {"prompt": "x", "model": "dall-e-2"}}},
          {"1": {"class_type": "SaveFileS3", "inputs": {"data": "x", "bucket": "b"}}}):
    v = ex.validate(engine.Graph.from_json(g), targets=["1"])
    out.setdefault("errors", []).append(" ".join(v.messages()))
print(json.dumps(out))
"""


def test_nodes_load_without_optional_packages_and_say_what_to_install(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "KILN_CONFIG": str(tmp_path / "none.yaml"),
        "OPENAI_API_KEY": "sk-unused-000000",
        "HOME": str(tmp_path),
    }
    p = subprocess.run(
        [sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, env=env, timeout=SAFETY_S
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["load_errors"] == [] and len(out["have"]) == 3
    assert 'pip install -e ".[openai]"' in out["errors"][0]
    assert 'pip install -e ".[s3]"' in out["errors"][1]
