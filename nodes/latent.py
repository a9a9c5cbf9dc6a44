"""Latents: empty, resized, VAE encode/decode, inpainting masks.

LATENT is ``{"samples": [B, 4, H/8, W/8], "noise_mask"?: [B, 1, H, W], "batch_index"?: [...]}``; samples
are scaled by the VAE's ``scaling_factor`` as the diffusion model expects.

The helpers other families share live here: ``check_latent``, ``check_vae``, ``resize_latent`` (ComfyUI's
``common_upscale``), and the VAE steps ``encode``/``decode`` with their raw halves ``encode_raw``/``decode_raw``
(``vae_tiled`` runs those per tile).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from kiln import engine
from kiln.engine import MAX_RESOLUTION, Combo, Float, Int, NodeError, Output, Socket, TensorEstimate
from kiln.nodes.common import check_image, check_mask

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


def _check_multiple(name: str, value: int) -> str | None:
    if value % 8:
        lo = value - value % 8
        return f"{name} {value} is not a multiple of 8 (latents here are 1/8 of the pixel size); use {lo} or {lo + 8}"


def check_size(width: int, height: int) -> bool | dict:
    """True, or a message for each of width/height that is not a multiple of 8 (only the wrong ones)."""
    wrong = {n: m for n, v in (("width", width), ("height", height)) if (m := _check_multiple(n, v))}
    return wrong or True
    return None


def check_latent(samples: Any, input_name: str = "samples") -> dict:
    if (
        not isinstance(samples, dict)
        or not isinstance(samples.get("samples"), torch.Tensor)
        or samples["samples"].ndim != 4
    ):
        raise NodeError("expected a LATENT ({'samples': [batch, channels, height/8, width/8]})", input_name=input_name)
    return samples


def _slerp_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resize along ``dim`` (2 or 3): neighbouring latent vectors are blended by spherical interpolation of
    their directions (across channels) and linear interpolation of their lengths."""
    n = x.shape[dim]
    pos = ((torch.arange(size, dtype=torch.float32) + 0.5) * n / size - 0.5).clamp(0, n - 1)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=n - 1)
    t = (pos - i0).reshape([-1 if d == dim else 1 for d in range(4)])
    a, b = x.index_select(dim, i0), x.index_select(dim, i1)
    la, lb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    na, nb = a / la.clamp_min(1e-8), b / lb.clamp_min(1e-8)
    omega = (na * nb).sum(1, keepdim=True).clamp(-1, 1).acos()
    so = omega.sin()
    safe = so.abs() > 1e-4
    wa = torch.where(safe, ((1 - t) * omega).sin() / so.clamp_min(1e-4), 1 - t)
    wb = torch.where(safe, (t * omega).sin() / so.clamp_min(1e-4), t)
    return (wa * na + wb * nb) * (la + (lb - la) * t)


def resize_latent(x: torch.Tensor, h: int, w: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """ComfyUI's ``common_upscale`` for latents: optional centre crop to the new aspect ratio, then resize."""
    if crop == "center":
        oh, ow = x.shape[-2:]
        src, dst = ow / oh, w / h
        if src > dst:
            cw = round(oh * dst)
            x = x[..., (ow - cw) // 2 : (ow - cw) // 2 + cw]
        elif src < dst:
            ch = round(ow / dst)
            x = x[..., (oh - ch) // 2 : (oh - ch) // 2 + ch, :]
    if method == "bislerp":
        return _slerp_axis(_slerp_axis(x.float(), w, 3), h, 2)
    kw = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=(h, w), mode=method, **kw)


def resize_memory(samples: TensorEstimate | None, outputs: tuple | None, method: str) -> int | None:
    """What ``resize_latent`` allocates: the resized latent; bislerp keeps about six latents of the new size
    alive at once (both neighbours, their norms and directions, the weights)."""
    if samples is None or not outputs or outputs[0] is None:
        return None
    if outputs[0] is samples:
        return 0  # 0x0: the latent passes through
    return outputs[0].nbytes * (6 if method == "bislerp" else 1)


def decoded_estimate(samples: TensorEstimate | None) -> TensorEstimate | None:
    """The IMAGE a VAE decodes a latent ``[B, C, h, w]`` into: ``[B, 8h, 8w, 3]`` (the 8x VAEs Kiln loads)."""
    if samples is None or len(samples.shape) != 4:
        return None
    b, _, h, w = samples.shape
    return samples.with_shape(b, h * 8, w * 8, 3)


def decode_memory(samples: TensorEstimate | None) -> int | None:
    """What decoding allocates beyond the model's own activations (not estimated): the decoder's float
    output, then ``(x + 1) / 2`` and the channels-last copy, about three decoded batches at once."""
    image = decoded_estimate(samples)
    return None if image is None else 3 * image.nbytes


class EmptyLatentImage(engine.Node):
    """A batch of empty (zero) latents of the given pixel size."""

    display_name = "Empty Latent Image"
    category = "latent"
    outputs = [Output("LATENT", tooltip="Zero latents of the requested size, one per batch item.")]

    def run(
        self,
        width: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=8)] = 512,
        height: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=8)] = 512,
        batch_size: Annotated[int, Int(min=1, max=4096)] = 1,
    ):
        return {"samples": torch.zeros([batch_size, 4, height // 8, width // 8])}

    @classmethod
    def estimate_outputs(cls, width: int = 512, height: int = 512, batch_size: int = 1, **_: Any) -> tuple:
        return (TensorEstimate((batch_size, 4, height // 8, width // 8)),)

    @classmethod
    def validate(cls, width: int = 512, height: int = 512) -> bool | dict:
        return check_size(width, height)


class LatentUpscale(engine.Node):
    """Resizes latents to a pixel size (0 in one dimension keeps the aspect ratio)."""

    display_name = "Upscale Latent"
    category = "latent"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, Socket("LATENT")],
        upscale_method: Annotated[str, Combo(UPSCALE_METHODS)] = "nearest-exact",
        width: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 512,
        height: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 512,
        crop: Annotated[str, Combo(["disabled", "center"])] = "disabled",
    ):
        s = check_latent(samples)
        x = s["samples"]
        if width == 0 and height == 0:
            return s
        h, w = x.shape[-2:]
        lw = width // 8 if width else max(1, round(w * (height // 8) / h))
        lh = height // 8 if height else max(1, round(h * (width // 8) / w))
        out = dict(s)
        out["samples"] = resize_latent(x, lh, lw, upscale_method, crop)
        return out

    @classmethod
    def estimate_outputs(
        cls, samples: TensorEstimate | None = None, width: int = 512, height: int = 512, **_: Any
    ) -> tuple | None:
        if samples is None or len(samples.shape) != 4:
            return None
        if width == 0 and height == 0:
            return (samples,)
        b, c, h, w = samples.shape
        lw = width // 8 if width else max(1, round(w * (height // 8) / h))
        lh = height // 8 if height else max(1, round(h * (width // 8) / w))
        return (samples.with_shape(b, c, lh, lw),)

    @classmethod
    def estimate_memory(
        cls, samples: TensorEstimate | None = None, upscale_method: str = "nearest-exact", **inputs: Any
    ) -> int | None:
        return resize_memory(samples, cls.estimate_outputs(samples=samples, **inputs), upscale_method)

    @classmethod
    def validate(cls, width: int = 512, height: int = 512) -> bool | dict:
        return check_size(width, height)


class LatentUpscaleBy(engine.Node):
    """Resizes latents by a factor."""

    display_name = "Upscale Latent By"
    category = "latent"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, Socket("LATENT")],
        upscale_method: Annotated[str, Combo(UPSCALE_METHODS)] = "nearest-exact",
        scale_by: Annotated[float, Float(min=0.01, max=8.0, step=0.01)] = 1.5,
    ):
        s = check_latent(samples)
        x = s["samples"]
        h, w = x.shape[-2:]
        out = dict(s)
        out["samples"] = resize_latent(x, max(1, round(h * scale_by)), max(1, round(w * scale_by)), upscale_method)
        return out

    @classmethod
    def estimate_outputs(cls, samples: TensorEstimate | None = None, scale_by: float = 1.5, **_: Any) -> tuple | None:
        if samples is None or len(samples.shape) != 4:
            return None
        b, c, h, w = samples.shape
        return (samples.with_shape(b, c, max(1, round(h * scale_by)), max(1, round(w * scale_by))),)

    @classmethod
    def estimate_memory(
        cls, samples: TensorEstimate | None = None, upscale_method: str = "nearest-exact", **inputs: Any
    ) -> int | None:
        return resize_memory(samples, cls.estimate_outputs(samples=samples, **inputs), upscale_method)


def check_vae(vae: Any) -> Any:
    if vae is None or not hasattr(vae, "vae"):
        raise NodeError(
            "vae is not a VAE", input_name="vae", hint="connect the VAE output of a checkpoint or VAE loader"
        )
    return vae


def check_vae_channels(vae: Any, latent: torch.Tensor) -> None:
    if latent.shape[1] != vae.latent_channels:
        raise NodeError(
            f"the latent has {latent.shape[1]} channels, this VAE expects {vae.latent_channels}",
            input_name="samples",
            hint="decode with the VAE of the model that made the latent",
        )


def decode_raw(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, C, h, w]`` to the VAE's raw output ``[B, 3, H, W]`` (about -1..1, float, CPU)."""
    with torch.inference_mode():
        z = latent.to(vae.device, vae.dtype) / vae.scaling_factor + vae.shift_factor
        return vae.vae.decode(z).sample.float().cpu()


def to_image(raw: torch.Tensor) -> torch.Tensor:
    """The VAE's raw output ``[B, 3, H, W]`` in -1..1 to an IMAGE ``[B, H, W, 3]`` in 0..1."""
    return ((raw + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


DECODE_CHUNK_PIXELS = 4 * 1024 * 1024  # decoded pixels per pass: a big batch is decoded a slice at a time


def decode(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """Latents to an IMAGE. A batch bigger than ``DECODE_CHUNK_PIXELS`` of output is decoded a slice at a
    time into one preallocated image: the decoder's activations stay those of one slice, progress is reported
    per slice and an interrupt stops the node between slices (each sample decodes on its own, so slicing does
    not change the result)."""
    check_vae_channels(vae, latent)
    b, _, h, w = latent.shape
    per = max(1, DECODE_CHUNK_PIXELS // max(1, h * 8 * w * 8))
    if b <= per:
        return to_image(decode_raw(vae, latent))
    out: torch.Tensor | None = None
    for start in range(0, b, per):
        engine.check_interrupted()
        image = to_image(decode_raw(vae, latent[start : start + per]))
        if out is None:
            out = torch.empty((b, *image.shape[1:]), dtype=image.dtype)
        out[start : start + image.shape[0]] = image
        engine.progress(min(b, start + per), b)
    assert out is not None
    return out


def crop_to_multiple(pixels: torch.Tensor, m: int = 8) -> torch.Tensor:
    h, w = pixels.shape[1], pixels.shape[2]
    nh, nw = h - h % m, w - w % m
    if nh == 0 or nw == 0:
        raise NodeError(
            f"the image is {w}x{h}, smaller than {m} pixels",
            input_name="pixels",
            hint=f"use an image of at least {m}x{m}",
        )
    oh, ow = (h - nh) // 2, (w - nw) // 2
    return pixels[:, oh : oh + nh, ow : ow + nw]


def encode_raw(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """Pixels ``[B, 3, H, W]`` in -1..1 (sides a multiple of ``vae.downscale``) to scaled latents (CPU)."""
    with torch.inference_mode():
        z = vae.vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return ((z.float() - vae.shift_factor) * vae.scaling_factor).cpu()


def from_image(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """An IMAGE, centre-cropped to a multiple of ``multiple``, as ``[B, 3, H, W]`` in -1..1."""
    return crop_to_multiple(pixels[..., :3], multiple).permute(0, 3, 1, 2).float() * 2 - 1


def encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    return encode_raw(vae, from_image(pixels, vae.downscale))


class VAEDecode(engine.Node):
    """Decodes latents into images."""

    display_name = "VAE Decode"
    category = "latent"
    outputs = [Output("IMAGE", tooltip="Pixels decoded from the latent.")]

    def run(
        self,
        samples: Annotated[Any, Socket("LATENT", tooltip="Latent samples to turn into pixels.")],
        vae: Annotated[Any, Socket("VAE", tooltip="VAE whose decoder maps latents to pixels.")],
    ):
        return decode(check_vae(vae), check_latent(samples)["samples"])

    @classmethod
    def estimate_outputs(cls, samples: TensorEstimate | None = None, **_: Any) -> tuple:
        return (decoded_estimate(samples),)

    @classmethod
    def estimate_memory(cls, samples: TensorEstimate | None = None, **_: Any) -> int | None:
        return decode_memory(samples)


class VAEEncode(engine.Node):
    """Encodes images into latents (images are centre-cropped to a multiple of 8)."""

    display_name = "VAE Encode"
    category = "latent"
    outputs = ("LATENT",)

    def run(self, pixels: Annotated[Any, Socket("IMAGE")], vae: Annotated[Any, Socket("VAE")]):
        return {"samples": encode(check_vae(vae), check_image(pixels, "VAEEncode", "pixels"))}


def _mask_for(mask: Any, pixels: torch.Tensor) -> torch.Tensor:
    m = check_mask(mask).float()
    if tuple(m.shape[-2:]) != tuple(pixels.shape[1:3]):
        raise NodeError(
            f"the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {pixels.shape[2]}x{pixels.shape[1]}",
            input_name="mask",
            hint="use a mask of the image's size (e.g. the MASK output of the same LoadImage, or resize it first)",
        )
    return m


class VAEEncodeForInpaint(engine.Node):
    """Encodes an image for inpainting: the masked area (grown by grow_mask_by pixels) is greyed out before
    encoding, and the mask becomes the latent's noise mask."""

    display_name = "VAE Encode (for Inpainting)"
    category = "latent/inpaint"
    outputs = ("LATENT",)

    def run(
        self,
        pixels: Annotated[Any, Socket("IMAGE")],
        vae: Annotated[Any, Socket("VAE")],
        mask: Annotated[Any, Socket("MASK")],
        grow_mask_by: Annotated[int, Int(min=0, max=64, step=1)] = 6,
    ):
        vae = check_vae(vae)
        pixels = check_image(pixels, "VAEEncodeForInpaint", "pixels")[..., :3]
        m = _mask_for(mask, pixels)
        if m.shape[0] != pixels.shape[0] and m.shape[0] != 1:
            raise NodeError(
                f"{m.shape[0]} masks for {pixels.shape[0]} images",
                input_name="mask",
                hint="give one mask, or one per image",
            )
        m = m.expand(pixels.shape[0], -1, -1)
        pixels = crop_to_multiple(pixels, vae.downscale)
        m = crop_to_multiple(m[..., None], vae.downscale)[..., 0]
        if grow_mask_by > 0:
            k = grow_mask_by * 2 + 1
            grown = F.max_pool2d(m[:, None], kernel_size=k, stride=1, padding=grow_mask_by)[:, 0]
        else:
            grown = m
        keep = (1 - grown.round())[..., None]
        pixels = (pixels - 0.5) * keep + 0.5
        return {"samples": encode(vae, pixels), "noise_mask": grown[:, None]}


class SetLatentNoiseMask(engine.Node):
    """Restricts sampling to the masked area of a latent (1 = change, 0 = keep)."""

    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    outputs = ("LATENT",)

    def run(self, samples: Annotated[Any, Socket("LATENT")], mask: Annotated[Any, Socket("MASK")]):
        s = check_latent(samples)
        m = check_mask(mask).float()
        lh, lw = s["samples"].shape[-2:]
        if abs(m.shape[-1] / m.shape[-2] - lw / lh) > 0.02:
            raise NodeError(
                f"the mask is {m.shape[-1]}x{m.shape[-2]}, the latent is for a {lw * 8}x{lh * 8} image",
                input_name="mask",
                hint="use a mask with the same size as the image",
            )
        out = dict(s)
        out["noise_mask"] = m.reshape(-1, 1, m.shape[-2], m.shape[-1])
        return out


NODES = [
    EmptyLatentImage,
    LatentUpscale,
    LatentUpscaleBy,
    VAEDecode,
    VAEEncode,
    VAEEncodeForInpaint,
    SetLatentNoiseMask,
]
