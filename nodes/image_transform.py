"""Image transform and post-processing nodes with ComfyUI's names, inputs and behaviour: flip, rotate,
sharpen, quantize, add noise, scale to a pixel count or a largest side, stitch, resize-and-pad, size, and
morphology (erode, dilate, open, close, gradient, top/bottom hat).

One file for the single-image operations ComfyUI spreads over four modules; each node is short and they
share the resize and padding helpers below.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kiln.engine import (
    MAX_RESOLUTION,
    SEED_MAX,
    Boolean,
    Combo,
    Float,
    Hidden,
    Int,
    Node,
    NodeError,
    Output,
    Socket,
)

from .common import check_image, to_uint8
from .image import scale_image

IMAGE = Socket("IMAGE")
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def _image(image: torch.Tensor, node: str, input_name: str = "image") -> torch.Tensor:
    check_image(image, node, input_name)
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise NodeError(
            f"{node} got an empty image batch {tuple(image.shape)}",
            input_name=input_name,
            hint="connect a node that produces at least one non-empty image",
        )
    return image


def resize(image: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """``scale_image`` for any channel count: its Lanczos goes through PIL as RGB, so other channel
    counts (RGBA, grey) are resampled one channel at a time here."""
    width, height = max(1, int(width)), max(1, int(height))
    if method != "lanczos" or image.shape[-1] == 3:
        return scale_image(image, width, height, method)
    out = []
    for frame in to_uint8(image):
        planes = [Image.fromarray(frame[..., c]) for c in range(frame.shape[-1])]
        chans = [np.asarray(p.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) for p in planes]
        out.append(torch.from_numpy(np.stack(chans, -1) / 255.0))
    return torch.stack(out).to(torch.float32)


class ImageFlip(Node):
    """Mirror images: ``x-axis`` flips top to bottom, ``y-axis`` flips left to right."""

    display_name = "ImageFlip"
    category = "image/transform"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        flip_method: Annotated[str, Combo(["x-axis: vertically", "y-axis: horizontally"])] = "x-axis: vertically",
    ) -> torch.Tensor:
        check_image(image, "ImageFlip")
        return torch.flip(image, dims=[1] if flip_method.startswith("x") else [2])


class ImageRotate(Node):
    """Rotate images clockwise by a quarter turn, a half turn or three quarters."""

    display_name = "ImageRotate"
    category = "image/transform"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        rotation: Annotated[str, Combo(["none", "90 degrees", "180 degrees", "270 degrees"])] = "none",
    ) -> torch.Tensor:
        check_image(image, "ImageRotate")
        quarter_turns = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        # rotating from the width axis towards the height axis turns the picture clockwise
        return torch.rot90(image, k=quarter_turns, dims=[2, 1]).contiguous()


def _gaussian_2d(size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's sharpen kernel shape: a Gaussian over [-1, 1] x [-1, 1] sampled on ``size`` points, sum 1."""
    ax = torch.linspace(-1.0, 1.0, size)
    d2 = ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2
    g = torch.exp(-d2 / (2.0 * sigma * sigma))
    return g / g.sum()


class ImageSharpen(Node):
    """Unsharp-style sharpening: subtract a Gaussian neighbourhood (scaled by ``alpha``) from each pixel."""

    display_name = "Image Sharpen"
    category = "image/postprocessing"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        sharpen_radius: Annotated[int, Int(min=1, max=31, step=1)] = 1,
        sigma: Annotated[float, Float(min=0.1, max=10.0, step=0.01)] = 1.0,
        alpha: Annotated[float, Float(min=0.0, max=5.0, step=0.01, tooltip="strength; 0 leaves the image")] = 1.0,
    ) -> torch.Tensor:
        _image(image, "ImageSharpen")
        if sharpen_radius <= 0:
            return image
        size = 2 * sharpen_radius + 1
        kernel = _gaussian_2d(size, sigma) * -(alpha * 10.0)
        kernel[sharpen_radius, sharpen_radius] += 1.0 - kernel.sum()  # the kernel sums to 1: flat areas stay
        c = image.shape[-1]
        x = image.movedim(-1, 1).float()
        mode = "reflect" if min(x.shape[-2:]) > sharpen_radius else "replicate"
        x = F.pad(x, (sharpen_radius,) * 4, mode=mode)
        out = F.conv2d(x, kernel.expand(c, 1, size, size).contiguous(), groups=c)
        return out.movedim(1, -1).clamp(0.0, 1.0)


DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


def _bayer_thresholds(order: int) -> np.ndarray:
    """An order x order ordered-dither matrix, centred on 0 with values in (-0.5, 0.5)."""
    m = np.zeros((1, 1), dtype=np.float64)
    while m.shape[0] < order:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return (m + 0.5) / m.size - 0.5


def _quantize_one(rgb: Image.Image, colors: int, dither: str) -> Image.Image:
    palette = rgb.quantize(colors=colors)  # the palette is chosen on the undithered image (Pillow issue 5836)
    if dither == "none":
        return rgb.quantize(palette=palette, dither=Image.Dither.NONE)
    if dither == "floyd-steinberg":
        return rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    order = int(dither.split("-")[1])
    n_colors = len(palette.getpalette() or []) // 3 or colors
    offsets = (2 * 256 / n_colors) * _bayer_thresholds(order) + 0.5
    arr = np.asarray(rgb, dtype=np.float32)
    h, w = arr.shape[:2]
    tiled = np.tile(offsets, (math.ceil(h / order), math.ceil(w / order)))[:h, :w, None]
    shifted = np.clip(arr + tiled, 0, 255).astype(np.uint8)
    return Image.fromarray(shifted, "RGB").quantize(palette=palette, dither=Image.Dither.NONE)


class ImageQuantize(Node):
    """Reduce each image to at most ``colors`` colours (a palette chosen per image), optionally dithered."""

    display_name = "Image Quantize"
    category = "image/postprocessing"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        colors: Annotated[int, Int(min=1, max=256, step=1)] = 256,
        dither: Annotated[str, Combo(DITHERS, v3=True)] = "none",
    ) -> torch.Tensor:
        _image(image, "ImageQuantize")
        if dither not in DITHERS:
            raise NodeError(f"unknown dither {dither!r}; one of {DITHERS}", input_name="dither")
        out = image.clone().float()
        pixels = to_uint8(image)
        for b in range(image.shape[0]):
            frame = pixels[b]
            rgb = Image.fromarray(frame[..., :3] if frame.shape[-1] >= 3 else np.repeat(frame, 3, -1), "RGB")
            q = np.asarray(_quantize_one(rgb, colors, dither).convert("RGB"), dtype=np.float32) / 255.0
            if image.shape[-1] >= 3:
                out[b, ..., :3] = torch.from_numpy(q)  # alpha, if any, is kept
            else:
                out[b, ..., 0] = torch.from_numpy(q[..., 0])
        return out


class ImageAddNoise(Node):
    """Add Gaussian noise (seeded, so the same seed gives the same grain) and clip to 0..1."""

    display_name = "ImageAddNoise"
    category = "image"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        seed: Annotated[
            int, Int(min=0, max=SEED_MAX, control_after_generate=True, tooltip="the random seed of the noise")
        ] = 0,
        strength: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5,
    ) -> torch.Tensor:
        check_image(image, "ImageAddNoise")
        gen = torch.Generator(device="cpu").manual_seed(seed)  # same stream as ComfyUI's torch.manual_seed(seed)
        noise = torch.randn(image.size(), generator=gen, device="cpu").to(image)
        return torch.clip(image + strength * noise, min=0.0, max=1.0)


class ImageScaleToTotalPixels(Node):
    """Resize to about ``megapixels`` million pixels (1 MP = 1024 x 1024), keeping the aspect ratio."""

    display_name = "Scale Image to Total Pixels"
    category = "image/upscaling"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        upscale_method: Annotated[str, Combo(UPSCALE_METHODS, v3=True)] = "nearest-exact",
        megapixels: Annotated[float, Float(min=0.01, max=16.0, step=0.01)] = 1.0,
    ) -> torch.Tensor:
        _image(image, "ImageScaleToTotalPixels")
        if megapixels <= 0:
            raise NodeError(f"megapixels must be positive, got {megapixels}", input_name="megapixels")
        h, w = image.shape[1], image.shape[2]
        scale = math.sqrt(megapixels * 1024 * 1024 / (w * h))
        return resize(image, round(w * scale), round(h * scale), upscale_method)


class ImageScaleToMaxDimension(Node):
    """Resize so the longer side is ``largest_size``, keeping the aspect ratio (0 leaves the image)."""

    display_name = "ImageScaleToMaxDimension"
    category = "image/upscaling"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        # ComfyUI's list names bilinear twice; kept so its graphs and clients see the same choices
        upscale_method: Annotated[
            str, Combo(["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"])
        ] = "area",
        largest_size: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 512,
    ) -> torch.Tensor:
        _image(image, "ImageScaleToMaxDimension")
        if largest_size <= 0:
            return image
        h, w = image.shape[1], image.shape[2]
        if h > w:
            w, h = round(w / h * largest_size), largest_size
        elif w > h:
            w, h = largest_size, round(h / w * largest_size)
        else:
            w = h = largest_size
        return resize(image, w, h, upscale_method)


SPACING_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


def _extend_batch(image: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a batch to ``n`` images by repeating its last one."""
    if image.shape[0] >= n:
        return image
    return torch.cat([image, image[-1:].expand(n - image.shape[0], *image.shape[1:])])


def _pad_centered(image: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    before, after = missing // 2, missing - missing // 2
    pad = (0, 0, before, after) if dim == 2 else (0, 0, 0, 0, before, after)
    return F.pad(image, pad, mode="constant", value=value)


class ImageStitch(Node):
    """Put ``image2`` to the right of, below, left of or above ``image1``, with an optional coloured gap.

    ``match_image_size`` scales image2 (Lanczos) to image1's height (left/right) or width (up/down);
    otherwise the smaller one is padded, centred, with the spacing colour. Without image2, image1 passes
    through."""

    display_name = "Image Stitch"
    category = "image/transform"
    outputs = ("IMAGE",)

    def run(
        self,
        image1: Annotated[torch.Tensor, IMAGE],
        direction: Annotated[str, Combo(["right", "down", "left", "up"])] = "right",
        match_image_size: Annotated[bool, Boolean()] = True,
        spacing_width: Annotated[int, Int(min=0, max=1024, step=2, tooltip="gap in pixels (rounded up to even)")] = 0,
        spacing_color: Annotated[str, Combo(list(SPACING_COLORS))] = "white",
        image2: Annotated[torch.Tensor, Socket("IMAGE", optional=True)] = None,
    ) -> torch.Tensor:
        _image(image1, "ImageStitch", "image1")
        if image2 is None:
            return image1
        _image(image2, "ImageStitch", "image2")
        if spacing_color not in SPACING_COLORS:
            raise NodeError(f"unknown spacing_color {spacing_color!r}", input_name="spacing_color")
        horizontal = direction in ("left", "right")
        n = max(image1.shape[0], image2.shape[0])
        image1, image2 = _extend_batch(image1, n), _extend_batch(image2, n).to(image1.dtype)
        color = SPACING_COLORS[spacing_color]
        if match_image_size:
            h1, w1 = image1.shape[1:3]
            h2, w2 = image2.shape[1:3]
            aspect = w2 / h2  # same expression as ComfyUI, so sizes round the same way
            size = (int(h1 * aspect), h1) if horizontal else (w1, int(w1 / aspect))
            image2 = resize(image2, size[0], size[1], "lanczos")
        else:
            # ComfyUI pads with the spacing colour when it is grey-scale (white, black), else with black
            pad_value = color[0] if len(set(color)) == 1 else 0.0
            dim = 1 if horizontal else 2
            target = max(image1.shape[dim], image2.shape[dim])
            image1 = _pad_centered(image1, dim, target, pad_value)
            image2 = _pad_centered(image2, dim, target, pad_value)
        c = max(image1.shape[-1], image2.shape[-1])
        image1 = F.pad(image1, (0, c - image1.shape[-1]), value=1.0)  # a missing alpha channel is opaque
        image2 = F.pad(image2, (0, c - image2.shape[-1]), value=1.0)
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            gap = spacing_width + spacing_width % 2
            if horizontal:
                shape = (n, max(image1.shape[1], image2.shape[1]), gap, c)
            else:
                shape = (n, gap, max(image1.shape[2], image2.shape[2]), c)
            spacer = torch.zeros(shape, dtype=image1.dtype)
            spacer[..., : min(3, c)] = torch.tensor(color[: min(3, c)], dtype=image1.dtype)
            if c == 4:
                spacer[..., 3] = 1.0
            parts.insert(1, spacer)
        try:
            return torch.cat(parts, dim=2 if horizontal else 1)
        except RuntimeError:
            side = "heights" if horizontal else "widths"
            raise NodeError(
                f"image1 and image2 {side} differ after scaling "
                f"({tuple(image1.shape[1:3])} vs {tuple(image2.shape[1:3])})",
                input_name="image2",
                hint="enable match_image_size or give images of the same size",
            ) from None


class ResizeAndPadImage(Node):
    """Fit the image inside target_width x target_height keeping its aspect ratio, centred on a white or
    black background."""

    display_name = "ResizeAndPadImage"
    category = "image/transform"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        target_width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        target_height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        padding_color: Annotated[str, Combo(["white", "black"])] = "white",
        interpolation: Annotated[str, Combo(["area", "bicubic", "nearest-exact", "bilinear", "lanczos"])] = "area",
    ) -> torch.Tensor:
        _image(image, "ResizeAndPadImage")
        b, h, w, c = image.shape
        scale = min(target_width / w, target_height / h)
        nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
        resized = resize(image, nw, nh, interpolation)
        out = torch.full((b, target_height, target_width, c), 0.0 if padding_color == "black" else 1.0)
        y0, x0 = (target_height - nh) // 2, (target_width - nw) // 2
        out[:, y0 : y0 + nh, x0 : x0 + nw] = resized.to(out.dtype)
        return out


class GetImageSize(Node):
    """The width, height and batch size of an image batch."""

    display_name = "Get Image Size"
    category = "image"
    outputs = (Output("INT", "width"), Output("INT", "height"), Output("INT", "batch_size"))

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        unique_id: Annotated[str, Hidden("UNIQUE_ID")] = None,
    ) -> tuple[int, int, int]:
        check_image(image, "GetImageSize")
        return int(image.shape[2]), int(image.shape[1]), int(image.shape[0])


MORPHOLOGY_OPS = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"]


def _sliding_max(x: torch.Tensor, size: int) -> torch.Tensor:
    """Max over every run of ``size`` values along the last dim (length n -> n - size + 1), in constant time
    per value whatever the size (van Herk / Gil-Werman: prefix and suffix maxima within blocks of ``size``)."""
    n = x.shape[-1]
    blocks = -(-n // size)
    x = F.pad(x, (0, blocks * size - n), value=float("-inf")).reshape(*x.shape[:-1], blocks, size)
    prefix = x.cummax(dim=-1).values.flatten(-2)
    suffix = x.flip(-1).cummax(dim=-1).values.flip(-1).flatten(-2)
    out_len = n - size + 1
    return torch.maximum(suffix[..., :out_len], prefix[..., size - 1 : size - 1 + out_len])


def _window_max(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Max over a window of ``k`` pixels along ``dim`` (-1 or -2) reaching ``k // 2`` back and the rest
    forward, ignoring pixels outside the image. Reaches longer than the image are cut, which gives the
    same result and keeps huge kernels cheap."""
    n = x.shape[dim]
    back, fwd = min(k // 2, n - 1), min(k - 1 - k // 2, n - 1)
    if back == 0 and fwd == 0:
        return x
    size = back + fwd + 1
    x = x.transpose(-1, -2) if dim == -2 else x
    x = F.pad(x, (back, fwd), mode="constant", value=float("-inf"))
    if size <= 9:  # small windows: the pooling kernel is faster
        out = F.max_pool1d(x.reshape(-1, 1, x.shape[-1]), size, stride=1).reshape(*x.shape[:-1], -1)
    else:
        out = _sliding_max(x, size)
    return out.transpose(-1, -2) if dim == -2 else out


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return _window_max(_window_max(x, k, -1), k, -2)  # a square window is a row window then a column window


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -_dilate(-x, k)


class Morphology(Node):
    """Grey-scale morphology with a flat square kernel: erode (local minimum), dilate (local maximum),
    open, close, gradient (dilate - erode), top_hat (image - open), bottom_hat (close - image)."""

    display_name = "ImageMorphology"
    category = "image/postprocessing"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        operation: Annotated[str, Combo(MORPHOLOGY_OPS, v3=True)] = "erode",
        kernel_size: Annotated[int, Int(min=3, max=999, step=1)] = 3,
    ) -> torch.Tensor:
        _image(image, "Morphology")
        if kernel_size < 1:
            raise NodeError(f"kernel_size must be at least 1, got {kernel_size}", input_name="kernel_size")
        x = image.movedim(-1, 1).float()
        k = kernel_size
        if operation == "erode":
            out = _erode(x, k)
        elif operation == "dilate":
            out = _dilate(x, k)
        elif operation == "open":
            out = _dilate(_erode(x, k), k)
        elif operation == "close":
            out = _erode(_dilate(x, k), k)
        elif operation == "gradient":
            out = _dilate(x, k) - _erode(x, k)
        elif operation == "top_hat":
            out = x - _dilate(_erode(x, k), k)
        elif operation == "bottom_hat":
            out = _erode(_dilate(x, k), k) - x
        else:
            raise NodeError(f"unknown operation {operation!r}; one of {MORPHOLOGY_OPS}", input_name="operation")
        return out.movedim(1, -1)


NODES = [
    ImageFlip,
    ImageRotate,
    ImageSharpen,
    ImageQuantize,
    ImageAddNoise,
    ImageScaleToTotalPixels,
    ImageScaleToMaxDimension,
    ImageStitch,
    ResizeAndPadImage,
    GetImageSize,
    Morphology,
]
