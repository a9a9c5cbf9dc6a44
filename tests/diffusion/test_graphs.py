"""Every workflow in graphs/ runs on the tiny model."""
from __future__ import annotations

import pytest
import torch

SUBST = {"ckpt_name": "tiny.safetensors", "lora_name": "a_kohya.safetensors",
         "control_net_name": "tiny_cn.safetensors", "image": "example.png"}


def _decoder(graph: dict) -> str:
    return next(k for k, v in graph.items() if v["class_type"] == "VAEDecode")


@pytest.mark.parametrize("name", ["txt2img.json", "img2img.json", "inpaint.json", "outpaint.json", "lora.json",
                                  "controlnet_canny.json"])
def test_graph_runs(world, name):
    g = world.graph(name, **SUBST)
    out = _decoder(g)
    res = world.run(g, [out])
    assert res.status == "success", res.error
    img = res.values[out][0]
    assert img.ndim == 4 and img.shape[-1] == 3
    assert img.shape[1] == 64 and img.shape[2] in (64, 96)
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
