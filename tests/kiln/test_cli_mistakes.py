"""A new user's mistakes on the command line get a clean message and exit 2, never a traceback or silence."""

import json

import pytest

from tests.kiln.test_cli import kiln_cli


@pytest.fixture
def graph_file(tmp_path):
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cli"}},
    }
    p = tmp_path / "g.json"
    p.write_text(json.dumps(g))
    return p


def test_set_with_a_misspelled_input_is_an_error_with_the_nearest_name(tmp_path, graph_file):
    r = kiln_cli("run", str(graph_file), "-q", "--set", "1.colr=5", cwd=tmp_path)
    assert r.returncode == 2
    assert "has no input 'colr'" in r.stderr and "did you mean 1.color?" in r.stderr
    assert not (tmp_path / "output").exists() or not list((tmp_path / "output").iterdir())


def test_batch_column_with_a_misspelled_input_is_an_error(tmp_path, graph_file):
    rows = tmp_path / "rows.csv"
    rows.write_text("1.colour\n5\n")
    r = kiln_cli("run", str(graph_file), "-q", "--batch", str(rows), cwd=tmp_path)
    assert r.returncode == 2
    assert "did you mean 1.color?" in r.stderr


def test_unknown_input_in_graph_json_is_a_warning(tmp_path):
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "colr": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cli"}},
    }
    p = tmp_path / "g.json"
    p.write_text(json.dumps(g))
    r = kiln_cli("validate", str(p), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "'colr'" in r.stderr and "did you mean 'color'" in r.stderr
    r = kiln_cli("validate", str(p), "--json", cwd=tmp_path)
    assert any("colr" in w for w in json.loads(r.stdout)["warnings"])


@pytest.mark.parametrize("policy", ["foo", "lru:x", "ram:4XB", "lru", "ram:"])
def test_bad_cache_policy_is_a_usage_error(tmp_path, graph_file, policy):
    r = kiln_cli("run", str(graph_file), "-q", "--cache", policy, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "cache policy" in r.stderr


def test_version(tmp_path):
    r = kiln_cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("kiln ")


def test_nodes_shows_every_choice(tmp_path):
    r = kiln_cli("nodes", "KSampler", cwd=tmp_path)
    assert r.returncode == 0
    assert "..." not in r.stdout
    for name in ("euler", "uni_pc_bh2", "dpmpp_2m_sde"):
        assert name in r.stdout


def test_no_outputs_still_reports_the_other_mistakes(tmp_path):
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": "wide", "height": 8, "batch_size": 1, "color": 0}}}
    p = tmp_path / "g.json"
    p.write_text(json.dumps(g))
    r = kiln_cli("validate", str(p), cwd=tmp_path)
    assert r.returncode == 2
    assert "no output node" in r.stderr and "width" in r.stderr


def test_an_empty_model_folder_is_named_with_the_fix(tmp_path):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    p = tmp_path / "g.json"
    p.write_text(json.dumps(g))
    r = kiln_cli("validate", str(p), cwd=tmp_path)
    assert r.returncode == 2
    assert str(tmp_path / "models" / "checkpoints") in r.stderr and "--base-dir" in r.stderr
