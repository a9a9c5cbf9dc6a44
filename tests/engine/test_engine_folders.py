"""Folders: ComfyUI's layout, safe joins, model lookup through symlinks."""

from __future__ import annotations

import os

import pytest

from kiln.engine import Folders, UnsafePath, safe_join


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x", "/etc/passwd", "C:/x", "a\\b", "x\0y", "..", "a/.."])
def test_safe_join_refuses_escapes(tmp_path, rel):
    with pytest.raises(UnsafePath):
        safe_join(tmp_path, rel)


def test_safe_join_allows_plain_names(tmp_path):
    assert safe_join(tmp_path, "a/b.png") == tmp_path.resolve() / "a" / "b.png"
    assert safe_join(tmp_path, "./c.png") == tmp_path.resolve() / "c.png"


def test_symlink_out_of_output_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    f = Folders(tmp_path / "base")
    f.output_dir.mkdir(parents=True)
    os.symlink(outside, f.output_dir / "link")
    with pytest.raises(UnsafePath):
        f.safe_path("output", "x.png", "link")
    with pytest.raises(UnsafePath):
        f.safe_path("secrets", "x.png")


def test_linked_model_file_is_listed_and_found(tmp_path):
    """Users link big model files in from other disks: what list_models shows, find_model must find."""
    disk = tmp_path / "bigdisk"
    disk.mkdir()
    (disk / "sd15.safetensors").write_bytes(b"x")
    f = Folders(tmp_path / "base")
    ckpts = f.model_dirs("checkpoints")[0]
    ckpts.mkdir(parents=True)
    os.symlink(disk / "sd15.safetensors", ckpts / "sd15.safetensors")
    (ckpts / "sub").mkdir()
    (ckpts / "sub" / "b.ckpt").write_bytes(b"y")
    assert f.list_models("checkpoints") == ["sd15.safetensors", "sub/b.ckpt"]
    assert f.find_model("checkpoints", "sd15.safetensors") == ckpts / "sd15.safetensors"
    assert f.find_model("checkpoints", "sub/b.ckpt") is not None
    assert f.find_model("checkpoints", "../bigdisk/sd15.safetensors") is None
    assert f.find_model("checkpoints", "missing.safetensors") is None


def test_extra_model_paths_yaml(tmp_path):
    other = tmp_path / "comfy"
    (other / "models" / "loras").mkdir(parents=True)
    (other / "models" / "loras" / "l.safetensors").write_bytes(b"z")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"comfyui:\n  base_path: {other}\n  loras: models/loras\n")
    f = Folders(tmp_path, extra_model_paths=[yaml])
    assert f.list_models("loras") == ["l.safetensors"]
