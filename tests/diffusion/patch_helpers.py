"""Shared by the model patch and merge tests: load the tiny checkpoint's handles, encode prompts, and
sample a few Euler steps through the guider (``GuiderValue.denoiser``), which applies weight patches and
consults every run-time model patch."""

from __future__ import annotations

import torch

from kiln.nodes.conditioning import encode_prompt
from kiln.nodes.sd.guidance import cfg_guider
from kiln.nodes.sd.model_patch import effective_sampling

SHAPE = (1, 4, 8, 8)  # a 64x64 image in the tiny VAE's latent space


def load_handles(world, ckpt: str = "tiny.safetensors", ex=None):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    res = (ex or world.executor()).run(__import__("kiln").engine.Graph.from_json(g), targets=["1"])
    assert res.status == "success", res.error
    return res.values["1"]


def conds(clip, text: str = "a red circle", negative: str = "a blue square"):
    return encode_prompt(clip, text), encode_prompt(clip, negative)


def schedule(model, steps: int = 3) -> torch.Tensor:
    ms = effective_sampling(model)
    top = ms.num_timesteps - 1
    ts = [top * (1 - i / steps) for i in range(steps)]
    return torch.cat([torch.stack([ms.sigma(torch.tensor(float(t))) for t in ts]).float(), torch.zeros(1)])


def sample(model, positive, negative, cfg: float = 4.0, steps: int = 3, seed: int = 0, shape=SHAPE, fail_at=None):
    """A plain Euler run from seeded noise; ``fail_at`` raises inside the run at that step."""
    sigmas = schedule(model, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * float(sigmas[0])
    with torch.inference_mode(), cfg_guider(model, positive, negative, cfg).denoiser(shape, sigmas) as denoise:
        for i in range(len(sigmas) - 1):
            if fail_at == i:
                raise RuntimeError("boom")
            s, s_next = sigmas[i], sigmas[i + 1]
            x0 = denoise(x, s)
            x = x + (x - x0) / s * (s_next - s)
    return x


def unet_state(unet: torch.nn.Module) -> dict:
    """What a run may leave behind on a shared module: processors, hooks and weight tensors, by identity."""
    return {
        "processors": {n: id(p) for n, p in unet.attn_processors.items()},
        "hooks": {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in unet.named_modules()},
        "weights": {n: p.data_ptr() for n, p in unet.named_parameters()},
    }
