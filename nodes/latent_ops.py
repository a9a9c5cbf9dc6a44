"""Latent arithmetic, compositing and transforms with ComfyUI's names, inputs and behaviour.

Where ComfyUI quietly reconciles two latents (resizing the second to the first, repeating a batch of one)
Kiln does the same; where ComfyUI would stop with a raw tensor error (latents with different channel counts,
batches that cannot be matched) Kiln raises a NodeError that names the input and the fix. A latent's
``noise_mask`` follows the flips, rotations and crops applied to its samples.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from kiln import engine
from kiln.engine import MAX_RESOLUTION, Boolean, Combo, Float, Int, NodeError, Socket
from kiln.nodes.common import check_mask
from kiln.nodes.latent import check_latent, resize_latent

LATENT = Socket("LATENT")


def repeat_to_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI's batch matching: repeat a short batch (cyclically), cut a long one."""
    if t.shape[0] > n:
        return t[:n]
    if t.shape[0] < n:
        reps = math.ceil(n / t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:n]
    return t


def check_channels(a: torch.Tensor, b: torch.Tensor, input_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise NodeError(
            f"{input_name} has {b.shape[1]} channels, the other latent {a.shape[1]}",
            input_name=input_name,
            hint="combine latents made by the same kind of model (same VAE)",
        )


def match_to(target: torch.Tensor, x: torch.Tensor, input_name: str, batch: bool = True) -> torch.Tensor:
    """``x`` reshaped like ``target``: resized (bilinear, centre crop) to its size, and repeated or cut to its
    batch size when ``batch``."""
    check_channels(target, x, input_name)
    if x.shape[2:] != target.shape[2:]:
        x = resize_latent(x, target.shape[2], target.shape[3], "bilinear", "center")
    return repeat_to_batch(x, target.shape[0]) if batch else x


def check_batch(n: int, m: int, input_name: str, other: str) -> None:
    """Batches combine when equal or when one holds a single latent (it is used for every item)."""
    if n != m and 1 not in (n, m):
        raise NodeError(
            f"{input_name} holds {m} latents but {other} holds {n}",
            input_name=input_name,
            hint=f"give one latent or {n} (Latent From Batch / Repeat Latent Batch adjust a batch)",
        )


class LatentAdd(engine.Node):
    """samples1 + samples2 (samples2 is resized and repeated to match samples1)."""

    category = "latent/advanced"
    outputs = ("LATENT",)

    def run(self, samples1: Annotated[Any, LATENT], samples2: Annotated[Any, LATENT]):
        s1 = check_latent(samples1, "samples1")
        s2 = match_to(s1["samples"], check_latent(samples2, "samples2")["samples"], "samples2")
        return {**s1, "samples": s1["samples"] + s2}


class LatentSubtract(engine.Node):
    """samples1 - samples2 (samples2 is resized and repeated to match samples1)."""

    category = "latent/advanced"
    outputs = ("LATENT",)

    def run(self, samples1: Annotated[Any, LATENT], samples2: Annotated[Any, LATENT]):
        s1 = check_latent(samples1, "samples1")
        s2 = match_to(s1["samples"], check_latent(samples2, "samples2")["samples"], "samples2")
        return {**s1, "samples": s1["samples"] - s2}


class LatentMultiply(engine.Node):
    """samples * multiplier."""

    category = "latent/advanced"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        multiplier: Annotated[float, Float(min=-10.0, max=10.0, step=0.01)] = 1.0,
    ):
        s = check_latent(samples)
        return {**s, "samples": s["samples"] * multiplier}


class LatentInterpolate(engine.Node):
    """Blends two latents per position: directions (across channels) and lengths are interpolated separately,
    so the result keeps the magnitude a plain average would lose. ratio 1 gives samples1."""

    category = "latent/advanced"
    outputs = ("LATENT",)

    def run(
        self,
        samples1: Annotated[Any, LATENT],
        samples2: Annotated[Any, LATENT],
        ratio: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0,
    ):
        s = check_latent(samples1, "samples1")
        a = s["samples"]
        b = match_to(a, check_latent(samples2, "samples2")["samples"], "samples2")
        la = torch.linalg.vector_norm(a, dim=1, keepdim=True)
        lb = torch.linalg.vector_norm(b, dim=1, keepdim=True)
        mixed = torch.nan_to_num(a / la) * ratio + torch.nan_to_num(b / lb) * (1.0 - ratio)
        direction = torch.nan_to_num(mixed / torch.linalg.vector_norm(mixed, dim=1, keepdim=True))
        return {**s, "samples": direction * (la * ratio + lb * (1.0 - ratio))}


class LatentBlend(engine.Node):
    """samples1 * blend_factor + samples2 * (1 - blend_factor); samples2 is resized (bicubic, centre crop) to
    samples1's size when they differ."""

    display_name = "Latent Blend"
    category = "_for_testing"
    outputs = ("LATENT",)

    def run(
        self,
        samples1: Annotated[Any, LATENT],
        samples2: Annotated[Any, LATENT],
        blend_factor: Annotated[float, Float(min=0, max=1, step=0.01)] = 0.5,
    ):
        s = check_latent(samples1, "samples1")
        a = s["samples"]
        b = check_latent(samples2, "samples2")["samples"]
        check_channels(a, b, "samples2")
        check_batch(a.shape[0], b.shape[0], "samples2", "samples1")
        if a.shape[2:] != b.shape[2:]:
            b = resize_latent(b, a.shape[2], a.shape[3], "bicubic", "center")
        return {**s, "samples": a * blend_factor + b * (1 - blend_factor)}


def _feather_mask(h: int, w: int, feather: int, edges: tuple[bool, bool, bool, bool]) -> torch.Tensor:
    """Weights ``[1, 1, h, w]``: 1 inside, ramping down to 1/feather over ``feather`` rows/columns on each
    edge flagged in ``edges`` (top, bottom, left, right)."""
    mask = torch.ones((1, 1, h, w))
    top, bottom, left, right = edges
    for t in range(feather):
        a = (t + 1) / feather
        if top and t < h:
            mask[:, :, t] *= a
        if bottom and t < h:
            mask[:, :, h - 1 - t] *= a
        if left and t < w:
            mask[:, :, :, t] *= a
        if right and t < w:
            mask[:, :, :, w - 1 - t] *= a
    return mask


class LatentComposite(engine.Node):
    """Pastes samples_from into samples_to with its top-left corner at (x, y) pixels (rounded down to the
    latent grid); whatever falls outside samples_to is cut off. feather (pixels) fades the pasted edges that
    lie inside samples_to."""

    display_name = "Latent Composite"
    category = "latent"
    outputs = ("LATENT",)

    def run(
        self,
        samples_to: Annotated[Any, Socket("LATENT")],
        samples_from: Annotated[Any, Socket("LATENT")],
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        feather: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
    ):
        s = check_latent(samples_to, "samples_to")
        dst = s["samples"]
        src = check_latent(samples_from, "samples_from")["samples"]
        check_channels(dst, src, "samples_from")
        if src.shape[0] not in (1, dst.shape[0]):
            raise NodeError(
                f"samples_from holds {src.shape[0]} latents, samples_to {dst.shape[0]}",
                input_name="samples_from",
                hint=f"give one latent or {dst.shape[0]}",
            )
        H, W = dst.shape[2:]
        lx, ly, f = min(max(x, 0) // 8, W), min(max(y, 0) // 8, H), max(feather, 0) // 8
        src = src[:, :, : H - ly, : W - lx]
        h, w = src.shape[2:]
        out = dst.clone()
        if h and w:
            region = out[:, :, ly : ly + h, lx : lx + w]
            if f == 0:
                region[:] = src
            else:
                m = _feather_mask(h, w, f, (ly != 0, ly + h < H, lx != 0, lx + w < W))
                region[:] = src * m + region * (1 - m)
        return {**s, "samples": out}


def composite(
    dst: torch.Tensor,
    src: torch.Tensor,
    x: int,
    y: int,
    mask: torch.Tensor | None,
    multiplier: int,
    resize_source: bool,
) -> torch.Tensor:
    """``src`` pasted into a copy of ``dst`` (both ``[B, C, H, W]``) at (x, y) / multiplier, weighted by
    ``mask`` (resized to the source); the source batch is repeated or cut to the destination's."""
    out = dst.clone()
    src = src.to(out.dtype)
    if resize_source:
        src = F.interpolate(src, size=tuple(out.shape[2:]), mode="bilinear")
    src = repeat_to_batch(src, out.shape[0])
    H, W = out.shape[2:]
    left, top = min(max(x, 0), W * multiplier) // multiplier, min(max(y, 0), H * multiplier) // multiplier
    vh, vw = min(src.shape[2], H - top), min(src.shape[3], W - left)
    if vh <= 0 or vw <= 0:
        return out
    if mask is None:
        m = torch.ones((src.shape[0], 1, vh, vw))
    else:
        m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        m = F.interpolate(m, size=tuple(src.shape[2:]), mode="bilinear")
        m = repeat_to_batch(m, src.shape[0])[:, :, :vh, :vw]
    region = out[:, :, top : top + vh, left : left + vw]
    region[:] = src[:, :, :vh, :vw] * m + region * (1 - m)
    return out


class LatentCompositeMasked(engine.Node):
    """Pastes source into destination at (x, y) pixels, only where the mask is set (the mask is resized to
    the source). resize_source first scales the source to the destination's size."""

    display_name = "LatentCompositeMasked"
    category = "latent"
    outputs = ("LATENT",)

    def run(
        self,
        destination: Annotated[Any, Socket("LATENT")],
        source: Annotated[Any, Socket("LATENT")],
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        resize_source: Annotated[bool, Boolean()] = False,
        mask: Annotated[Any, Socket("MASK", optional=True)] = None,
    ):
        d = check_latent(destination, "destination")
        src = check_latent(source, "source")["samples"]
        check_channels(d["samples"], src, "source")
        m = None if mask is None else check_mask(mask)
        return {**d, "samples": composite(d["samples"], src, x, y, m, 8, resize_source)}


def _spatial(s: dict, fn: Any) -> dict:
    """Apply a spatial transform to the samples and, when present, the noise mask."""
    out = {**s, "samples": fn(s["samples"])}
    nm = s.get("noise_mask")
    if isinstance(nm, torch.Tensor) and nm.ndim >= 2:
        m = nm.reshape(-1, 1, nm.shape[-2], nm.shape[-1])
        out["noise_mask"] = fn(m)
    return out


class LatentFlip(engine.Node):
    """Mirrors latents: "x-axis" flips top to bottom, "y-axis" left to right."""

    display_name = "Flip Latent"
    category = "latent/transform"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        flip_method: Annotated[str, Combo(["x-axis: vertically", "y-axis: horizontally"])] = "x-axis: vertically",
    ):
        s = check_latent(samples)
        dim = 2 if flip_method.startswith("x") else 3
        return _spatial(s, lambda t: torch.flip(t, dims=[dim]))


class LatentRotate(engine.Node):
    """Rotates latents clockwise by 90, 180 or 270 degrees."""

    display_name = "Rotate Latent"
    category = "latent/transform"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        rotation: Annotated[str, Combo(["none", "90 degrees", "180 degrees", "270 degrees"])] = "none",
    ):
        s = check_latent(samples)
        k = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        if k == 0:
            return dict(s)
        return _spatial(s, lambda t: torch.rot90(t, k=k, dims=[3, 2]))


class LatentCrop(engine.Node):
    """Cuts a width x height pixel region at (x, y) out of latents. As ComfyUI, x and y are pulled back so
    at least 64 pixels remain, and the region is cut off at the latent's edges."""

    display_name = "Crop Latent"
    category = "latent/transform"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        width: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=8)] = 512,
        height: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=8)] = 512,
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
    ):
        s = check_latent(samples)
        H, W = s["samples"].shape[2:]
        lx = max(0, min(x // 8, W - 8))
        ly = max(0, min(y // 8, H - 8))
        lw, lh = max(1, width // 8), max(1, height // 8)
        out = {**s, "samples": s["samples"][:, :, ly : ly + lh, lx : lx + lw]}
        nm = s.get("noise_mask")
        if isinstance(nm, torch.Tensor) and nm.ndim >= 2:  # the same region, in the mask's own resolution
            m = nm.reshape(-1, 1, nm.shape[-2], nm.shape[-1])
            fy, fx = m.shape[2] / H, m.shape[3] / W
            y0, x0 = round(ly * fy), round(lx * fx)
            y1, x1 = round(min(ly + lh, H) * fy), round(min(lx + lw, W) * fx)
            out["noise_mask"] = m[:, :, y0:y1, x0:x1]
        return out


NODES = [
    LatentAdd,
    LatentSubtract,
    LatentMultiply,
    LatentInterpolate,
    LatentBlend,
    LatentComposite,
    LatentCompositeMasked,
    LatentFlip,
    LatentRotate,
    LatentCrop,
]
