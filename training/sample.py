"""Text-to-image sampling with the trained components, using diffusers' schedulers directly.

This is the training side's own sampler, used by the evaluator and the benchmark; Kiln's graph path
(CheckpointLoaderSimple -> KSampler) loads the exported file independently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.training import data, models

SAMPLERS = ("euler", "dpmpp_2m", "ddim")


def make_scheduler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cfg = dict(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


@dataclass
class Pipeline:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict

    @classmethod
    def from_run(
        cls, run: str | Path, ema: bool = True, phase: str | None = None, decoder: str | None = None
    ) -> Pipeline:
        """The latest UNet checkpoint of a training run folder (EMA weights by default); ``phase`` is the
        checkpoint folder (``unet``, ``unet-v``, ``unet-v2`` to ``unet-v5``), by default the v phase
        when it has started."""
        from kiln.training import tokenizer as tk, train

        run = Path(run)

        if phase is None:
            phase = "unet-v" if (run / "unet-v" / "latest.pt").exists() else "unet"
        # v2 ships with the decoder fine-tuned on outlines (train.stage_vae_v2), once it exists
        v2_decoder = phase not in ("unet", "unet-v") and (run / "vae-v2" / "final.pt").exists()
        vae = train.load_vae(run, decoder or ("vae-v2" if v2_decoder else "vae"))
        state = torch.load(run / phase / "latest.pt", map_location="cpu", weights_only=False)
        # checkpoints from before the v phase carry no scheduler config: they predict epsilon
        sched_cfg = state.get("scheduler_config", train.scheduler_config("epsilon"))
        te, unet = train.build_unet_stack(run, state["unet_config"], train.text_config_of(state))
        key = "ema" if ema and "ema" in state else "model"
        te.load_state_dict(state[key]["text_encoder"])
        unet.load_state_dict(state[key]["unet"])
        return cls(tk.load(run / "tokenizer"), te.eval(), unet.eval(), vae.eval(), sched_cfg)

    @classmethod
    def untrained(cls, run: str | Path) -> Pipeline:
        from kiln.training import tokenizer as tk, train

        run = Path(run)
        torch.manual_seed(0)
        te, unet = train.build_unet_stack(run)
        return cls(
            tk.load(run / "tokenizer"), te.eval(), unet.eval(), train.load_vae(run).eval(), models.SCHEDULER_CONFIG
        )

    @classmethod
    def from_single_file(cls, path: str | Path) -> Pipeline:
        from kiln.training import export

        return export.load_pipeline(path)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        from kiln.training.tokenizer import MAX_LENGTH

        ids = self.tokenizer(
            prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seed: int = 0,
        steps: int = 20,
        cfg: float = 5.0,
        sampler: str = "euler",
        batch: int = 50,
        unguided_steps: int = 0,
    ) -> list[np.ndarray]:
        """``unguided_steps``: the first steps sample the conditional model alone (guidance 1), as
        ``graphs/txt2img_varied.json``'s first KSamplerAdvanced does; guidance ``cfg`` from there on."""
        out: list[np.ndarray] = []
        for i in range(0, len(prompts), batch):
            out.extend(self._generate(prompts[i : i + batch], seed + i, steps, cfg, sampler, unguided_steps))
        return out

    def _generate(self, prompts, seed, steps, cfg, sampler, unguided_steps):
        sched = make_scheduler(sampler, self.scheduler_config)
        sched.set_timesteps(steps)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))
        g = torch.Generator().manual_seed(seed)
        size = self.unet.config.sample_size
        x = torch.randn(len(prompts), self.unet.config.in_channels, size, size, generator=g)
        x = x * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            out = self.unet(xin, t, torch.cat([uncond, cond])).sample  # epsilon or v, per the config
            eu, ec = out.chunk(2)
            w = 1.0 if i < unguided_steps else cfg
            x = sched.step(eu + w * (ec - eu), t, x).prev_sample
        img = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return data.to_images(img)


def guidance_split(graph: dict) -> tuple[int, float]:
    """(steps sampled unguided, guidance after them) of an API-format graph that splits sampling over two
    KSamplerAdvanced nodes as ``graphs/txt2img_varied.json`` does; the ``unguided_steps`` and ``cfg`` of
    :meth:`Pipeline.generate` that sample the same way. ValueError for any other arrangement."""
    first, second = sorted(
        (n["inputs"] for n in graph.values() if n["class_type"] == "KSamplerAdvanced"), key=lambda i: i["start_at_step"]
    )
    if first["cfg"] != 1.0 or first["start_at_step"] != 0 or second["start_at_step"] != first["end_at_step"]:
        raise ValueError("expected an unguided first KSamplerAdvanced that the second one continues")
    return int(first["end_at_step"]), float(second["cfg"])


def save_grid(images: list[np.ndarray], path: str | Path, cols: int = 10, scale: int = 2) -> None:
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    grid = np.zeros((rows * 64, cols * 64, 3), np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64] = im
    Image.fromarray(grid).resize((cols * 64 * scale, rows * 64 * scale), Image.NEAREST).save(path)


def config_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True)
