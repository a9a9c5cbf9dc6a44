"""Animated image savers with ComfyUI's names, inputs and behaviour: an IMAGE batch becomes one animated
PNG (APNG) or animated WEBP in the output folder, one frame per image.

Metadata is written where ComfyUI writes it, so its editor can load the graph back from the file:
APNG gets ``comf`` chunks (``key\\0json``) after the image data, one for ``prompt`` and one per
``extra_pnginfo`` key; WEBP gets EXIF tags, ``prompt:<json>`` in 0x0110 (Model) and ``<key>:<json>`` from
0x010F (Make) downwards. Files go through :func:`kiln.nodes.outputs.write_output` (temporary name in the
same folder, then moved into place under the next free ``<prefix>_<NNNNN>_.<ext>``), so a reader never sees
a partial file and an existing file is never overwritten.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import torch
from PIL import Image, PngImagePlugin

from kiln.engine import Boolean, Combo, Float, Hidden, Int, Node, NodeError, NodeResult, Socket, String, get_folders
from kiln.engine.folders import UnsafePath

from .common import check_image, tensor_to_pil
from .image import expand_prefix
from .outputs import write_output

IMAGE = Socket("IMAGE")
WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}


def _frames(images: Any, node: str) -> list[Image.Image]:
    check_image(images, node, "images")
    if images.shape[0] == 0:
        raise NodeError(f"{node} got an empty batch", input_name="images", hint="connect at least one image")
    return tensor_to_pil(images)


def _frame_ms(fps: float) -> int:
    if not fps or fps <= 0:
        raise NodeError(f"fps must be positive, got {fps}", input_name="fps")
    return int(1000.0 / fps)  # ComfyUI truncates: 6 fps -> 166 ms per frame


def _target(prefix: str, width: int, height: int) -> tuple[Path, str, str]:
    """(folder, subfolder, base name) for a filename_prefix, inside the output folder."""
    folders = get_folders()
    prefix = expand_prefix(prefix, width, height)
    sub, _, base = prefix.replace("\\", "/").rpartition("/")
    if not base:
        raise NodeError("filename_prefix must end with a file name", input_name="filename_prefix")
    try:
        folder = folders.safe_path("output", sub) if sub else folders.dir_for("output")
    except UnsafePath as exc:
        raise NodeError(
            f"filename_prefix {prefix!r} would save outside the output folder ({exc})",
            input_name="filename_prefix",
            hint="use a relative prefix such as 'animations/walk'",
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    return folder, sub, base


def write_new_file(folder: Path, base: str, ext: str, data: bytes) -> str:
    """Write ``data`` as the next free ``<base>_<NNNNN>_.<ext>`` (the counter shared with every extension,
    as ComfyUI numbers them), atomically and never over another file; returns the file name."""
    pattern = re.compile(re.escape(base) + r"_(\d+)_")
    counter = 1 + max((int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))), default=0)
    return write_output(folder, data, (f"{base}_{n:05d}_.{ext}" for n in itertools.count(counter)))


def apng_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    chunks = ([("prompt", prompt)] if prompt is not None else []) + list((extra_pnginfo or {}).items())
    for key, value in chunks:
        info.add(b"comf", key.encode("latin-1") + b"\0" + json.dumps(value).encode("latin-1"), after_idat=True)
    return info


def webp_exif(first: Image.Image, prompt: dict | None, extra_pnginfo: dict | None) -> Image.Exif:
    exif = first.getexif()
    if prompt is not None:
        exif[0x0110] = "prompt:" + json.dumps(prompt)
    tag = 0x010F
    for key, value in (extra_pnginfo or {}).items():
        exif[tag] = f"{key}:{json.dumps(value)}"
        tag -= 1
    return exif


def _ui(result: dict, n_frames: int) -> NodeResult:
    return NodeResult(ui={"images": [result], "animated": [n_frames > 1]})


class SaveAnimatedPNG(Node):
    """Save the batch as one animated PNG (APNG) in the output folder, ``fps`` frames per second."""

    display_name = "SaveAnimatedPNG"
    category = "image/animation"
    output_node = True

    def run(
        self,
        images: Annotated[torch.Tensor, IMAGE],
        filename_prefix: Annotated[str, String(tooltip="file name prefix; may contain a subfolder")] = "ComfyUI",
        fps: Annotated[float, Float(min=0.01, max=1000.0, step=0.01)] = 6.0,
        compress_level: Annotated[int, Int(min=0, max=9, tooltip="zlib level: 0 fastest, 9 smallest")] = 4,
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ) -> NodeResult:
        frames = _frames(images, "SaveAnimatedPNG")
        duration = _frame_ms(fps)
        folder, sub, base = _target(filename_prefix, frames[0].width, frames[0].height)
        buf = io.BytesIO()
        frames[0].save(
            buf,
            format="PNG",
            pnginfo=apng_metadata(prompt, extra_pnginfo),
            compress_level=compress_level,
            save_all=True,
            duration=duration,
            append_images=frames[1:],
        )
        name = write_new_file(folder, base, "png", buf.getvalue())
        return _ui({"filename": name, "subfolder": sub, "type": "output"}, len(frames))


class SaveAnimatedWEBP(Node):
    """Save the batch as one animated WEBP in the output folder, ``fps`` frames per second."""

    display_name = "SaveAnimatedWEBP"
    category = "image/animation"
    output_node = True

    def run(
        self,
        images: Annotated[torch.Tensor, IMAGE],
        filename_prefix: Annotated[str, String(tooltip="file name prefix; may contain a subfolder")] = "ComfyUI",
        fps: Annotated[float, Float(min=0.01, max=1000.0, step=0.01)] = 6.0,
        lossless: Annotated[bool, Boolean()] = True,
        quality: Annotated[int, Int(min=0, max=100, tooltip="lossy quality, or effort when lossless")] = 80,
        method: Annotated[str, Combo(list(WEBP_METHODS), tooltip="encoder speed / size trade-off")] = "default",
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ) -> NodeResult:
        frames = _frames(images, "SaveAnimatedWEBP")
        duration = _frame_ms(fps)
        if method not in WEBP_METHODS:
            raise NodeError(f"unknown method {method!r}; one of {list(WEBP_METHODS)}", input_name="method")
        folder, sub, base = _target(filename_prefix, frames[0].width, frames[0].height)
        buf = io.BytesIO()
        frames[0].save(
            buf,
            format="WEBP",
            save_all=True,
            duration=duration,
            append_images=frames[1:],
            exif=webp_exif(frames[0], prompt, extra_pnginfo),
            lossless=lossless,
            quality=quality,
            method=WEBP_METHODS[method],
        )
        name = write_new_file(folder, base, "webp", buf.getvalue())
        return _ui({"filename": name, "subfolder": sub, "type": "output"}, len(frames))


NODES = [SaveAnimatedPNG, SaveAnimatedWEBP]
