"""The edge-map ControlNet: ``ControlNetModel.from_unet`` of the base UNet, trained on scene outlines.

The control image is :func:`training.scenes.edge_map` (white 1-px outlines on black, 64x64); the
conditioning embedding downsamples 4x (three stages, two strides) to the 16x16 latent grid. Base UNet and
text encoder stay frozen. Placement is measured by the IoU between the generated object's footprint and
the footprint the edge map outlines (:func:`placement_iou`).

    python -m kiln.training.controlnet --run runs/shapes --steps 800 \
        --out models/controlnet/kiln-shapes-edges.safetensors

The file is diffusers' ControlNetModel state dict (the layout ComfyUI also loads as a "diffusers"
ControlNet), with ``kiln.controlnet_config`` (the diffusers config JSON) in its metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kiln.training import data, evaluate as ev, models, sample, scenes as sc, tokenizer as tk, train

COND_CHANNELS = (16, 32, 64)


def control_tensor(scenes: list[sc.Scene]) -> torch.Tensor:
    """Edge maps as ``[B, 3, 64, 64]`` in 0..1 (ComfyUI's IMAGE range)."""
    return torch.from_numpy(np.stack([sc.edge_map(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255


OFF_GRID = 8.0  # pixels: how far control scenes move objects off the grid the base model was trained on


def off_grid(scene: sc.Scene, rng: np.random.Generator, shift: float = OFF_GRID) -> sc.Scene:
    """The scene with every object moved up to ``shift`` px and resized to 10-26 px (inside the frame),
    its position and size words re-read from the new geometry. The base model draws objects near the nine
    cell centres at two sizes; the ControlNet must follow the edge map wherever it puts them."""
    from kiln.training import evaluate as ev

    objs = []
    for o in scene.objects:
        extent = float(rng.uniform(10, 26))
        half = extent / 2 + 1
        cx = float(np.clip(o.cx + rng.uniform(-shift, shift), half, sc.SIZE - half))
        cy = float(np.clip(o.cy + rng.uniform(-shift, shift), half, sc.SIZE - half))
        objs.append(
            sc.Obj(o.shape, o.color, "large" if extent >= 18 else "small", ev.grid_position(cx, cy), cx, cy, extent)
        )
    return sc.Scene(tuple(objs), scene.background)


def control_pool(run: Path, n: int, vae) -> dict:
    path = run / f"latents-control-offgrid-{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    tok = tk.load(run / "tokenizer")
    rng = np.random.default_rng(20)
    scenes = [off_grid(sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, 20_000_000 + i)), rng) for i in range(n)]
    means = []
    with torch.no_grad():
        for i in range(0, n, 128):
            means.append(vae.encode(data.to_tensor([sc.render(s) for s in scenes[i : i + 128]])).latent_dist.mean)
    ids = tok(
        [sc.caption(s) for s in scenes],
        padding="max_length",
        max_length=tk.MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pool = {"mean": torch.cat(means), "ids": ids, "control": (control_tensor(scenes) * 255).to(torch.uint8)}
    torch.save(pool, path)
    return pool


def build(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)


def train_controlnet(
    run: Path, out: Path, steps: int, batch: int, lr: float, seed: int, pool_size: int, phase: str | None = None
) -> None:
    pipe = sample.Pipeline.from_run(run, phase=phase)  # phase None: the v1 weights (unet-v)
    unet, te, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    torch.manual_seed(seed)
    cn = build(unet).train()
    pool = control_pool(run, pool_size, vae)
    scale = vae.config.scaling_factor
    opt = torch.optim.AdamW(cn.parameters(), lr=lr, weight_decay=0.0)
    abar = models.build_scheduler().alphas_cumprod.float()
    prediction = pipe.scheduler_config["prediction_type"]
    n = pool["mean"].shape[0]
    with torch.no_grad():
        cond_all = te(pool["ids"])[0]
    print(f"controlnet: {models.n_params(cn) / 1e6:.2f}M params, {steps} steps of {batch}")
    t0 = time.time()
    for step in tqdm(range(steps), desc="controlnet", mininterval=10):
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, lr, 50, steps)
        idx = torch.from_numpy(data.pool_indices(seed, step, batch, n))
        g = train._gen(seed, step, 4)
        z0 = pool["mean"][idx] * scale
        t = train.emphasise_noisy_end(torch.randint(0, 1000, (batch,), generator=g), g)  # placement is decided there
        noise = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ctrl = pool["control"][idx].float() / 255
        text = cond_all[idx]
        down, mid = cn(xt, t, text, controlnet_cond=ctrl, return_dict=False)
        pred = unet(xt, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, train.diffusion_target(z0, noise, abar[t], prediction))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"controlnet: {steps * batch / (time.time() - t0):.1f} samples/s, final loss {loss.item():.4f}")
    save(cn, out)


def save(cn, out: Path) -> None:
    cfg = {k: v for k, v in dict(cn.config).items() if not k.startswith("_")}
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in cn.state_dict().items()}  # fp16 on disk
    save_file(
        sd,
        str(out),
        metadata={
            "kiln.format": "1",
            "kiln.model_family": "kiln-shapes",
            "kiln.controlnet_config": json.dumps(cfg, sort_keys=True),
        },
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def load(path: Path):
    from diffusers import ControlNetModel

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["kiln.controlnet_config"])
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    cn = ControlNetModel.from_config(cfg)
    cn.load_state_dict(sd)
    return cn.eval()


@torch.no_grad()
def generate(
    pipe: sample.Pipeline,
    cn,
    prompts: list[str],
    control: torch.Tensor,
    seed: int = 0,
    steps: int = 20,
    cfg: float = 5.0,
    strength: float = 1.0,
) -> list[np.ndarray]:
    sched = sample.make_scheduler("euler", pipe.scheduler_config)
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts([""] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 16, 16, generator=g) * sched.init_noise_sigma
    ctrl2 = torch.cat([control, control])
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        text = torch.cat([uncond, cond])
        down, mid = cn(xin, t, text, controlnet_cond=ctrl2, conditioning_scale=strength, return_dict=False)
        out = pipe.unet(xin, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        eu, ec = out.chunk(2)
        x = sched.step(eu + cfg * (ec - eu), t, x).prev_sample
    return data.to_images(pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample)


def placement_iou(img: np.ndarray, target: sc.Obj) -> float:
    fg = ev.object_footprint(img)
    want = sc.object_mask(target)
    union = (fg | want).sum()
    return float((fg & want).sum() / union) if union else 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/shapes"))
    p.add_argument("--out", type=Path, default=Path("models/controlnet/kiln-shapes-edges.safetensors"))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--phase", default=None, help="base UNet checkpoint folder: unet-v (default) or unet-v2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_controlnet(args.run, args.out, args.steps, args.batch, args.lr, args.seed, args.pool, phase=args.phase)


if __name__ == "__main__":
    main()
