"""From a UNet and CONDITIONING to a denoiser ``D(x, sigma) -> x0`` with classifier-free guidance,
ControlNet residuals and inpainting masks; and the KSampler driver that runs a sampler over it.

CONDITIONING is ComfyUI's list of ``[embedding, options]``. Options used here: ``pooled_output`` (SDXL),
``control`` (a :class:`Control` chain from ControlNetApply*). Every entry of the positive and negative
lists is evaluated in one batched UNet call per step; entries of one list are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .handles import ControlNetHandle, ModelHandle
from .samplers import SAMPLERS


@dataclass(frozen=True, eq=False)
class Control:
    """One applied ControlNet; ``previous`` chains several on the same conditioning."""

    net: ControlNetHandle
    hint: torch.Tensor  # IMAGE [B, H, W, 3]
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: Control | None = None

    def chain(self) -> list[Control]:
        out, c = [], self
        while c is not None:
            out.append(c)
            c = c.previous
        return out[::-1]

    def __kiln_fingerprint__(self) -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for c in self.chain():
            h.update(c.net.__kiln_fingerprint__())
            h.update(c.hint.detach().cpu().contiguous().numpy().tobytes())
            h.update(repr((tuple(c.hint.shape), c.strength, c.start_percent, c.end_percent)).encode())
        return h.digest()


def _repeat_to(emb: torch.Tensor, length: int) -> torch.Tensor:
    reps = length // emb.shape[1]
    return emb.repeat(1, reps, 1) if reps > 1 else emb


def _batch_to(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    if n % t.shape[0] == 0:
        return t.repeat(n // t.shape[0], *([1] * (t.ndim - 1)))
    return t[:1].repeat(n, *([1] * (t.ndim - 1)))


class Guider:
    """The guided denoiser for one KSampler run."""

    def __init__(
        self,
        model: ModelHandle,
        unet: torch.nn.Module,
        positive: list,
        negative: list,
        cfg: float,
        latent_shape: tuple[int, ...],
    ):
        self.model = model
        self.unet = unet
        self.ms = model.sampling
        self.cfg = float(cfg)
        self.device, self.dtype = model.device, model.dtype
        self.batch = latent_shape[0]
        f = model.preview_vae.downscale if model.preview_vae is not None else 8
        self.pixel_hw = (latent_shape[2] * f, latent_shape[3] * f)
        pos, neg = list(positive), list(negative)
        self.skip_uncond = math.isclose(self.cfg, 1.0)
        self.units = [(e, o, True) for e, o in pos] + ([] if self.skip_uncond else [(e, o, False) for e, o in neg])
        self.n_pos = len(pos)
        length = math.lcm(*[e.shape[1] for e, _, _ in self.units])
        b = self.batch
        self.context = torch.cat([_batch_to(_repeat_to(e, length), b) for e, _, _ in self.units]).to(
            self.device, self.dtype
        )
        self.added = self._sdxl_kwargs(b) if model.family == "sdxl" else None
        self.controls = [o.get("control") for _, o, _ in self.units]
        self._hints: dict[int, torch.Tensor] = {}

    def _sdxl_kwargs(self, b: int) -> dict:
        pooled, ids = [], []
        h, w = self.pixel_hw
        for _, o, _ in self.units:
            p = o.get("pooled_output")
            if p is None:
                raise ValueError("SDXL conditioning lacks pooled_output; encode the prompt with this model's CLIP")
            pooled.append(_batch_to(p, b))
            ids.append(
                torch.tensor(
                    [
                        [
                            o.get("height", h),
                            o.get("width", w),
                            o.get("crop_h", 0),
                            o.get("crop_w", 0),
                            o.get("target_height", h),
                            o.get("target_width", w),
                        ]
                    ],
                    dtype=torch.float32,
                ).repeat(b, 1)
            )
        return {
            "text_embeds": torch.cat(pooled).to(self.device, self.dtype),
            "time_ids": torch.cat(ids).to(self.device, self.dtype),
        }

    def _hint(self, c: Control) -> torch.Tensor:
        key = id(c)
        if key not in self._hints:
            img = c.hint.movedim(-1, 1).float()
            img = F.interpolate(img, size=self.pixel_hw, mode="bilinear", align_corners=False)
            self._hints[key] = _batch_to(img, self.batch).to(self.device, self.dtype)
        return self._hints[key]

    def _control_residuals(self, xin: torch.Tensor, t: torch.Tensor, sigma: float):
        if not any(self.controls):
            return None, None
        b = self.batch
        per_unit = []
        for u, control in enumerate(self.controls):
            sl = slice(u * b, (u + 1) * b)
            down, mid = None, None
            for c in control.chain() if control is not None else []:
                hi, lo = self.ms.percent_to_sigma(c.start_percent), self.ms.percent_to_sigma(c.end_percent)
                if not (lo <= sigma <= hi) or c.strength == 0:
                    continue
                d, m = c.net.model(
                    xin[sl],
                    t[sl],
                    encoder_hidden_states=self.context[sl],
                    controlnet_cond=self._hint(c),
                    conditioning_scale=float(c.strength),
                    return_dict=False,
                )
                down = list(d) if down is None else [a + x for a, x in zip(down, d)]
                mid = m if mid is None else mid + m
            per_unit.append((down, mid))
        template = next((p for p in per_unit if p[0] is not None), None)
        if template is None:
            return None, None
        down_all = []
        for k in range(len(template[0])):
            down_all.append(
                torch.cat([p[0][k] if p[0] is not None else torch.zeros_like(template[0][k]) for p in per_unit])
            )
        mid_all = torch.cat([p[1] if p[1] is not None else torch.zeros_like(template[1]) for p in per_unit])
        return down_all, mid_all

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        n = len(self.units)
        xin = x.to(self.device, self.dtype).repeat(n, 1, 1, 1)
        c_in = 1.0 / math.sqrt(s * s + 1.0)
        t = self.ms.timestep(torch.tensor(s)).to(self.device).expand(xin.shape[0])
        scaled = xin * c_in
        down, mid = self._control_residuals(scaled, t, s)
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.context, "return_dict": False}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        if down is not None:
            kwargs["down_block_additional_residuals"] = down
            kwargs["mid_block_additional_residual"] = mid
        out = self.unet(scaled, t.to(self.dtype), **kwargs)[0].float()
        xf = xin.float()
        if self.ms.prediction_type == "v_prediction":
            x0 = xf / (s * s + 1) - out * (s / math.sqrt(s * s + 1))
        else:
            x0 = xf - out * s
        b = self.batch
        parts = x0.split(b)
        cond = torch.stack(parts[: self.n_pos]).mean(0)
        if self.skip_uncond:
            return cond.to(x.device)
        uncond = torch.stack(parts[self.n_pos :]).mean(0)
        return (uncond + self.cfg * (cond - uncond)).to(x.device)


def masked_denoiser(denoise: Callable, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> Callable:
    """Inpainting: outside the mask, the input latent (noised to the current sigma) is kept every step."""

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        keep = latent + noise * float(sigma)
        x = x * mask + keep * (1 - mask)
        return denoise(x, sigma) * mask + latent * (1 - mask)

    return fn


def prepare_mask(noise_mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    m = noise_mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    m = F.interpolate(m, size=shape[2:], mode="bilinear", align_corners=False)
    return _batch_to(m, shape[0]).clamp(0, 1)


def make_noise(seed: int, shape: tuple[int, ...], batch_index: list[int] | None = None) -> torch.Tensor:
    """Initial noise from the seed, on the CPU, so a seed gives the same image on any device.

    With ``batch_index`` (from a latent batch split), item i gets the noise of position batch_index[i].
    """
    g = torch.Generator("cpu").manual_seed(int(seed))
    if not batch_index:
        return torch.randn(shape, generator=g, dtype=torch.float32)
    full = torch.randn((max(batch_index) + 1, *shape[1:]), generator=g, dtype=torch.float32)
    return full[list(batch_index)]


def run_sampler(
    name: str,
    denoise: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int,
    callback: Callable[[int, torch.Tensor], None],
) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed((int(seed) + 0x9E3779B9) % 2**64)
    shape = x.shape

    def noise() -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32).to(x.device)

    with torch.inference_mode():
        return SAMPLERS[name](denoise, x, sigmas, noise, callback)
