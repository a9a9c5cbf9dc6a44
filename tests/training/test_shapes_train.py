"""A tiny run of each training stage learns (loss goes down) and resumes exactly."""

import json

import numpy as np
import torch

from kiln.training import models, train

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
    losses = train.stage_unet(
        out,
        seed=0,
        steps=20,
        batch=16,
        lr=3e-3,
        resume=False,
        ckpt_every=1e9,
        eval_every=0,
        unet_config=TINY_UNET,
        warmup=2,
    )
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


def test_v_target_recovers_x0_and_epsilon():
    torch.manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    abar = torch.tensor([0.999, 0.5, 4e-5])
    a = abar.view(-1, 1, 1, 1)
    xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    v = train.diffusion_target(z0, noise, abar, "v_prediction")
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, z0, atol=1e-5)
    assert torch.allclose((1 - a).sqrt() * xt + a.sqrt() * v, noise, atol=1e-5)
    assert torch.equal(train.diffusion_target(z0, noise, abar, "epsilon"), noise)
    for kind in ("v_prediction", "epsilon"):  # predicted_x0 inverts the target
        out = train.diffusion_target(z0, noise, abar, kind)
        assert torch.allclose(train.predicted_x0(xt, out, abar, kind), z0, atol=1e-2 if kind == "epsilon" else 1e-5)


def test_v_phase_starts_from_the_epsilon_weights_and_records_its_target(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _prepare(out, monkeypatch, pool=16)
    kw = dict(batch=8, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET, warmup=2, resume=False)
    train.stage_unet(out, seed=0, steps=3, **kw)
    eps = torch.load(out / "unet" / "latest.pt", weights_only=False)
    losses = train.stage_unet(
        out, seed=1, steps=3, max_steps=1, prediction="v_prediction", init=out / "unet" / "latest.pt", **kw
    )
    v = torch.load(out / "unet-v" / "latest.pt", weights_only=False)
    assert len(losses) == 1 and v["step"] == 1
    assert v["scheduler_config"]["prediction_type"] == "v_prediction"
    # one step from the epsilon EMA weights: close to them, not a fresh initialisation
    k = "conv_in.weight"
    assert (v["model"]["unet"][k] - eps["ema"]["unet"][k]).abs().max() < 0.01
    from kiln.training import sample

    pipe = sample.Pipeline.from_run(out)  # picks the v phase and its scheduler config
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    assert sample.Pipeline.from_run(out, phase="unet").scheduler_config["prediction_type"] == "epsilon"
