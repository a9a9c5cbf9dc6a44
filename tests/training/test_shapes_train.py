"""A tiny run of each training stage learns (loss goes down) and resumes exactly."""

import json

import numpy as np
import torch

from training import models, train

TINY_UNET = {**models.UNET_CONFIG, "block_out_channels": [16, 16, 32], "norm_num_groups": 4}
TINY_VAE = {**models.VAE_CONFIG, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}


def _prepare(out, monkeypatch, pool=48):
    monkeypatch.setattr(models, "VAE_CONFIG", TINY_VAE)
    train.stage_tokenizer(out)
    train.stage_vae(out, seed=0, steps=2, batch=2, lr=1e-3, resume=False, ckpt_every=1e9)
    train.stage_latents(out, pool, batch=16)


def test_twenty_unet_steps_decrease_the_loss(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _prepare(out, monkeypatch)
    losses = train.stage_unet(out, seed=0, steps=20, batch=16, lr=3e-3, resume=False, ckpt_every=1e9,
                              eval_every=0, unet_config=TINY_UNET, warmup=2)
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_resume_continues_exactly(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _prepare(out, monkeypatch, pool=16)
    kw = dict(seed=1, batch=8, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET, warmup=2)
    full = train.stage_unet(out, steps=6, resume=False, **kw)
    a = torch.load(out / "unet" / "latest.pt", weights_only=False)
    # stop after 3 steps (the schedule still says 6), then resume to 6
    train.stage_unet(out, steps=6, resume=False, max_steps=3, **kw)
    rest = train.stage_unet(out, steps=6, resume=True, **kw)
    b = torch.load(out / "unet" / "latest.pt", weights_only=False)
    assert rest == full[3:]
    for k, v in a["model"]["unet"].items():
        assert torch.equal(v, b["model"]["unet"][k]), k
    for k, v in a["ema"]["unet"].items():
        assert torch.equal(v, b["ema"]["unet"][k]), k
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] > 0
