import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAFETY_S, die_with_parent

ROOT = Path(__file__).resolve().parents[2]


def kiln_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
        preexec_fn=die_with_parent,
    )


@pytest.fixture
def graph_file(tmp_path):
    g = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            "_meta": {"title": "Base"},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cli"}},
    }
    p = tmp_path / "g.json"
    p.write_text(json.dumps(g))
    return p


def test_run_sets_combinations_and_shares_cache(tmp_path, graph_file):
    r = kiln_cli(
        "run",
        str(graph_file),
        "-q",
        "--set",
        "Base.color=255",
        "--set",
        "Base.color=65280",
        "--set",
        "3.filename_prefix=a",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 2
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["a_00001_.png", "a_00002_.png"]


def test_batch_csv_rows_and_cache_hits(tmp_path, graph_file):
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["1.color", "3.filename_prefix"])
        w.writerow([255, "x"])
        w.writerow([255, "y"])  # same image: only the save re-runs
    r = kiln_cli(
        "run", str(graph_file), "-q", "--batch", str(rows), "--output-dir", str(tmp_path / "out"), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "ran" in line]
    assert "ran 3 node(s), 0 from cache" in lines[0]
    assert "ran 1 node(s), 1 from cache" in lines[1]
    assert (tmp_path / "out" / "y_00001_.png").is_file()


def test_validation_error_exit_code_and_message(tmp_path, graph_file):
    r = kiln_cli("run", str(graph_file), "-q", "--set", "1.width=-1", cwd=tmp_path)
    assert r.returncode == 2
    assert "Node 1 \"Base\" (EmptyImage), input 'width' is -1, below its minimum 1" in r.stderr
    r = kiln_cli("run", str(graph_file), "--set", "nosuch.width=3", cwd=tmp_path)
    assert r.returncode == 2 and "no node with id or title 'nosuch'" in r.stderr


def test_node_error_exit_code(tmp_path, graph_file):
    r = kiln_cli("run", str(graph_file), "-q", "--set", "3.filename_prefix=../../escape", cwd=tmp_path)
    assert r.returncode == 1
    assert "Node 3 (SaveImage) failed" in r.stderr and "filename_prefix" in r.stderr


def test_malformed_and_ui_format_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = kiln_cli("validate", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "malformed" in r.stderr and "Traceback" not in r.stderr
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"last_node_id": 3, "nodes": [], "links": [], "version": 0.4}))
    r = kiln_cli("run", str(ui), cwd=tmp_path)
    assert r.returncode == 2 and "Export (API)" in r.stderr


def test_validate_and_nodes(tmp_path, graph_file):
    r = kiln_cli("validate", str(graph_file), cwd=tmp_path)
    assert r.returncode == 0 and "OK: 3 nodes" in r.stdout
    r = kiln_cli("nodes", "ImageScale", cwd=tmp_path)
    assert r.returncode == 0 and "upscale_method" in r.stdout and "lanczos" in r.stdout
    r = kiln_cli("nodes", "--json", cwd=tmp_path)
    info = json.loads(r.stdout)
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input"]["hidden"]["prompt"] == "PROMPT"
    r = kiln_cli("nodes", "SaveImag", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean 'SaveImage'" in r.stderr
