"""`kiln run` / `kiln validate` on editor (UI-format) workflows and on PNGs that carry a workflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import SAFETY_S, die_with_parent

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "engine" / "ui_workflows" / "empty_image_save.json"


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


def test_run_a_ui_workflow_then_the_png_it_wrote(tmp_path):
    wf = tmp_path / "ui_workflow.json"
    wf.write_text(FIXTURE.read_text())
    r = kiln_cli("run", str(wf), "-q", "--set", "Orange.width=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = tmp_path / "output" / "ui_wf_00001_.png"
    assert first.exists(), r.stdout
    with Image.open(first) as im:
        assert im.size == (6, 8) and im.getpixel((0, 0)) == (255, 127, 0)  # the workflow's orange, --set applied
        prompt = json.loads(im.text["prompt"])
    assert prompt["1"]["class_type"] == "EmptyImage" and prompt["1"]["inputs"]["width"] == 6

    r = kiln_cli("run", str(first), "-q", cwd=tmp_path)  # the API prompt embedded by SaveImage
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "output" / "ui_wf_00002_.png") as im:
        assert im.size == (6, 8) and im.getpixel((0, 0)) == (255, 127, 0)

    r = kiln_cli("validate", str(first), cwd=tmp_path)
    assert r.returncode == 0 and "OK: 2 nodes" in r.stdout, r.stderr


def test_validate_a_png_carrying_only_the_editor_workflow(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", FIXTURE.read_text())
    png = tmp_path / "from_editor.png"
    Image.new("RGB", (4, 4)).save(png, pnginfo=info)
    r = kiln_cli("validate", str(png), cwd=tmp_path)
    assert r.returncode == 0 and "OK: 2 nodes" in r.stdout, r.stderr


def test_unknown_node_and_malformed_workflow_are_reported(tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["nodes"][0]["type"] = "EmptyImageXL"
    bad = tmp_path / "unknown.json"
    bad.write_text(json.dumps(data))
    r = kiln_cli("validate", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "EmptyImageXL" in r.stderr and "Traceback" not in r.stderr

    data = json.loads(FIXTURE.read_text())
    data["links"][0][1] = 42  # the SaveImage input now comes from a node that is not there
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    r = kiln_cli("run", str(broken), "-q", cwd=tmp_path)
    assert r.returncode == 2 and "#42" in r.stderr and "#2" in r.stderr and "Traceback" not in r.stderr
