"""Session fixtures: a Kiln base folder with tiny random models in every format the loaders read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

torch.set_num_threads(1)

from kiln import engine, nodes  # noqa: E402
from kiln.nodes.sd.manager import ModelManager  # noqa: E402

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


class World:
    """The tiny models on disk and helpers to run graphs against them."""

    def __init__(self, base: Path):
        self.base = base
        self.models = base / "models"
        self.comps = tiny_models.build_components(seed=0)
        unet, vae, te, tok = self.comps
        ck = self.models / "checkpoints"
        self.ckpt = tiny_models.write_ldm(ck / "tiny.safetensors", self.comps)
        self.folder = tiny_models.write_diffusers(ck / "tiny_diffusers", self.comps)
        self.lora_a = tiny_models.make_lora(unet, te, seed=1)
        self.lora_b = tiny_models.make_lora(unet, te, seed=2)
        lo = self.models / "loras"
        lo.mkdir(parents=True)
        tiny_models.write_lora_kohya(lo / "a_kohya.safetensors", self.lora_a)
        tiny_models.write_lora_diffusers(lo / "a_diffusers.safetensors", self.lora_a)
        tiny_models.write_lora_kohya(lo / "b_kohya.safetensors", self.lora_b)
        cn = self.models / "controlnet"
        cn.mkdir(parents=True)
        self.controlnet = tiny_models.make_controlnet(unet)
        tiny_models.write_controlnet(cn / "tiny_cn.safetensors", self.controlnet)
        tiny_models.write_controlnet(cn / "tiny_cn_ldm.safetensors", self.controlnet, layout="ldm")
        inp = base / "input"
        inp.mkdir(parents=True)
        rng = np.random.default_rng(0)
        img = np.zeros((64, 64, 4), np.uint8)
        img[..., :3] = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        img[16:48, 16:48, :3] = [230, 40, 40]
        img[..., 3] = 255
        img[24:40, 24:40, 3] = 0  # transparent square: LoadImage's mask marks it for inpainting
        Image.fromarray(img, "RGBA").save(inp / "example.png")
        Image.fromarray(img[:, :48, :3]).save(inp / "outpaint_source.png")  # graphs/outpaint.json widens it to 64
        self.manager = ModelManager(budget_bytes=2**31, device="cpu", dtype=torch.float32)

    def executor(self, cache: str | None = None) -> engine.Executor:
        reg = engine.Registry()
        nodes.register_builtin(reg)
        return engine.Executor(
            reg, cache=cache, folders=engine.Folders(self.base), services={"model_manager": self.manager}
        )

    def graph(self, name: str, **subst) -> dict:
        g = json.loads((GRAPHS / name).read_text())
        for node in g.values():
            for k, v in subst.items():
                if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                    node["inputs"][k] = v
        return g

    def run(self, graph: dict, targets: list[str], ex: engine.Executor | None = None, extra_data=None, sink=None):
        ex = ex or self.executor()
        res = ex.run(engine.Graph.from_json(graph), targets=targets, extra_data=extra_data, sink=sink)
        return res


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("kiln"))
