"""Runs graphs on the shipped kiln-shapes model (models/ in the repository) through Kiln's own nodes.

The pictures are read back by the training side's pixel checker (:mod:`training.evaluate`), so these tests
fail on a broken sampler, scheduler, CFG, LoRA or ControlNet path, not only on a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln import engine, nodes
from kiln.nodes.sd.manager import ModelManager
from kiln.training import scenes as sc

REPO = Path(__file__).resolve().parents[2]
CKPT = "kiln-shapes.safetensors"
LORA = "kiln-outline.safetensors"
CONTROLNET = "kiln-shapes-edges.safetensors"


def test_scenes(n: int, offset: int = 0) -> list[sc.Scene]:
    """Single-object scenes from the test seed stream (never trained on, never used by the benchmark)."""
    return [sc.make_scene(sc.stream_seed(sc.TEST_STREAM, offset + i), n_objects=1) for i in range(n)]


test_scenes.__test__ = False  # a helper, not a test


@dataclass
class Job:
    prompt: str
    seed: int = 0
    batch: int = 1
    sampler: str = "euler"
    scheduler: str = "normal"
    cfg: float = 3.0  # the shipped graphs' guidance
    steps: int = 20
    denoise: float = 1.0
    lora: float | None = None  # LoRA strength; None: no LoRA node at all
    control: str | None = None  # control image file in the input folder
    control_strength: float = 1.0
    init: str | None = None  # img2img: source image file in the input folder
    inpaint: bool = False  # with ``init``: its alpha channel marks what to repaint


class Shapes:
    """A Kiln executor over the repository's models, with input/output folders of its own."""

    def __init__(self, base: Path):
        self.input = base / "input"
        self.input.mkdir(parents=True, exist_ok=True)
        folders = engine.Folders(REPO, input_dir=self.input, output_dir=base / "output", temp_dir=base / "temp")
        reg = engine.Registry()
        nodes.register_builtin(reg)
        self.manager = ModelManager(budget_bytes=2**31, device="cpu", dtype=torch.float32)
        self.ex = engine.Executor(reg, cache="lru:64", folders=folders, services={"model_manager": self.manager})

    def save_input(self, name: str, rgb: np.ndarray, alpha: np.ndarray | None = None) -> str:
        if alpha is None:
            Image.fromarray(rgb).save(self.input / name)
        else:
            Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(self.input / name)
        return name

    def graph(self, jobs: list[Job]) -> tuple[dict, list[str]]:
        g: dict = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
        outs = []
        for i, j in enumerate(jobs):
            model, clip = ["ckpt", 0], ["ckpt", 1]
            if j.lora is not None:
                g[f"lora{i}"] = {
                    "class_type": "LoraLoader",
                    "inputs": {
                        "model": model,
                        "clip": clip,
                        "lora_name": LORA,
                        "strength_model": j.lora,
                        "strength_clip": j.lora,
                    },
                }
                model, clip = [f"lora{i}", 0], [f"lora{i}", 1]
            g[f"pos{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": j.prompt, "clip": clip}}
            g[f"neg{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
            pos, neg = [f"pos{i}", 0], [f"neg{i}", 0]
            if j.control is not None:
                g["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
                g[f"cimg{i}"] = {"class_type": "LoadImage", "inputs": {"image": j.control}}
                g[f"apply{i}"] = {
                    "class_type": "ControlNetApplyAdvanced",
                    "inputs": {
                        "positive": pos,
                        "negative": neg,
                        "control_net": ["cn", 0],
                        "image": [f"cimg{i}", 0],
                        "strength": j.control_strength,
                        "start_percent": 0.0,
                        "end_percent": 1.0,
                    },
                }
                pos, neg = [f"apply{i}", 0], [f"apply{i}", 1]
            if j.init is None:
                g[f"lat{i}"] = {
                    "class_type": "EmptyLatentImage",
                    "inputs": {"width": 128, "height": 128, "batch_size": j.batch},
                }
            else:
                g[f"img{i}"] = {"class_type": "LoadImage", "inputs": {"image": j.init}}
                if j.inpaint:
                    g[f"lat{i}"] = {
                        "class_type": "VAEEncodeForInpaint",
                        "inputs": {
                            "pixels": [f"img{i}", 0],
                            "vae": ["ckpt", 2],
                            "mask": [f"img{i}", 1],
                            "grow_mask_by": 0,
                        },
                    }
                else:
                    g[f"lat{i}"] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"img{i}", 0], "vae": ["ckpt", 2]}}
            g[f"k{i}"] = {
                "class_type": "KSampler",
                "inputs": {
                    "seed": j.seed,
                    "steps": j.steps,
                    "cfg": j.cfg,
                    "sampler_name": j.sampler,
                    "scheduler": j.scheduler,
                    "denoise": j.denoise,
                    "model": model,
                    "positive": pos,
                    "negative": neg,
                    "latent_image": [f"lat{i}", 0],
                },
            }
            g[f"dec{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"k{i}", 0], "vae": ["ckpt", 2]}}
            outs.append(f"dec{i}")
        return g, outs

    def images(self, jobs: list[Job], cached: bool = True) -> list[list[np.ndarray]]:
        """For each job, its decoded images as uint8 ``[64, 64, 3]`` arrays. ``cached=False`` runs every
        node again (same loaded models, no output cache)."""
        g, outs = self.graph(jobs)
        ex = (
            self.ex
            if cached
            else engine.Executor(
                self.ex.registry, cache="none", folders=self.ex.folders, services={"model_manager": self.manager}
            )
        )
        res = ex.run(engine.Graph.from_json(g), targets=outs)
        assert res.status == "success", res.error
        return [[(im.numpy() * 255).round().clip(0, 255).astype(np.uint8) for im in res.values[o][0]] for o in outs]
