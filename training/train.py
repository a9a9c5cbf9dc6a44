"""Train the kiln-shapes stack: tokenizer -> VAE -> latent pool -> UNet + text encoder.

    python -m kiln.training.train all --out runs/shapes              # everything, from scratch
    python -m kiln.training.train unet-v --out runs/shapes --resume  # continue the v-prediction stage
    python -m kiln.training.train unet-v2 --out runs/shapes --resume # the partial-caption fine-tune (v2)
    python -m kiln.training.train unet-v3 --out runs/shapes --resume # v2, more scenes of several objects

The UNet is trained in two phases: 6,000 steps predicting epsilon (folder ``unet/``), then a fine-tune of
those EMA weights predicting v (folder ``unet-v/``); see :mod:`training.models` for why. ``unet-v2`` (not
part of ``all``, so the shipped v1 files reproduce unchanged) fine-tunes the v weights on a mix of full and
partial captions (:mod:`training.captions`) into ``unet-v2/``; ``unet-v3`` carries on from those weights
with scenes of two and three objects drawn more often, into ``unet-v3/``; ``unet-v4`` to ``unet-v12`` each carry
on from the stage before (training/README.md), and ``unet-v12`` is what the second release ships.

Every stage is deterministic from ``--seed``: batches, noise and timesteps are functions of
(seed, step) (see :mod:`training.data`), so ``--resume`` from a checkpoint (model, EMA, optimizer, step;
the LR schedule is a function of the step) continues exactly as an uninterrupted run would.
Checkpoints are written atomically to ``<out>/<stage>/latest.pt`` every ``--ckpt-every`` seconds.
Use one thread (the default): the machine is shared.

One file (~750 lines): every stage shares the checkpoint/resume loop, the schedules and the CLI, and the
stages are read as one pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kiln.training import data, grounding as gr, models, scenes as sc, tokenizer as tk

CAPTION_DROPOUT = 0.1
V_STEPS = 6000  # the v-prediction fine-tune of the shipped weights
# In the v phase this fraction of each batch has t >= HIGH_T (SNR < 0.007): where an object's place is
# decided. Learning to place by the prompt has a long plateau (the network must first build position-
# dependent features out of zero padding); sampling those steps more shortens it.
HIGH_T, HIGH_T_FRACTION = 700, 0.5
MIN_SNR_GAMMA = 5.0


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _gen(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, salt]).integers(2**62)))


# ---------------------------------------------------------------- tokenizer


def stage_tokenizer(out: Path) -> None:
    tk.train_tokenizer(out / "tokenizer")
    print(f"tokenizer: {len(tk.load(out / 'tokenizer'))} entries -> {out / 'tokenizer'}")


# ---------------------------------------------------------------- VAE


def load_vae(out: Path, decoder: str = "vae"):
    """The trained VAE; ``decoder="vae-v2"`` swaps in the v2 decoder (same encoder, so the same latents), and
    a run-relative ``.pt`` file one saved on the way (``vae-v2/step-2000.pt``)."""
    vae = models.build_vae(json.loads((out / "vae" / "config.json").read_text()))
    vae.load_state_dict(torch.load(out / "vae" / "final.pt", map_location="cpu", weights_only=True))
    if decoder != "vae":
        path = out / decoder if decoder.endswith(".pt") else out / decoder / "final.pt"
        vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return vae


VAE_PHASE1 = 700


def vae_lr(step: int, lr: float) -> float:
    """A 700-step warmup + cosine cycle, then a constant ``0.3 * lr`` for however many steps follow.

    (The first shipped VAE stopped after the cosine cycle with muddled colours; the constant tail makes
    "train longer" and "resume with a larger --vae-steps" the same schedule.)
    """
    if step < VAE_PHASE1:
        return lr_at(step, lr, 100, VAE_PHASE1)
    return 0.3 * lr


# From this step on the reconstruction loss weighs object pixels 8x: objects cover 3-14% of an image, and
# with a plain per-pixel loss the VAE had learned the backgrounds but still muddled object colours
# (52% colour accuracy on its reconstructions at step 887). The step is where the running first run was
# switched over; it is part of the schedule, so `--vae-steps N` from scratch reproduces it.
VAE_FG_FROM = 1000
FG_WEIGHT = 8.0


def fg_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight ``[B, 1, H, W]``: FG_WEIGHT where the image differs from its border colour."""
    border = torch.cat([x[:, :, :2].flatten(2), x[:, :, -2:].flatten(2)], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    fg = ((x - bg).abs().sum(dim=1, keepdim=True) > 0.3).float()
    fg = F.max_pool2d(fg, 3, stride=1, padding=1)  # include the anti-aliased rim
    return 1.0 + (FG_WEIGHT - 1.0) * fg


def _resume_vae(ckpt: Path, vae, opt, name: str) -> int:
    """Load a VAE stage's checkpoint (model, optimizer) if there is one; the step to carry on from."""
    if not ckpt.exists():
        return 0
    st = torch.load(ckpt, map_location="cpu", weights_only=False)
    vae.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    print(f"{name}: resumed at step {st['step']}")
    return st["step"]


def stage_vae(out: Path, seed: int, steps: int, batch: int, lr: float, resume: bool, ckpt_every: float) -> None:
    ckpt = out / "vae" / "latest.pt"
    torch.manual_seed(seed)
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = _resume_vae(ckpt, vae, opt, "vae") if resume else 0
    print(f"vae: {models.n_params(vae) / 1e6:.2f}M params, {steps} steps of {batch}")
    last = time.time()
    bar = tqdm(total=steps, initial=step, desc="vae", unit="step", mininterval=10)
    ema_loss = None
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = vae_lr(step, lr)
        x = data.vae_batch(seed, step, batch)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=_gen(seed, step, 1))
        y = vae.decode(z).sample
        err = (y - x).abs() + (y - x) ** 2
        if step >= VAE_FG_FROM:
            err = err * fg_weight(x)
        rec = err.mean()
        loss = rec + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = rec.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * rec.item()
        bar.update(1)
        bar.set_postfix(
            rec=f"{ema_loss:.4f}", samples_s=f"{(bar.format_dict['rate'] or 0.0) * batch:.1f}", refresh=False
        )
        if time.time() - last > ckpt_every or step == steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            last = time.time()
    bar.close()
    # scaling factor: unit variance latents, as SD's 0.18215 does for its VAE
    vae.eval()
    with torch.no_grad():
        x = data.vae_batch(seed + 1, 0, 256)
        std = vae.encode(x).latent_dist.mean.std().item()
    cfg = dict(models.VAE_CONFIG)
    cfg["scaling_factor"] = round(1.0 / std, 5)
    (out / "vae").mkdir(parents=True, exist_ok=True)
    (out / "vae" / "config.json").write_text(json.dumps(cfg, indent=1))
    torch.save(vae.state_dict(), out / "vae" / "final.pt")
    with torch.no_grad():
        x = data.vae_batch(seed + 2, 0, 32)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        err = (y - x).abs().mean().item() * 127.5
    print(f"vae: scaling_factor {cfg['scaling_factor']}, mean abs reconstruction error {err:.2f}/255")


VAE2_STEPS = 6000
# the decoder ran 2,000 steps, was shipped with v2, then continued to 6,000: its learning rate follows a cosine
# to the end of each segment in turn (over the first 2,000 steps, then from there to 6,000)
VAE2_SEGMENTS = (2000,)
VAE2_OUTLINE_FRACTION = 0.5
VAE2_LR = 5e-4


def vae2_lr(step: int, lr: float, steps: int) -> float:
    """The decoder fine-tune's learning rate: a cosine to the end of the segment ``step`` is in
    (:data:`VAE2_SEGMENTS` below ``steps``, then ``steps``)."""
    end = next((e for e in (*VAE2_SEGMENTS, steps) if step < e and e <= steps), steps)
    return lr_at(step, lr, 50, end)


def stage_vae_v2(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    max_steps: int | None = None,
) -> None:
    """Fine-tune the VAE's decoder only (encoder frozen: latents, and so every UNet, stay valid) on half
    outline scenes, the loss weighted over each object's whole footprint, into ``vae-v2/``. The v1 decoder
    saw 10% outlines and turns their latents back into half-filled shapes (hollowness 0.23 against 0.44
    drawn), a ceiling no LoRA on the UNet can pass."""
    ckpt = out / "vae-v2" / "latest.pt"
    vae = load_vae(out)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = _resume_vae(ckpt, vae, opt, "vae-v2") if resume else 0
    print(f"vae-v2: decoder {sum(p.numel() for p in params) / 1e6:.2f}M params, {steps} steps of {batch}")
    last = time.time()
    bar = tqdm(total=steps, initial=step, desc="vae-v2", unit="step", mininterval=10)
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = vae2_lr(step, lr, steps)
        x, foot = data.vae_batch_and_footprints(seed, step, batch, outline_fraction=VAE2_OUTLINE_FRACTION)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=_gen(seed, step, 1))
        y = vae.decode(z).sample
        # weighted over the whole footprint: an outline's hollow inside counts as much as its stroke
        loss = (((y - x).abs() + (y - x) ** 2) * fg_weight(foot)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{loss.item():.4f}", refresh=False)
        stop = max_steps is not None and step >= max_steps
        if step in VAE2_SEGMENTS and step < steps:  # the decoder as it was at a segment's end (the LoRA's)
            torch.save(vae.state_dict(), out / "vae-v2" / f"step-{step}.pt")
        if time.time() - last > ckpt_every or step == steps or stop:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            last = time.time()
        if stop:
            bar.close()
            return
    bar.close()
    torch.save(vae.state_dict(), out / "vae-v2" / "final.pt")


# ---------------------------------------------------------------- latent pool


def stage_latents(out: Path, pool: int, batch: int = 256, name: str = "latents.pt", multi: bool = False) -> None:
    """Encode the fixed training pool once: latent mean and std (fp16) plus tokenized captions. ``multi``
    encodes the many-object pool (:func:`training.data.multi_pool_scenes`) instead, into ``name``."""
    path = out / name
    vae = load_vae(out).eval()
    tok = tk.load(out / "tokenizer")
    scenes = data.multi_pool_scenes(pool) if multi else data.pool_scenes(pool)
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, pool, batch), desc="encode pool", unit="batch", mininterval=10):
            x = data.to_tensor([sc.render(s) for s in scenes[i : i + batch]])
            d = vae.encode(x).latent_dist
            means.append(d.mean.half())
            stds.append(d.std.half())
    ids = tok(
        [sc.caption(s) for s in scenes],
        padding="max_length",
        max_length=tk.MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    save_atomic({"mean": torch.cat(means), "std": torch.cat(stds), "ids": ids.to(torch.int16)}, path)
    print(f"latents: {pool} scenes -> {path}")


def load_pool(out: Path, names: tuple[str, ...] = ("latents.pt",)) -> dict:
    """The latent files ``names`` (in ``out``, written by :func:`stage_latents`) joined into one pool, in
    order; ``sizes`` holds each file's number of scenes."""
    parts = [torch.load(out / name, map_location="cpu", weights_only=True) for name in names]
    pool = {k: torch.cat([p[k] for p in parts]) for k in ("mean", "std", "ids")}
    return {**pool, "sizes": [p["mean"].shape[0] for p in parts]}


# ---------------------------------------------------------------- UNet + text encoder


# From this step on, the noisy steps are weighted up to 1/SNR (capped): see loss_weight. The run that
# produced the shipped weights was switched over here after 1,825 steps, when a probe showed its outputs
# did not depend on position words at all; the step is part of the schedule, so a from-scratch run
# reproduces it.
HIGH_NOISE_FROM = 1825
HIGH_NOISE_CAP = 30.0


def loss_weight_v(abar_t: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the v-MSE: ``min(1, (1 + gamma) / (1 + SNR))``.

    The v-MSE is the x0-MSE times (1 + SNR), so this weighs the x0 error by ``min(1 + SNR, 1 + gamma)``:
    1 at every noisy step (where place, colour and background are decided) and capped, as Min-SNR does,
    where the image is nearly clean and only edges are being polished.
    """
    snr = abar_t / (1 - abar_t)
    return ((1 + MIN_SNR_GAMMA) / (1 + snr)).clamp(max=1.0)


def loss_weight(abar_t: torch.Tensor, step: int) -> torch.Tensor:
    """Per-sample weight of the epsilon-MSE (the epsilon phase).

    * SNR > 1: Min-SNR (gamma 5), min(SNR, 5) / SNR: the nearly clean steps, which only polish edges,
      stop dominating the gradient.
    * SNR < 1 (from HIGH_NOISE_FROM on): min(1/SNR, 30), i.e. the x0-error at high noise. Epsilon-MSE
      scales the x0 error by SNR, so at the noise levels where an object's place, colour and the
      background are decided (SNR 0.005-0.1 here) what the prompt could teach was a 1/1000 effect and
      was never learned; this is the weighting EDM / v-prediction give those steps, capped so that the
      pure-noise end does not dominate.
    """
    snr = abar_t / (1 - abar_t)
    w = snr.clamp(max=MIN_SNR_GAMMA) / snr
    if step >= HIGH_NOISE_FROM:
        w = torch.where(snr < 1, (1 / snr).clamp(max=HIGH_NOISE_CAP), w)
    return w


def build_unet_stack(out: Path, unet_config: dict | None = None, text_config: dict | None = None):
    """The text encoder (``text_config``, by default :data:`models.TEXT_CONFIG` with the run's vocabulary)
    and the UNet (``unet_config``) of a training run, untrained."""
    cfg = dict(text_config or models.TEXT_CONFIG)
    if text_config is None:
        cfg["vocab_size"] = len(tk.load(out / "tokenizer"))
    return models.build_text_encoder(cfg), models.build_unet(unet_config)


def text_config_of(state: dict) -> dict:
    """The text encoder config of a training checkpoint: its ``text_config``, or for checkpoints from before
    grown text encoders (training/graft.py) the default :data:`models.TEXT_CONFIG` with their vocabulary."""
    if "text_config" in state:
        return dict(state["text_config"])
    cfg = dict(models.TEXT_CONFIG)
    weights = state.get("ema", state.get("model"))["text_encoder"]
    cfg["vocab_size"] = weights["embeddings.token_embedding.weight"].shape[0]
    return cfg


def text_config(text_encoder) -> dict:
    """The :data:`models.TEXT_CONFIG` keys of a live text encoder's config."""
    conf = text_encoder.config.to_dict()
    return {k: conf[k] for k in models.TEXT_CONFIG}


def _ema_update(ema: dict, params: dict, decay: float) -> None:
    with torch.no_grad():
        for k, p in params.items():
            ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)


PHASES = {"epsilon": "unet", "v_prediction": "unet-v"}  # prediction type -> checkpoint folder


def diffusion_target(z0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the UNet is trained to output for ``x_t = sqrt(abar) z0 + sqrt(1 - abar) noise``."""
    if prediction == "v_prediction":
        a = abar_t.view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * z0
    if prediction == "epsilon":
        return noise
    raise ValueError(f"unknown prediction type {prediction!r}")


def predicted_x0(xt: torch.Tensor, out: torch.Tensor, abar_t: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean latent the UNet's output implies (the inverse of :func:`diffusion_target`)."""
    a = abar_t.view(-1, 1, 1, 1) if abar_t.dim() else abar_t
    if prediction == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * out
    if prediction == "epsilon":
        return (xt - (1 - a).sqrt() * out) / a.sqrt()
    raise ValueError(f"unknown prediction type {prediction!r}")


def emphasise_noisy_end(t: torch.Tensor, g: torch.Generator, n_train: int = 1000) -> torch.Tensor:
    """Redraw HIGH_T_FRACTION of the timesteps from [HIGH_T, n_train): where an object's place is decided."""
    t_hi = torch.randint(HIGH_T, n_train, t.shape, generator=g)
    return torch.where(torch.rand(t.shape, generator=g) < HIGH_T_FRACTION, t_hi, t)


def scheduler_config(prediction: str) -> dict:
    return {**models.SCHEDULER_CONFIG, "prediction_type": prediction}


# latent pixels where the UNet's clean estimate is this far from the target (mean over channels; the
# background's errors sit under 0.1 for nine pixels in ten, an object's around 0.25-0.35 at high noise) are
# weighed as objects too: what it draws where the scene has nothing
STRAY_ERROR = 0.25


def stage_unet(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    eval_every: int,
    unet_config: dict | None = None,
    warmup: int = 300,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    prediction: str = "epsilon",
    init: Path | None = None,
    phase: str | None = None,
    caption_ids: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    indices: Callable[[int], np.ndarray] | None = None,
    pool: dict[str, torch.Tensor] | None = None,
    pixel_weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    text_lr_scale: float = 1.0,
    grounding: Callable[[int, torch.Tensor, torch.Tensor], tuple] | None = None,
    grounding_weight: float = 0.0,
) -> list[float]:
    """Train (or resume) to ``steps``; ``max_minutes`` / ``max_steps`` stop early without changing the
    schedule, so a later ``--resume`` carries on as if never stopped. Returns this call's losses.

    ``prediction`` is the target ("epsilon" or "v_prediction"); each has its own checkpoint folder
    (:data:`PHASES`). ``init`` starts a fresh run (new optimizer and schedule) from another checkpoint's
    EMA weights: the shipped model is an epsilon run fine-tuned to v this way. ``phase`` overrides the
    checkpoint folder; ``caption_ids(step, pool_indices)`` replaces the pool's cached full captions (token
    ids ``[B, MAX_LENGTH]``), as the v2 fine-tune does with its partial captions; ``indices(step)`` replaces
    the epoch order over the pool (the v3 fine-tune draws many-object scenes more often); ``pool`` is the latent
    pool already loaded (:func:`load_pool`; by default ``latents.pt``); ``pixel_weight(pool_indices, stray)`` weighs
    the loss per latent pixel (``[B, 1, H, W]``, the v5 fine-tune's object weighting); ``stray`` (bool, the
    same shape) marks where the UNet's clean estimate misses the target by more than :data:`STRAY_ERROR`;
    ``text_lr_scale`` trains the text encoder at that multiple of the UNet's learning rate;
    ``grounding(step, pool_indices, kept)`` gives the tokens' objects and masks of this step's captions
    (:func:`training.grounding.targets`), whose cross-attention grounding loss is added ``grounding_weight``
    times."""
    phase = phase or PHASES[prediction]
    ckpt = out / phase / "latest.pt"
    torch.manual_seed(seed)
    # the checkpoint this call starts from (``init``, or its own when resuming) decides the architecture;
    # ``unet_config`` is for a fresh start. A round from a grown checkpoint (graft.py) trains the grown networks
    resuming = resume and ckpt.exists()
    source = ckpt if resuming else init
    start = torch.load(source, map_location="cpu", weights_only=False) if source is not None else {}
    te, unet = build_unet_stack(out, start.get("unet_config") or unet_config, text_config_of(start) if start else None)
    if start and not resuming:
        te.load_state_dict(start["ema"]["text_encoder"])
        unet.load_state_dict(start["ema"]["unet"])
        print(f"unet: initialised from the EMA weights of {init} (step {start['step']})")
    named = {f"text_encoder.{k}": p for k, p in te.named_parameters()}
    named.update({f"unet.{k}": p for k, p in unet.named_parameters()})
    if text_lr_scale == 1.0:
        groups: list[dict] = [{"params": list(named.values()), "lr_scale": 1.0}]
    else:
        groups = [
            {"params": list(te.parameters()), "lr_scale": text_lr_scale},
            {"params": list(unet.parameters()), "lr_scale": 1.0},
        ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    ema = {k: p.detach().clone() for k, p in named.items()}
    step = 0
    if resuming:
        st = start
        # a finished phase's slim snapshot (snapshot.py) keeps only the EMA weights: nothing left to train
        model = st.get("model", st["ema"])
        te.load_state_dict(model["text_encoder"])
        unet.load_state_dict(model["unet"])
        if "opt" in st:
            opt.load_state_dict(st["opt"])
        elif st["step"] < steps:
            raise SystemExit(f"{ckpt} holds finished weights only (step {st['step']}); it cannot train on to {steps}")
        for part in ("text_encoder", "unet"):
            for k, v in st["ema"][part].items():
                if f"{part}.{k}" in ema:
                    ema[f"{part}.{k}"].copy_(v)
        step = st["step"]
        print(f"unet: resumed at step {step}")
    pool = pool if pool is not None else load_pool(out)
    n = pool["mean"].shape[0]
    scale = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    sched = models.build_scheduler()
    abar = sched.alphas_cumprod.float()
    tok = tk.load(out / "tokenizer")
    empty = tok([""], padding="max_length", max_length=tk.MAX_LENGTH, return_tensors="pt").input_ids[0]
    print(
        f"unet: {models.n_params(unet) / 1e6:.2f}M params, text encoder {models.n_params(te) / 1e6:.2f}M, "
        f"pool {n}, {steps} steps of {batch}, lr {lr}"
    )

    def state() -> dict:
        split = {"text_encoder": {}, "unet": {}}
        for k, v in ema.items():
            part, name = k.split(".", 1)
            split[part][name] = v
        return {
            "model": {"text_encoder": te.state_dict(), "unet": unet.state_dict()},
            "ema": split,
            "opt": opt.state_dict(),
            "step": step,
            "seed": seed,
            "unet_config": dict(unet.config),
            "text_config": text_config(te),
            "scheduler_config": scheduler_config(prediction),
        }

    recorder = gr.AttentionRecorder(unet) if grounding is not None else None
    losses = []
    t_start = last = time.time()
    bar = tqdm(total=steps, initial=step, desc="unet", unit="step", mininterval=15)
    ema_loss = ema_ground = None
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, steps) * g.get("lr_scale", 1.0)
        idx = torch.from_numpy(data.pool_indices(seed, step, batch, n) if indices is None else indices(step))
        g = _gen(seed, step, 2)
        mean, std = pool["mean"][idx].float(), pool["std"][idx].float()
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        ids = pool["ids"][idx].long() if caption_ids is None else caption_ids(step, idx)
        drop = torch.rand(batch, generator=g) < CAPTION_DROPOUT
        ids[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        if prediction == "v_prediction":
            t = emphasise_noisy_end(t, g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        if recorder is not None:
            recorder.clear()
        pred = unet(xt, t, te(ids)[0]).sample
        target = diffusion_target(z0, noise, abar[t], prediction)
        w = loss_weight_v(abar[t]) if prediction == "v_prediction" else loss_weight(abar[t], step)
        err = F.mse_loss(pred, target, reduction="none")
        if pixel_weight is not None:
            with torch.no_grad():
                x0_err = (predicted_x0(xt, pred, abar[t], prediction) - z0).abs().mean(dim=1, keepdim=True)
            err = err * pixel_weight(idx, x0_err > STRAY_ERROR)
        loss = (err.mean(dim=(1, 2, 3)) * w).mean()
        if recorder is not None and grounding is not None:
            g_loss = gr.loss(recorder.maps, *grounding(step, idx, ~drop))
            loss = loss + grounding_weight * g_loss
            ema_ground = g_loss.item() if ema_ground is None else 0.98 * ema_ground + 0.02 * g_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
        opt.step()
        step += 1
        _ema_update(ema, named, min(0.999, (1 + step) / (10 + step)))
        losses.append(loss.item())
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        rate = bar.format_dict["rate"] or 0.0
        shown = {"loss": f"{ema_loss:.4f}", "samples_s": f"{rate * batch:.1f}", "lr": f"{g_lr(opt):.2e}"}
        if ema_ground is not None:
            shown["grounding"] = f"{ema_ground:.3f}"
        bar.set_postfix(shown, refresh=False)
        done = (
            step == steps
            or (max_minutes is not None and time.time() - t_start > max_minutes * 60)
            or (max_steps is not None and step >= max_steps)
        )
        if time.time() - last > ckpt_every or done:
            save_atomic(state(), ckpt)
            last = time.time()
            extra = "" if ema_ground is None else f" grounding {ema_ground:.3f}"
            tqdm.write(f"checkpoint step {step} loss {ema_loss:.4f}{extra} -> {ckpt}")
        if eval_every and (step % eval_every == 0 or done):
            save_atomic(state(), ckpt)
            quick_eval(out, step, phase, partial=caption_ids is not None)
        if done:
            break
    bar.close()
    return losses


def g_lr(opt) -> float:
    return opt.param_groups[-1]["lr"]  # the UNet's (the text encoder's group, when apart, comes first)


def quick_eval(out: Path, step: int, phase: str = "unet", n: int = 50, partial: bool = False) -> dict:
    """Euler on ``n`` held-out full prompts; with ``partial`` also 20 held-out partial prompts x 8 seeds."""
    from kiln.training import evaluate, sample

    pipe = sample.Pipeline.from_run(out, phase=phase)
    targets = sc.eval_scenes(n)
    t0 = time.time()
    imgs = pipe.generate([sc.caption(s) for s in targets], seed=0, steps=20, cfg=5.0, sampler="euler")
    acc = evaluate.accuracy(imgs, targets)
    tqdm.write(
        f"eval step {step} ({time.time() - t0:.0f}s, euler 20 cfg 5, {n} prompts): "
        + " ".join(f"{k} {v * 100:.0f}%" for k, v in acc.items())
    )
    sample.save_grid(imgs, out / phase / f"samples-{step:06d}.png")
    row = {"phase": phase, "step": step, **acc}
    if partial:
        row.update(partial_eval(pipe, out / phase / f"partial-{step:06d}.png"))
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return acc


def partial_eval(pipe, grid: Path | None = None, n: int = 20) -> dict:
    """Partial-prompt accuracy and diversity (Euler, 8 seeds) on the first ``n`` held-out partial prompts;
    keys prefixed ``partial_`` / ``diversity_``."""
    from kiln.training import captions, evaluate

    prompts = captions.eval_prompts(n)
    words = captions.eval_wordings(prompts)
    seeds = evaluate.DIVERSITY_SEEDS
    t0 = time.time()
    imgs = pipe.generate([w for w in words for _ in range(seeds)], seed=0, steps=20, cfg=5.0, sampler="euler")
    groups = [imgs[i * seeds : (i + 1) * seeds] for i in range(n)]
    acc, div, lines = evaluate.partial_report(groups, prompts, "partial euler")
    tqdm.write(f"partial eval ({time.time() - t0:.0f}s, {n} prompts x {seeds} seeds):\n" + "\n".join(lines))
    if grid is not None:
        from kiln.training import sample

        sample.save_grid(imgs, grid, cols=seeds)
    row = {**{f"partial_{k}": v for k, v in acc.items()}, **{f"diversity_{k}": v for k, v in div.items()}}
    return {k.replace(" ", "_"): None if math.isnan(v) else v for k, v in row.items()}  # nan: not in JSON


V2_STEPS = 6000
V2_LR = 2e-4


def _mixed_caption_stage(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    eval_every: int,
    max_minutes: float | None,
    max_steps: int | None,
    unet_config: dict | None,
    init: Path,
    phase: str,
    object_weights: tuple[float, ...] | None = None,
    multi: int = 0,
    object_shares: tuple[float, ...] | None = None,
    fg_weight: float = 1.0,
    text_lr_scale: float = 1.0,
    grounding_weight: float = 0.0,
) -> list[float]:
    """A v-prediction fine-tune from ``init``'s EMA weights on :func:`training.data.mixed_captions` of the
    latent pool, into ``phase/``; ``object_weights`` (by a scene's number of objects) draws the pool's scenes
    in proportion instead of in epoch order. ``multi`` scenes of the many-object pool (``latents-multi.pt``)
    join the pool; ``object_shares`` draws scenes so that each number of objects gets that share of a batch;
    ``fg_weight`` above 1 weighs the loss on and around objects that much more (:func:`data.latent_object_weight`);
    ``grounding_weight`` above 0 adds the cross-attention grounding loss (:mod:`training.grounding`) that much."""
    pool = load_pool(out, ("latents.pt", MULTI_LATENTS) if multi else ("latents.pt",))
    n = pool["sizes"][0]
    scenes = data.pool_scenes(n)
    if multi:
        if pool["sizes"][1] != multi:
            raise SystemExit(
                f"{out / MULTI_LATENTS} holds {pool['sizes'][1]} scenes, not {multi}: run `train latents-multi`"
            )
        scenes += data.multi_pool_scenes(multi)
    tok = tk.load(out / "tokenizer")

    last: dict = {}

    def caption_ids(step: int, idx: torch.Tensor) -> torch.Tensor:
        texts = data.mixed_captions(seed, step, [scenes[int(i)] for i in idx])
        last.update(step=step, texts=texts)
        kw = {"padding": "max_length", "max_length": tk.MAX_LENGTH, "truncation": True, "return_tensors": "pt"}
        return tok(texts, **kw).input_ids

    def grounding(step: int, idx: torch.Tensor, kept: torch.Tensor) -> tuple:
        assert last.get("step") == step, "grounding targets asked for before this step's captions"
        return gr.targets(last["texts"], [scenes[int(i)] for i in idx], kept, tk.MAX_LENGTH)

    indices = None
    if object_shares is not None:
        counts = np.bincount([len(s.objects) - 1 for s in scenes], minlength=len(object_shares))
        object_weights = tuple(share / max(c, 1) for share, c in zip(object_shares, counts))
    if object_weights is not None:
        weights = np.array([object_weights[len(s.objects) - 1] for s in scenes])

        def indices(step: int) -> np.ndarray:
            return data.weighted_pool_indices(seed, step, batch, weights)

    return stage_unet(
        out,
        seed,
        steps,
        batch,
        lr,
        resume,
        ckpt_every,
        eval_every,
        unet_config,
        warmup=100,
        max_minutes=max_minutes,
        max_steps=max_steps,
        prediction="v_prediction",
        init=init,
        phase=phase,
        caption_ids=caption_ids,
        indices=indices,
        pool=pool,
        pixel_weight=None
        if fg_weight == 1.0
        else lambda idx, stray: data.latent_object_weight(
            [scenes[int(i)] for i in idx], fg_weight, pool["mean"].shape[-1], stray
        ),
        text_lr_scale=text_lr_scale,
        grounding=grounding if grounding_weight > 0 else None,
        grounding_weight=grounding_weight,
    )


def stage_unet_v2(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    eval_every: int,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    unet_config: dict | None = None,
) -> list[float]:
    """Fine-tune the v-phase EMA weights (the shipped v1 model) on mixed full and partial captions of the
    same latent pool (:func:`training.data.mixed_captions`), into ``unet-v2/``; resumable like the rest."""
    init = out / PHASES["v_prediction"] / "latest.pt"
    args = (out, seed, steps, batch, lr, resume, ckpt_every, eval_every, max_minutes, max_steps, unet_config)
    return _mixed_caption_stage(*args, init=init, phase="unet-v2")


V3_STEPS = 4000
V3_LR = 1e-4
# how often a pool scene is drawn, by its number of objects (the pool holds 70% one-object scenes, 20% two,
# 10% three): v2 read two-object prompts right 3% of the time (one-object prompts 75%)
V3_OBJECT_WEIGHTS = (1.0, 2.5, 1.5)


def stage_unet_v3(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    eval_every: int,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    unet_config: dict | None = None,
) -> list[float]:
    """Fine-tune the v2 EMA weights on the same mixed captions, with scenes of two and three objects drawn
    more often (:data:`V3_OBJECT_WEIGHTS`), into ``unet-v3/``; resumable like the rest."""
    args = (out, seed, steps, batch, lr, resume, ckpt_every, eval_every, max_minutes, max_steps, unet_config)
    return _mixed_caption_stage(
        *args, init=out / "unet-v2" / "latest.pt", phase="unet-v3", object_weights=V3_OBJECT_WEIGHTS
    )


V4_STEPS = 5000
V4_LR = 1e-4
MULTI_LATENTS = "latents-multi.pt"
MULTI_POOL = 30000
# a v4 batch by number of objects: v3 still read two-object prompts' count right 49% of the time
V4_OBJECT_SHARES = (0.45, 0.35, 0.2)


def stage_unet_v4(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    eval_every: int,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    unet_config: dict | None = None,
    multi: int = MULTI_POOL,
) -> list[float]:
    """Fine-tune the v3 EMA weights on the same mixed captions of the pool joined by ``multi`` fresh two- and
    three-object scenes (``train latents-multi``), drawn by :data:`V4_OBJECT_SHARES`, into ``unet-v4/``."""
    args = (out, seed, steps, batch, lr, resume, ckpt_every, eval_every, max_minutes, max_steps, unet_config)
    return _mixed_caption_stage(
        *args, init=out / "unet-v3" / "latest.pt", phase="unet-v4", multi=multi, object_shares=V4_OBJECT_SHARES
    )


V5_STEPS = 2400
V5_LR = 1e-4
# the loss on latent pixels at and next to an object (and wherever the UNet drew one the scene lacks,
# STRAY_ERROR), against the background's: v4 drew small circles and squares right about half the time (the VAE
# round trip keeps 86% and 97% of them), while the background, which it draws right every time, held most of
# the loss. Weighed on the scene's objects alone, a missing object cost five times a stray one, and the
# fine-tune drew a second object for "a square" in over half the seeds (v4: 6%); weighed only below t = 400
# or 700 it drew fewer but lost most of the shape gain (training/README.md)
V5_FG_WEIGHT = 5.0


def stage_unet_v5(
    out: Path,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    resume: bool,
    ckpt_every: float,
    eval_every: int,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    unet_config: dict | None = None,
    multi: int = MULTI_POOL,
    init_phase: str = "unet-v4",
    phase: str = "unet-v5",
    text_lr_scale: float = 1.0,
    grounding_weight: float = 0.0,
    object_shares: tuple[float, ...] = V4_OBJECT_SHARES,
) -> list[float]:
    """Fine-tune the v4 EMA weights as v4 was trained, with the loss weighed :data:`V5_FG_WEIGHT` times more on
    and around objects and wherever the UNet draws something the scene lacks, into ``unet-v5/``; the later
    rounds (:func:`stage_unet_v6` on) are this recipe from another folder (``init_phase``) into another
    (``phase``), the text encoder at ``text_lr_scale`` times the learning rate, with the cross-attention
    grounding loss ``grounding_weight`` times, a batch drawn by ``object_shares``."""
    args = (out, seed, steps, batch, lr, resume, ckpt_every, eval_every, max_minutes, max_steps, unet_config)
    return _mixed_caption_stage(
        *args,
        init=out / init_phase / "latest.pt",
        phase=phase,
        multi=multi,
        object_shares=object_shares,
        fg_weight=V5_FG_WEIGHT,
        text_lr_scale=text_lr_scale,
        grounding_weight=grounding_weight,
    )


V6_STEPS = 2400
V6_LR = 1e-4
# the text encoder at three times the UNet's learning rate: circle and square after a colour word ("a red circle")
# were the worst-separated prompts of the 0.4M-parameter text encoder (training/README.md)
V6_TEXT_LR_SCALE = 3.0


def stage_unet_v6(*args, init_phase: str = "unet-v5", phase: str = "unet-v6", **kw) -> list[float]:
    """Train the v5 EMA weights on with v5's recipe (a fresh schedule) and the text encoder at
    :data:`V6_TEXT_LR_SCALE` times the learning rate, into ``unet-v6/``; :func:`stage_unet_v7` to
    :func:`stage_unet_v12` are the same again, each from the round before (``init_phase``, ``phase``)."""
    return stage_unet_v5(*args, init_phase=init_phase, phase=phase, text_lr_scale=V6_TEXT_LR_SCALE, **kw)


def stage_unet_v7(*args, **kw) -> list[float]:
    """A second round of :func:`stage_unet_v6` (a fresh schedule from v6's EMA weights), into ``unet-v7/``: on
    the validation prompts it kept v6's accuracy and drew more varied scenes (training/README.md)."""
    return stage_unet_v6(*args, init_phase="unet-v6", phase="unet-v7", **kw)


def stage_unet_v8(*args, **kw) -> list[float]:
    """A third round of :func:`stage_unet_v6`, from v7's EMA weights, into ``unet-v8/``: on the validation
    prompts short prompts drew the stated shape more often ("a red circle" 14 -> 27 of 32 seeds)."""
    return stage_unet_v6(*args, init_phase="unet-v7", phase="unet-v8", **kw)


def stage_unet_v9(*args, **kw) -> list[float]:
    """A fourth round of :func:`stage_unet_v6`, from v8's EMA weights, into ``unet-v9/``: partial prompts' shape
    and count up again, at some cost to what guided sampling varies (the second release's first UNet)."""
    return stage_unet_v6(*args, init_phase="unet-v8", phase="unet-v9", **kw)


def stage_unet_v10(*args, **kw) -> list[float]:
    """A fifth round of :func:`stage_unet_v6`, from v9's EMA weights, into ``unet-v10/``: what prompts leave
    open varies again under plain guidance (validation 72% -> 76% of prompts)."""
    return stage_unet_v6(*args, init_phase="unet-v9", phase="unet-v10", **kw)


def stage_unet_v11(*args, **kw) -> list[float]:
    """A sixth round of :func:`stage_unet_v6`, from v10's EMA weights, into ``unet-v11/``: validation partial
    prompts' shape, count and all stated up on v10."""
    return stage_unet_v6(*args, init_phase="unet-v10", phase="unet-v11", **kw)


def stage_unet_v12(*args, **kw) -> list[float]:
    """A seventh round of :func:`stage_unet_v6`, from v11's EMA weights, into ``unet-v12/``: the shipped UNet
    (two-object prompts and what plain guidance leaves open drawn better again)."""
    return stage_unet_v6(*args, init_phase="unet-v11", phase="unet-v12", **kw)


V13_OBJECT_SHARES = (0.3, 0.45, 0.25)
# the text encoder at six times the UNet's rate: with v12's rate (3x) more two- and three-object scenes alone did
# not move two-object shape on the validation prompts; at 6x short prompts drew right more often (training/README.md)
V13_TEXT_LR_SCALE = 6.0
V14_STEPS = 1200
V14_LR = 3e-5


def stage_unet_v13(*args, **kw) -> list[float]:
    """v12's EMA weights trained on with v5's recipe, batches drawn by :data:`V13_OBJECT_SHARES` (more two- and
    three-object scenes) and the text encoder at :data:`V13_TEXT_LR_SCALE` times the rate, into ``unet-v13/``:
    short prompts better, full prompts worse (93% all five on validation) until :func:`stage_unet_v14`."""
    return stage_unet_v5(
        *args,
        init_phase="unet-v12",
        phase="unet-v13",
        text_lr_scale=V13_TEXT_LR_SCALE,
        object_shares=V13_OBJECT_SHARES,
        **kw,
    )


def stage_unet_v14(*args, **kw) -> list[float]:
    """v13's EMA weights trained on at a low rate (:data:`V14_LR`, :data:`V14_STEPS` steps) with v12's shares and
    text-encoder rate, into ``unet-v14/``: full prompts back (99%), two-object prompts drawn a little better than
    v12's (the UNet the second release ships now)."""
    return stage_unet_v6(*args, init_phase="unet-v13", phase="unet-v14", **kw)


# the grown networks of v15 (training/graft.py): a second transformer block in every cross-attention layer at 8x8
# (the down and up levels between 16x16 and 4x4; the 4x4 levels' blocks would cost 2M parameters, past the 20 MB
# the weights must stay under); the text encoder keeps its 3 layers (None): grown to 6 it added nothing on
# validation (training/README.md)
V15_TRANSFORMER_LAYERS = (1, 2, 1)
V15_TEXT_LAYERS: int | None = None
V15_GROWN = "unet-v15-grown"  # the grown v14 weights the round starts from


def stage_unet_v15(out: Path, *args, **kw) -> list[float]:
    """v14's EMA weights grown by :data:`V15_TRANSFORMER_LAYERS` and :data:`V15_TEXT_LAYERS` (layers that start as
    the identity, :func:`training.graft.grow_checkpoint`; written once to ``unet-v15-grown/``), then trained on
    with v12's recipe into ``unet-v15/``."""
    from kiln.training import graft

    grown = out / V15_GROWN / "latest.pt"
    if not grown.exists():
        graft.grow_checkpoint(out / "unet-v14" / "latest.pt", grown, V15_TEXT_LAYERS, V15_TRANSFORMER_LAYERS)
    return stage_unet_v6(out, *args, init_phase=V15_GROWN, phase="unet-v15", **kw)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = [
        "tokenizer",
        "vae",
        "latents",
        "unet",
        "unet-v",
        "unet-v2",
        "unet-v3",
        "latents-multi",
        "unet-v4",
        "unet-v5",
        "unet-v6",
        "unet-v7",
        "unet-v8",
        "unet-v9",
        "unet-v10",
        "unet-v11",
        "unet-v12",
        "unet-v13",
        "unet-v14",
        "unet-v15",
    ]
    stages += ["vae-v2", "all"]
    p.add_argument("stage", choices=stages)
    p.add_argument("--out", type=Path, default=Path("runs/shapes"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=float, default=300.0, help="seconds between checkpoints")
    p.add_argument("--vae-steps", type=int, default=1700)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae2-steps", type=int, default=VAE2_STEPS, help="steps of the v2 decoder fine-tune")
    p.add_argument("--pool", type=int, default=20000, help="training scenes whose latents are cached")
    p.add_argument("--steps", type=int, default=6000, help="UNet steps of the epsilon phase")
    p.add_argument("--v-steps", type=int, default=V_STEPS, help="steps of the v-prediction phase")
    p.add_argument("--v-lr", type=float, default=5e-4)
    p.add_argument("--v2-steps", type=int, default=V2_STEPS, help="steps of the partial-caption fine-tune")
    p.add_argument("--v2-lr", type=float, default=V2_LR)
    p.add_argument("--v3-steps", type=int, default=V3_STEPS, help="steps of the many-object fine-tune")
    p.add_argument("--v3-lr", type=float, default=V3_LR)
    p.add_argument("--v4-steps", type=int, default=V4_STEPS, help="steps of the many-object-pool fine-tune")
    p.add_argument("--v4-lr", type=float, default=V4_LR)
    p.add_argument("--v5-steps", type=int, default=V5_STEPS, help="steps of the object-weighted fine-tune")
    p.add_argument("--v5-lr", type=float, default=V5_LR)
    p.add_argument("--v6-steps", type=int, default=V6_STEPS, help="steps of the v5 fine-tune, text encoder faster")
    p.add_argument("--v6-lr", type=float, default=V6_LR, help="also v7's to v13's (more rounds of v6)")
    p.add_argument("--v14-steps", type=int, default=V14_STEPS, help="steps of the low-rate round after v13")
    p.add_argument("--v14-lr", type=float, default=V14_LR)
    p.add_argument("--multi-pool", type=int, default=MULTI_POOL, help="fresh many-object scenes for v4")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=None, help="stop the UNet stage after this long")
    p.add_argument(
        "--stop-before",
        choices=["vae", "latents", "unet", "unet-v"],
        default=None,
        help="with 'all': run the stages before this one only",
    )
    p.add_argument("--unet-config", type=json.loads, default=None, help="JSON overrides of UNET_CONFIG")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = ["tokenizer", "vae", "latents", "unet", "unet-v"]
    wanted = stages if args.stage == "all" else [args.stage]
    if args.stop_before:
        wanted = [s for s in wanted if stages.index(s) < stages.index(args.stop_before)]
    unet_config = None
    if args.unet_config:
        unet_config = {**models.UNET_CONFIG, **args.unet_config}
    if "tokenizer" in wanted and not (args.resume and (out / "tokenizer" / "vocab.json").exists()):
        stage_tokenizer(out)
    if "vae" in wanted and not (args.resume and (out / "vae" / "final.pt").exists()):
        stage_vae(out, args.seed, args.vae_steps, args.vae_batch, 1e-3, args.resume, args.ckpt_every)
    if "latents" in wanted and not (args.resume and (out / "latents.pt").exists()):
        stage_latents(out, args.pool)
    v_ckpt = out / PHASES["v_prediction"] / "latest.pt"
    if "unet" in wanted and not (args.stage == "all" and args.resume and v_ckpt.exists()):
        stage_unet(
            out,
            args.seed,
            args.steps,
            args.batch,
            args.lr,
            args.resume,
            args.ckpt_every,
            args.eval_every,
            unet_config,
            max_minutes=args.max_minutes,
        )
    if "unet-v" in wanted:
        stage_unet(
            out,
            args.seed + 1,
            args.v_steps,
            args.batch,
            args.v_lr,
            args.resume,
            args.ckpt_every,
            args.eval_every,
            unet_config,
            warmup=200,
            max_minutes=args.max_minutes,
            prediction="v_prediction",
            init=out / PHASES["epsilon"] / "latest.pt",
        )
    if args.stage == "vae-v2" and not (args.resume and (out / "vae-v2" / "final.pt").exists()):
        stage_vae_v2(out, args.seed + 3, args.vae2_steps, args.vae_batch, VAE2_LR, args.resume, args.ckpt_every)
    if args.stage == "latents-multi" and not (args.resume and (out / MULTI_LATENTS).exists()):
        stage_latents(out, args.multi_pool, name=MULTI_LATENTS, multi=True)
    fine_tunes = {  # stage -> (function, seed offset, steps, lr, extra keywords)
        "unet-v2": (stage_unet_v2, 2, args.v2_steps, args.v2_lr, {}),
        "unet-v3": (stage_unet_v3, 4, args.v3_steps, args.v3_lr, {}),
        "unet-v4": (stage_unet_v4, 5, args.v4_steps, args.v4_lr, {"multi": args.multi_pool}),
        "unet-v5": (stage_unet_v5, 6, args.v5_steps, args.v5_lr, {"multi": args.multi_pool}),
        "unet-v6": (stage_unet_v6, 7, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v7": (stage_unet_v7, 8, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v8": (stage_unet_v8, 9, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v9": (stage_unet_v9, 10, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        # v10 to v12 were first trained as experiments beside others, with seeds 21 to 23
        "unet-v10": (stage_unet_v10, 21, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v11": (stage_unet_v11, 22, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v12": (stage_unet_v12, 23, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v13": (stage_unet_v13, 25, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
        "unet-v14": (stage_unet_v14, 26, args.v14_steps, args.v14_lr, {"multi": args.multi_pool}),
        "unet-v15": (stage_unet_v15, 27, args.v6_steps, args.v6_lr, {"multi": args.multi_pool}),
    }
    if args.stage in fine_tunes:
        fn, offset, steps, lr, extra = fine_tunes[args.stage]
        fn(
            out,
            args.seed + offset,
            steps,
            args.batch,
            lr,
            args.resume,
            args.ckpt_every,
            args.eval_every,
            max_minutes=args.max_minutes,
            **extra,
        )


if __name__ == "__main__":
    main()
