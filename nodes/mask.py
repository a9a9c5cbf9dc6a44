"""Mask nodes with ComfyUI's names, inputs and behaviour. MASK is float32 [B, H, W] in 0..1 (1 = the area to
change); a single [H, W] mask is accepted wherever a MASK is.

Where ComfyUI would stop with a raw tensor error (batches that cannot be matched, a crop that misses the mask)
these raise a NodeError that names the input and the fix; where it quietly clips a region at the mask's edge,
so do they.
"""

from __future__ import annotations

import random
import string
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from kiln.engine import MAX_RESOLUTION, Boolean, Combo, Float, Hidden, Int, Node, NodeError, NodeResult, Socket
from kiln.engine.folders import UnsafePath

from .common import check_image, check_mask
from .image import LoadImage, annotated_path, input_choices, open_capped, save_images


class SolidMask(Node):
    display_name = "SolidMask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        value: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0,
        width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
    ) -> torch.Tensor:
        return torch.full((1, height, width), value, dtype=torch.float32)


class InvertMask(Node):
    display_name = "InvertMask"
    category = "mask"
    outputs = ("MASK",)

    def run(self, mask: Annotated[torch.Tensor, Socket("MASK")]) -> torch.Tensor:
        return 1.0 - check_mask(mask)


class ImageToMask(Node):
    display_name = "Convert Image to Mask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        image: Annotated[torch.Tensor, Socket("IMAGE")],
        channel: Annotated[str, Combo(["red", "green", "blue", "alpha"])] = "red",
    ) -> torch.Tensor:
        check_image(image, "ImageToMask")
        idx = ["red", "green", "blue", "alpha"].index(channel)
        if idx >= image.shape[-1]:
            return torch.zeros(image.shape[:3], dtype=torch.float32)
        return image[..., idx].contiguous()


class MaskToImage(Node):
    display_name = "Convert Mask to Image"
    category = "mask"
    outputs = ("IMAGE",)

    def run(self, mask: Annotated[torch.Tensor, Socket("MASK")]) -> torch.Tensor:
        m = check_mask(mask)
        return m.unsqueeze(-1).expand(*m.shape, 3).contiguous()


class ImageColorToMask(Node):
    """1 where the image has exactly the given colour (0xRRGGBB, compared in 8 bits), 0 elsewhere."""

    display_name = "ImageColorToMask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        image: Annotated[torch.Tensor, Socket("IMAGE")],
        color: Annotated[int, Int(min=0, max=0xFFFFFF, step=1, display="color")] = 0,
    ) -> torch.Tensor:
        img = check_image(image, "ImageColorToMask")
        if img.shape[-1] < 3:
            img = img[..., :1].expand(*img.shape[:3], 3)
        q = (img[..., :3].clamp(0, 1) * 255.0).round().to(torch.int64)
        packed = (q[..., 0] << 16) + (q[..., 1] << 8) + q[..., 2]
        return (packed == color).float()


class ThresholdMask(Node):
    """1 where the mask is above value, 0 elsewhere."""

    display_name = "ThresholdMask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        mask: Annotated[torch.Tensor, Socket("MASK")],
        value: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5,
    ) -> torch.Tensor:
        return (check_mask(mask) > value).float()


class CropMask(Node):
    """The width x height region of the mask at (x, y), cut off at the mask's edges."""

    display_name = "CropMask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        mask: Annotated[torch.Tensor, Socket("MASK")],
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
    ) -> torch.Tensor:
        m = check_mask(mask)
        h, w = m.shape[-2:]
        for name, pos, size in (("x", x, w), ("y", y, h)):
            if not 0 <= pos < size:
                raise NodeError(
                    f"{name}={pos} lies outside the {w}x{h} mask",
                    input_name=name,
                    hint=f"use {name} from 0 to {size - 1}",
                )
        return m[:, y : y + max(1, height), x : x + max(1, width)].clone()


class FeatherMask(Node):
    """Fades the mask towards each edge: over `left` columns from the left edge (the outermost column keeps
    1/left of its value), and likewise `top`, `right`, `bottom`."""

    display_name = "FeatherMask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        mask: Annotated[torch.Tensor, Socket("MASK")],
        left: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        top: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        right: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        bottom: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
    ) -> torch.Tensor:
        out = check_mask(mask).float().clone()
        h, w = out.shape[-2:]

        def ramp(n: int, size: int) -> torch.Tensor:
            n = min(n, size)
            r = torch.ones(size)
            if n > 0:
                r[:n] = torch.arange(1, n + 1, dtype=torch.float32) / n
            return r

        out *= ramp(left, w) * ramp(right, w).flip(0)
        out *= (ramp(top, h) * ramp(bottom, h).flip(0))[:, None]
        return out


def _morph(m: torch.Tensor, steps: int, grow: bool, tapered: bool) -> torch.Tensor:
    """Grey dilation (grow) or erosion repeated `steps` times with a 3x3 footprint: a plus sign when
    tapered (corners round off), a full square otherwise. Pixels beyond the edge repeat the edge."""
    x = m[:, None].float()
    if not grow:
        x = -x
    h, w = x.shape[-2:]
    if tapered:
        for _ in range(min(steps, h + w)):  # after h + w steps nothing changes any more
            p = F.pad(x, (1, 1, 1, 1), mode="replicate")
            x = torch.stack([x, p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]]).amax(0)
    else:  # n steps of a 3x3 square are one (2n+1) square, separable into a row and a column pass
        r = min(steps, max(h, w))
        k = 2 * r + 1
        x = F.max_pool2d(F.pad(x, (r, r, 0, 0), mode="replicate"), (1, k), stride=1)
        x = F.max_pool2d(F.pad(x, (0, 0, r, r), mode="replicate"), (k, 1), stride=1)
    return (x if grow else -x)[:, 0]


class GrowMask(Node):
    """Grows the mask by `expand` pixels (shrinks it when negative); tapered_corners rounds the corners."""

    display_name = "GrowMask"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        mask: Annotated[torch.Tensor, Socket("MASK")],
        expand: Annotated[int, Int(min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1)] = 0,
        tapered_corners: Annotated[bool, Boolean()] = True,
    ) -> torch.Tensor:
        m = check_mask(mask).float()
        if expand == 0:
            return m.clone()
        return _morph(m, abs(expand), expand > 0, tapered_corners)


MASK_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


def _batches(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = dst.shape[0], src.shape[0]
    if n != k and 1 not in (n, k):
        raise NodeError(
            f"source holds {k} masks but destination holds {n}",
            input_name="source",
            hint=f"give one mask or {n}",
        )
    b = max(n, k)
    return dst.expand(b, -1, -1), src.expand(b, -1, -1)


class MaskComposite(Node):
    """Combines source into destination with its top-left corner at (x, y): the overlapping area becomes
    destination (op) source, clamped to 0..1; and/or/xor treat values >= 0.5 as set."""

    display_name = "MaskComposite"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        destination: Annotated[torch.Tensor, Socket("MASK")],
        source: Annotated[torch.Tensor, Socket("MASK")],
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        operation: Annotated[str, Combo(MASK_OPERATIONS)] = "multiply",
    ) -> torch.Tensor:
        dst, src = _batches(check_mask(destination, "destination").float(), check_mask(source, "source").float())
        out = dst.clone()
        h, w = out.shape[-2:]
        x, y = max(0, x), max(0, y)
        vh, vw = min(src.shape[-2], h - y), min(src.shape[-1], w - x)
        if vh > 0 and vw > 0:
            d = out[:, y : y + vh, x : x + vw]
            s = src[:, :vh, :vw]
            if operation == "multiply":
                r = d * s
            elif operation == "add":
                r = d + s
            elif operation == "subtract":
                r = d - s
            elif operation in ("and", "or", "xor"):
                a, b = d.round().bool(), s.round().bool()
                r = (a & b if operation == "and" else a | b if operation == "or" else a ^ b).float()
            else:
                raise NodeError(f"unknown operation {operation!r}", input_name="operation", hint=str(MASK_OPERATIONS))
            d[:] = r
        return out.clamp(0.0, 1.0)


MASK_CHANNELS = ["alpha", "red", "green", "blue"]


class LoadImageMask(Node):
    """Loads one channel of an image from the input folder as a mask. For alpha the mask is 1 - alpha
    (transparent = the area to change), as LoadImage's mask."""

    display_name = "Load Image (as Mask)"
    category = "mask"
    outputs = ("MASK",)

    def run(
        self,
        image: Annotated[str, Combo(input_choices, image_upload=True)],
        channel: Annotated[str, Combo(MASK_CHANNELS)] = "alpha",
    ) -> torch.Tensor:
        img: Image.Image
        try:
            img = ImageOps.exif_transpose(open_capped(annotated_path(image), image))
        except NodeError:
            raise
        except (FileNotFoundError, UnsafePath):
            raise NodeError(
                f"image file {image!r} not found in the input folder",
                input_name="image",
                hint="upload it or copy it into input/",
            ) from None
        except Exception as exc:
            raise NodeError(f"cannot decode {image!r} as an image: {exc}", input_name="image") from None
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        band = channel[0].upper()
        m = torch.from_numpy(np.asarray(img.getchannel(band), dtype=np.float32) / 255.0)
        if band == "A":
            m = 1.0 - m
        return m.unsqueeze(0)

    @classmethod
    def fingerprint(cls, image: str, channel: str = "alpha") -> str:
        return LoadImage.fingerprint(image)

    @classmethod
    def estimate_outputs(cls, image: str = "", **_: Any) -> tuple | None:
        outs = LoadImage.estimate_outputs(image)
        return None if outs is None else (outs[1],)

    @classmethod
    def validate(cls, image: str) -> bool | str:
        return LoadImage.validate(image)


class MaskPreview(Node):
    """Shows the mask as a greyscale image (saved to the temp folder)."""

    display_name = "MaskPreview"
    category = "mask"
    output_node = True

    def run(
        self,
        mask: Annotated[Any, Socket("MASK")],
        prompt: Annotated[dict | None, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict | None, Hidden("EXTRA_PNGINFO")] = None,
    ):
        m = check_mask(mask).float()
        preview = m[..., None].expand(*m.shape, 3)
        prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        return NodeResult(ui={"images": save_images(preview, prefix, "temp", prompt, extra_pnginfo)})


NODES = [
    SolidMask,
    InvertMask,
    ImageToMask,
    MaskToImage,
    ImageColorToMask,
    ThresholdMask,
    CropMask,
    FeatherMask,
    GrowMask,
    MaskComposite,
    LoadImageMask,
    MaskPreview,
]
