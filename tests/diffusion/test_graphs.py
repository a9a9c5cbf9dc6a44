"""Every workflow in graphs/ runs on the tiny model."""

from __future__ import annotations

import pytest
import torch

SUBST = {
    "ckpt_name": "tiny.safetensors",
    "lora_name": "a_kohya.safetensors",
    "control_net_name": "tiny_cn.safetensors",
}


def _decoder(graph: dict) -> str:
    return next(k for k, v in graph.items() if v["class_type"] == "VAEDecode")


@pytest.mark.parametrize(
    "name",
    [
        "txt2img.json",
        "txt2img_varied.json",
        "img2img.json",
        "inpaint.json",
        "outpaint.json",
        "lora.json",
        "controlnet_canny.json",
    ],
)
def test_graph_runs(world, name):
    g = world.graph(name, **SUBST)
    out = _decoder(g)
    save = next(k for k, v in g.items() if v["class_type"] == "SaveImage")
    res = world.run(g, [out, save])
    assert res.status == "success", res.error
    files = res.outputs[save]["images"]
    assert len(files) == 1 and (world.base / "output" / files[0]["subfolder"] / files[0]["filename"]).is_file()
    img = res.values[out][0]
    assert img.ndim == 4 and img.shape[-1] == 3
    assert img.shape[1] in (64, 128) and img.shape[2] in (64, 96, 128)
    assert torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1


def test_graphs_use_core_class_names_and_titles(world):
    import json
    from pathlib import Path

    GRAPHS = Path(__file__).resolve().parents[2] / "graphs"

    for path in GRAPHS.glob("*.json"):
        g = json.loads(path.read_text())
        for nid, node in g.items():
            assert node["_meta"]["title"], (path.name, nid)
        assert any(n["class_type"] == "SaveImage" for n in g.values()), path.name


def test_txt2img_graph_on_a_kiln_shapes_like_model(world):
    """The shipped graph's sizes are the trained model's: a 4x VAE, so 128x128 in EmptyLatentImage's
    8x convention is a 16x16 latent and a 64x64 image; its text encoder has 32 positions."""
    from tiny_models import write_shapes_like

    write_shapes_like(world.models / "checkpoints" / "shapes_like.safetensors")
    g = world.graph("txt2img.json", ckpt_name="shapes_like.safetensors")
    g["6"]["inputs"]["text"] = " ".join(["a (red:1.3) circle on a blue background"] * 6)  # > 30 tokens
    res = world.run(g, ["6", "3", "8"])
    assert res.status == "success", res.error
    cond = res.values["6"][0][0][0]
    assert cond.shape[1] % 32 == 0 and cond.shape[1] > 32
    assert res.values["3"][0]["samples"].shape == (1, 4, 16, 16)
    assert res.values["8"][0].shape == (1, 64, 64, 3)
