"""Alpha compositing and colour-space nodes with ComfyUI's names, inputs and behaviour: Porter-Duff
composites of two images with their alpha masks, splitting/joining an alpha channel, and RGB <-> YUV
(YCbCr) channel split.

Masks follow ComfyUI's convention: a MASK is 1 - alpha (1 = transparent / to be changed).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from kiln.engine import Combo, Node, NodeError, Output, Socket

from .common import check_image, check_mask
from .image import scale_image

IMAGE = Socket("IMAGE")
MASK = Socket("MASK")

PORTER_DUFF_MODES = [
    "ADD",
    "CLEAR",
    "DARKEN",
    "DST",
    "DST_ATOP",
    "DST_IN",
    "DST_OUT",
    "DST_OVER",
    "LIGHTEN",
    "MULTIPLY",
    "OVERLAY",
    "SCREEN",
    "SRC",
    "SRC_ATOP",
    "SRC_IN",
    "SRC_OUT",
    "SRC_OVER",
    "XOR",
]


def porter_duff(
    src: torch.Tensor, src_a: torch.Tensor, dst: torch.Tensor, dst_a: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite straight-alpha colours ``src``/``dst`` with alphas ``src_a``/``dst_a`` (broadcastable);
    returns straight colour and alpha."""
    s, d = src * src_a, dst * dst_a  # premultiplied
    union = src_a + dst_a - src_a * dst_a
    if mode == "ADD":
        a, c = (src_a + dst_a).clamp(0, 1), (s + d).clamp(0, 1)
    elif mode == "CLEAR":
        a, c = torch.zeros_like(dst_a), torch.zeros_like(d)
    elif mode == "DARKEN":
        a, c = union, (1 - dst_a) * s + (1 - src_a) * d + torch.minimum(s, d)
    elif mode == "DST":
        a, c = dst_a, d
    elif mode == "DST_ATOP":
        a, c = src_a, src_a * d + (1 - dst_a) * s
    elif mode == "DST_IN":
        a, c = src_a * dst_a, d * src_a
    elif mode == "DST_OUT":
        a, c = (1 - src_a) * dst_a, (1 - src_a) * d
    elif mode == "DST_OVER":
        a, c = dst_a + (1 - dst_a) * src_a, d + (1 - dst_a) * s
    elif mode == "LIGHTEN":
        a, c = union, (1 - dst_a) * s + (1 - src_a) * d + torch.maximum(s, d)
    elif mode == "MULTIPLY":
        a, c = src_a * dst_a, s * d
    elif mode == "OVERLAY":
        a = union
        c = torch.where(2 * d < dst_a, 2 * s * d, src_a * dst_a - 2 * (dst_a - s) * (src_a - d))
    elif mode == "SCREEN":
        a, c = union, s + d - s * d
    elif mode == "SRC":
        a, c = src_a, s
    elif mode == "SRC_ATOP":
        a, c = dst_a, dst_a * s + (1 - src_a) * d
    elif mode == "SRC_IN":
        a, c = src_a * dst_a, s * dst_a
    elif mode == "SRC_OUT":
        a, c = (1 - dst_a) * src_a, (1 - dst_a) * s
    elif mode == "SRC_OVER":
        a, c = src_a + (1 - src_a) * dst_a, s + (1 - src_a) * d
    elif mode == "XOR":
        a, c = (1 - dst_a) * src_a + (1 - src_a) * dst_a, (1 - dst_a) * s + (1 - src_a) * d
    else:
        raise NodeError(f"unknown Porter-Duff mode {mode!r}; one of {PORTER_DUFF_MODES}", input_name="mode")
    straight = torch.where(a > 1e-5, c / a.clamp(min=1e-5), torch.zeros_like(c)).clamp(0, 1)
    return straight, a


def _fit(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rescale a [B, H, W, C] batch to height x width (bicubic, centre crop) as ComfyUI does for mismatches."""
    if x.shape[1:3] == (height, width):
        return x
    return scale_image(x, width, height, "bicubic", "center")


class PorterDuffImageComposite(Node):
    """Composite ``source`` over/into ``destination`` with a Porter-Duff operator, using the two alpha
    masks (MASK = 1 - alpha). Source and its mask are rescaled to the destination's size."""

    display_name = "Porter-Duff Image Composite"
    category = "mask/compositing"
    outputs = ("IMAGE", "MASK")

    def run(
        self,
        source: Annotated[torch.Tensor, IMAGE],
        source_alpha: Annotated[torch.Tensor, MASK],
        destination: Annotated[torch.Tensor, IMAGE],
        destination_alpha: Annotated[torch.Tensor, MASK],
        mode: Annotated[str, Combo(PORTER_DUFF_MODES, v3=True)] = "DST",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(source, "PorterDuffImageComposite", "source")
        check_image(destination, "PorterDuffImageComposite", "destination")
        src_m = check_mask(source_alpha, "source_alpha")
        dst_m = check_mask(destination_alpha, "destination_alpha")
        if mode not in PORTER_DUFF_MODES:
            raise NodeError(f"unknown Porter-Duff mode {mode!r}; one of {PORTER_DUFF_MODES}", input_name="mode")
        if source.shape[-1] != destination.shape[-1]:
            raise NodeError(
                f"source has {source.shape[-1]} channels but destination has {destination.shape[-1]}",
                input_name="source",
                hint="give both images the same channels (e.g. SplitImageWithAlpha to drop an alpha channel)",
            )
        named = {"source": source, "source_alpha": src_m, "destination": destination, "destination_alpha": dst_m}
        for name, t in named.items():
            if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
                raise NodeError(f"{name} is empty {tuple(t.shape)}", input_name=name)
        n = min(t.shape[0] for t in named.values())  # ComfyUI composites as many as the shortest input has
        h, w = destination.shape[1], destination.shape[2]
        dst = destination[:n].float()
        dst_a = 1.0 - _fit(dst_m[:n].unsqueeze(-1).float(), h, w)
        src = _fit(source[:n].float(), h, w)
        src_a = 1.0 - _fit(src_m[:n].unsqueeze(-1).float(), h, w)
        image, alpha = porter_duff(src, src_a, dst, dst_a, mode)
        return image, 1.0 - alpha[..., 0]


class SplitImageWithAlpha(Node):
    """Split an RGBA image into its RGB image and a MASK of 1 - alpha (all 0 for an RGB image)."""

    display_name = "Split Image with Alpha"
    category = "mask/compositing"
    outputs = ("IMAGE", "MASK")

    def run(self, image: Annotated[torch.Tensor, IMAGE]) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(image, "SplitImageWithAlpha")
        if image.shape[-1] < 3:
            raise NodeError(f"expected an RGB or RGBA image, got {image.shape[-1]} channel(s)", input_name="image")
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return image[..., :3].clone(), 1.0 - alpha


class JoinImageWithAlpha(Node):
    """Make an RGBA image from an image and a MASK (alpha = 1 - mask). As in ComfyUI, the mask is rescaled
    (bilinear) to the image's size and the shorter batch repeats to the longer one's length."""

    display_name = "Join Image with Alpha"
    category = "mask/compositing"
    outputs = ("IMAGE",)

    def run(self, image: Annotated[torch.Tensor, IMAGE], alpha: Annotated[torch.Tensor, MASK]) -> torch.Tensor:
        check_image(image, "JoinImageWithAlpha")
        mask = check_mask(alpha, "alpha")
        if image.shape[-1] < 3:
            raise NodeError(f"expected an RGB or RGBA image, got {image.shape[-1]} channel(s)", input_name="image")
        for name, t in (("image", image), ("alpha", mask)):
            if 0 in t.shape:
                raise NodeError(f"{name} is empty {tuple(t.shape)}", input_name=name)
        n = max(image.shape[0], mask.shape[0])
        image = _repeat_to(image, n)
        mask = _repeat_to(mask, n).float()
        if mask.shape[1:] != image.shape[1:3]:
            mask = F.interpolate(mask.unsqueeze(1), size=tuple(image.shape[1:3]), mode="bilinear").squeeze(1)
        return torch.cat((image[..., :3], (1.0 - mask).unsqueeze(-1).to(image.dtype)), dim=-1)


def _repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] >= n:
        return x[:n]
    reps = -(-n // x.shape[0])
    return x.repeat((reps,) + (1,) * (x.ndim - 1))[:n]


# BT.601 full-range YCbCr, the coefficients ComfyUI's node uses (through kornia)
def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack((y, (b - y) * 0.564 + 0.5, (r - y) * 0.713 + 0.5), dim=-1)


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 0.5, ycc[..., 2] - 0.5
    return torch.stack((y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb), dim=-1)


class ImageRGBToYUV(Node):
    """Split an RGB image into Y (luma), U (blue difference) and V (red difference), each as a grey image."""

    display_name = "Image RGB to YUV"
    category = "image/batch"
    outputs = (Output("IMAGE", "Y"), Output("IMAGE", "U"), Output("IMAGE", "V"))

    def run(self, image: Annotated[torch.Tensor, IMAGE]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_image(image, "ImageRGBToYUV")
        if image.shape[-1] < 3:
            raise NodeError(f"expected an RGB image, got {image.shape[-1]} channel(s)", input_name="image")
        ycc = rgb_to_ycbcr(image[..., :3].float())
        y, u, v = (ycc[..., i : i + 1].expand(*ycc.shape[:-1], 3).contiguous() for i in range(3))
        return y, u, v


class ImageYUVToRGB(Node):
    """Rebuild an RGB image from Y, U and V grey images (each image's colour channels are averaged first)."""

    display_name = "Image YUV to RGB"
    category = "image/batch"
    outputs = ("IMAGE",)

    def run(
        self,
        Y: Annotated[torch.Tensor, IMAGE],
        U: Annotated[torch.Tensor, IMAGE],
        V: Annotated[torch.Tensor, IMAGE],
    ) -> torch.Tensor:
        planes = {"Y": check_image(Y, "ImageYUVToRGB", "Y"), "U": check_image(U, "ImageYUVToRGB", "U")}
        planes["V"] = check_image(V, "ImageYUVToRGB", "V")
        for name, t in planes.items():
            if t.shape[:3] != planes["Y"].shape[:3]:
                raise NodeError(
                    f"{name} is {tuple(t.shape[:3])} (batch, height, width) but Y is {tuple(planes['Y'].shape[:3])}",
                    input_name=name,
                    hint="connect the Y, U and V outputs of one ImageRGBToYUV (or images of the same size)",
                )
        ycc = torch.cat([t[..., :3].float().mean(dim=-1, keepdim=True) for t in planes.values()], dim=-1)
        return ycbcr_to_rgb(ycc)


NODES = [PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha, ImageRGBToYUV, ImageYUVToRGB]
