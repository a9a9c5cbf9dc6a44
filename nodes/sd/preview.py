"""Fast latent previews: a linear map from latent channels to RGB, fitted once per VAE.

The map is the least-squares fit of a few decoded random latents (downsampled to latent resolution),
so it works for any VAE, including the project's own, with no table of magic numbers.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_lock = threading.Lock()


def _fit(vae_handle) -> tuple[torch.Tensor, torch.Tensor]:
    vae = vae_handle.vae
    c = vae_handle.latent_channels
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, c, 8, 8, generator=g)
    with torch.inference_mode():
        img = vae.decode(
            (z / vae_handle.scaling_factor + vae_handle.shift_factor).to(vae_handle.device, vae_handle.dtype)
        ).sample
    img = ((img.float().cpu() + 1) / 2).clamp(0, 1)
    small = F.adaptive_avg_pool2d(img, (8, 8))
    a = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(4 * 64, 1)], dim=1)
    b = small.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(a, b).solution
    return sol[:c], sol[c]


def projection(vae_handle) -> tuple[torch.Tensor, torch.Tensor] | None:
    if vae_handle is None:
        return None
    with _lock:
        if vae_handle._rgb is None:
            vae_handle._rgb = _fit(vae_handle)
        return vae_handle._rgb


def latent_to_image(x0: torch.Tensor, vae_handle) -> torch.Tensor:
    """IMAGE ``[1, h, w, 3]`` from the first latent of a batch."""
    lat = x0[:1].float().cpu().permute(0, 2, 3, 1)
    proj = projection(vae_handle)
    if proj is None or proj[0].shape[0] != lat.shape[-1]:
        rgb = (lat[..., :3] * 0.5 + 0.5) if lat.shape[-1] >= 3 else lat[..., :1].repeat(1, 1, 1, 3)
    else:
        rgb = lat @ proj[0] + proj[1]
    return rgb.clamp(0, 1)
