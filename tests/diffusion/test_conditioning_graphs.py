"""graphs/area_composition.json and graphs/sdxl_base.json run end to end on tiny models."""

from __future__ import annotations

import torch
from tiny_models import write_tiny_sdxl_folder


def _check_image(world, res, save: str) -> None:
    assert res.status == "success", res.error
    files = res.outputs[save]["images"]
    assert len(files) == 1 and (world.base / "output" / files[0]["subfolder"] / files[0]["filename"]).is_file()


def test_area_composition_graph(world):
    g = world.graph("area_composition.json", ckpt_name="tiny.safetensors", steps=3)
    res = world.run(g, ["9", "12", "13", "14"])
    _check_image(world, res, "14")
    positive = res.values["9"][0]
    # (height, width, y, x) in latent cells of 8 pixels: two 128x128 areas, the second 64 pixels in
    assert [o.get("area") for _, o in positive] == [(16, 16, 0, 0), (16, 16, 0, 8), None]
    assert [o.get("strength") for _, o in positive] == [1.0, 1.0, 0.01]
    assert res.values["13"][0].shape == (1, 128, 192, 3)
    # KSampler honours the areas: the same prompts without them give another latent
    g["8"]["inputs"] = {"conditioning_1": ["2", 0], "conditioning_2": ["4", 0]}
    plain = world.run(g, ["12"])
    assert plain.status == "success", plain.error
    assert not torch.allclose(plain.values["12"][0]["samples"], res.values["12"][0]["samples"])


def test_sdxl_base_graph(world):
    write_tiny_sdxl_folder(world.models / "checkpoints" / "tiny_xl_graph")
    g = world.graph("sdxl_base.json", ckpt_name="tiny_xl_graph", steps=3)
    g["5"]["inputs"].update(width=64, height=64)
    res = world.run(g, ["6", "3", "8", "9"])
    _check_image(world, res, "9")
    cond, opts = res.values["6"][0][0]
    assert cond.shape == (1, 77, 64) and opts["pooled_output"].shape == (1, 32)
    assert (opts["width"], opts["height"], opts["target_width"], opts["crop_w"]) == (1024, 1024, 1024, 0)
    image = res.values["8"][0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
