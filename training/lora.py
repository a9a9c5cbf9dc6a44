"""The outline-style LoRA: trained with peft on top of the base UNet, exported kohya-style.

The data are the base model's own scenes and captions, drawn as outlines (``scenes.render(style=
"outline")``), so the LoRA changes style and nothing else; its effect is measured by
:func:`training.evaluate.hollowness` (filled ~0, outline ~0.5+).

    python -m kiln.training.lora --run runs/shapes --steps 600 --out models/loras/kiln-outline.safetensors

Export format (what A1111 / ComfyUI / kohya's sd-scripts write for SD1.x): for every adapted UNet module
``lora_unet_<diffusers module path with '.' -> '_'>.lora_down.weight`` ``[r, in(, 1, 1)]``,
``.lora_up.weight`` ``[out, r(, 1, 1)]`` and ``.alpha`` (scalar); the update is
``up @ down * alpha / r``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kiln.training import data, models, sample, scenes as sc, tokenizer as tk, train

# Attention and transformer projections (what SD LoRAs usually adapt) plus every ResNet convolution (LoCon):
# the 16x16 level, where an outline is drawn, has no attention, so an attention-only LoRA barely moved it.
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
]


def outline_pool(run: Path, n: int, vae) -> dict:
    path = run / f"latents-outline-{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    tok = tk.load(run / "tokenizer")
    scenes = [sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, OUTLINE_OFFSET + i)) for i in range(n)]
    means = []
    with torch.no_grad():
        for i in range(0, n, 128):
            x = data.to_tensor([sc.render(s, "outline") for s in scenes[i : i + 128]])
            means.append(vae.encode(x).latent_dist.mean)
    ids = tok(
        [sc.caption(s) for s in scenes],
        padding="max_length",
        max_length=tk.MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pool = {"mean": torch.cat(means), "ids": ids}
    torch.save(pool, path)
    return pool


def _peft_layers(unet):
    """(kohya name, module) for each peft LoRA layer of ``unet``: the base UNet's diffusers module path."""
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            yield "lora_unet_" + name.replace("base_model.model.", "").replace(".", "_"), module


def kohya_state_dict(unet, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """peft LoRA layers of ``unet`` -> kohya names (the base UNet's diffusers module paths)."""
    out = {}
    for base, module in _peft_layers(unet):
        out[f"{base}.lora_down.weight"] = module.lora_A["default"].weight.detach().clone().contiguous()
        out[f"{base}.lora_up.weight"] = module.lora_B["default"].weight.detach().clone().contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def load_kohya_into_peft(unet, lora: dict[str, torch.Tensor]) -> list[str]:
    """Set a peft-injected ``unet``'s LoRA layers from a kohya state dict of the same targets and rank (the
    inverse of :func:`kohya_state_dict`). peft's layers scale by 1 (alpha = rank), so a file written with
    another alpha has ``alpha / rank`` folded into its up weights: the loaded layers make the same update.
    Layers the file lacks keep peft's fresh start (a zero up weight: no update), as a grown UNet's new blocks
    (training/graft.py) do; returns their names. Every module of the file must be one of the UNet's layers."""
    done, fresh = 0, []
    for base, module in _peft_layers(unet):
        if f"{base}.lora_down.weight" not in lora:
            fresh.append(base)
            continue
        down, up = lora[f"{base}.lora_down.weight"], lora[f"{base}.lora_up.weight"]
        if down.shape != module.lora_A["default"].weight.shape:
            raise ValueError(f"{base}: the LoRA to start from must have this rank ({module.r['default']})")
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(down)
            module.lora_B["default"].weight.copy_(up * (float(lora[f"{base}.alpha"]) / down.shape[0]))
        done += 1
    if done * 3 != len(lora):
        raise ValueError(f"the LoRA to start from has {len(lora) // 3} modules, {done} of them this UNet's targets")
    return fresh


def apply_kohya(unet, lora: dict[str, torch.Tensor], strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Merge a kohya LoRA into ``unet`` in place; returns the original weights for an exact unload."""
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()}
    saved = {}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        m = modules[base]
        down, up = lora[key].float(), lora[f"{base}.lora_up.weight"].float()
        r = down.shape[0]
        scale = float(lora.get(f"{base}.alpha", torch.tensor(float(r)))) / r
        delta = (up.flatten(1) @ down.flatten(1)).view(m.weight.shape) * scale * strength
        saved[base] = m.weight.detach().clone()
        with torch.no_grad():
            m.weight += delta.to(m.weight.dtype)
    return saved


def unapply(unet, saved: dict[str, torch.Tensor]) -> None:
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()}
    with torch.no_grad():
        for base, w in saved.items():
            modules[base].weight.copy_(w)


# The pixel term: the latent loss alone learns latents that decode to half-filled shapes (the outline's thin
# strokes are a small part of the latent error), so part of each batch is also judged after decoding, against
# the drawn outline, with the stroke and the background inside it weighted up. Only where the UNet's clean-
# picture estimate means something (t below PIXEL_T_MAX), weighted by how much signal is left.
PIXEL_BATCH = 8
PIXEL_T_MAX = 600
OUTLINE_OFFSET = 10_000_000  # the outline pool's scenes: TRAIN_STREAM seeds from here


def outline_weight(foot: torch.Tensor, target: torch.Tensor, interior_weight: float = 1.0) -> torch.Tensor:
    """The pixel term's weight ``[B, 1, H, W]``: ``train.fg_weight`` over each object's whole footprint (``foot``,
    the scene drawn filled), times ``interior_weight`` again on the hollow inside the stroke (footprint pixels
    that the drawn outline ``target`` leaves background), where a filled shape is wrong."""
    w = train.fg_weight(foot)
    if interior_weight != 1.0:
        hollow = (w > 1.0) & (train.fg_weight(target) <= 1.0)
        w = w * (1.0 + (interior_weight - 1.0) * hollow.float())
    return w


def pixel_loss(
    vae, scale: float, xt, pred, t, abar_t, prediction: str, idx, interior_weight: float = 1.0
) -> torch.Tensor:
    keep = torch.nonzero(t[:PIXEL_BATCH] < PIXEL_T_MAX).flatten()
    if keep.numel() == 0:
        return pred.sum() * 0.0
    x0 = train.predicted_x0(xt[keep], pred[keep], abar_t[keep], prediction)
    img = vae.decode(x0 / scale).sample
    scenes = [sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, OUTLINE_OFFSET + int(i))) for i in idx[keep]]
    target = data.to_tensor([sc.render(s, "outline") for s in scenes])
    # the whole footprint (stroke and the hollow inside it) counts, as in hollowness
    foot = data.to_tensor([sc.render(s, "filled") for s in scenes])
    w = outline_weight(foot, target, interior_weight)
    err = ((img - target).abs() * w).mean(dim=(1, 2, 3))
    return (err * abar_t[keep].sqrt()).mean()


def train_lora(
    run: Path,
    out: Path,
    steps: int,
    batch: int,
    lr: float,
    rank: int,
    seed: int,
    pool_size: int,
    phase: str | None = None,
    pixel_weight: float = 0.0,
    decoder: str | None = None,
    init: Path | None = None,
    interior_weight: float = 1.0,
    alpha_scale: float = 1.0,
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    pipe = sample.Pipeline.from_run(run, phase=phase, decoder=decoder)  # phase None: the v1 weights (unet-v)
    unet, te, vae = pipe.unet, pipe.text_encoder, pipe.vae
    scale = vae.config.scaling_factor
    pool = outline_pool(run, pool_size, vae)
    for p in list(unet.parameters()) + list(te.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    torch.manual_seed(seed)
    unet = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True), unet
    )
    if init is not None:  # carry on from a trained LoRA (kohya names), e.g. to suit it to a newer base UNet
        fresh = load_kohya_into_peft(unet, load_file(str(init)))
        if fresh:
            print(f"lora: {len(fresh)} layers not in {init} (new in this UNet) start fresh")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = models.build_scheduler()
    abar = sched.alphas_cumprod.float()
    prediction = pipe.scheduler_config["prediction_type"]
    n = pool["mean"].shape[0]
    with torch.no_grad():
        cond_all = te(pool["ids"])[0]
    print(f"lora: rank {rank}, {sum(p.numel() for p in params) / 1e3:.0f}k params, {steps} steps of {batch}")
    t0 = time.time()
    unet.train()
    for step in tqdm(range(steps), desc="lora", mininterval=10):
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, lr, 20, steps)
        idx = torch.from_numpy(data.pool_indices(seed, step, batch, n))
        g = train._gen(seed, step, 3)
        z0 = pool["mean"][idx] * scale
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, cond_all[idx]).sample
        loss = F.mse_loss(pred, train.diffusion_target(z0, noise, abar[t], prediction))
        if pixel_weight > 0:
            loss = loss + pixel_weight * pixel_loss(vae, scale, xt, pred, t, abar[t], prediction, idx, interior_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"lora: {steps * batch / (time.time() - t0):.1f} samples/s, final loss {loss.item():.4f}")
    alpha = rank * alpha_scale  # strength 1 applies alpha_scale times the trained update
    sd = kohya_state_dict(unet, rank, alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        sd,
        str(out),
        metadata={
            "kiln.model_family": "kiln-shapes",
            "kiln.lora_style": "outline",
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "kiln.lora_targets": json.dumps(TARGETS),
        },
    )
    print(f"wrote {out} ({len(sd) // 3} modules)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/shapes"))
    p.add_argument("--out", type=Path, default=Path("models/loras/kiln-outline.safetensors"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pixel-weight", type=float, default=0.0, help="weight of the decoded-outline term")
    p.add_argument("--phase", default=None, help="base UNet checkpoint folder: unet-v (default) or unet-v2 to v4")
    p.add_argument("--decoder", default=None, help="the decoder the pixel term decodes with (train.load_vae)")
    p.add_argument(
        "--interior-weight", type=float, default=1.0, help="pixel term: weight of the hollow inside the stroke"
    )
    p.add_argument(
        "--alpha-scale",
        type=float,
        default=1.0,
        help="write alpha = rank x this: strength 1 then applies this many times the trained update",
    )
    p.add_argument("--init", type=Path, default=None, help="a LoRA file (same rank) to carry on training from")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_lora(
        args.run,
        args.out,
        args.steps,
        args.batch,
        args.lr,
        args.rank,
        args.seed,
        args.pool,
        phase=args.phase,
        pixel_weight=args.pixel_weight,
        decoder=args.decoder,
        init=args.init,
        interior_weight=args.interior_weight,
        alpha_scale=args.alpha_scale,
    )


if __name__ == "__main__":
    main()
