"""Helpers shared by node families: IMAGE/MASK tensors <-> PIL/numpy, PNG saving, preview encoding.

IMAGE is float32 ``[B, H, W, C]`` in 0..1; MASK is float32 ``[B, H, W]`` in 0..1 (1 = change).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from kiln.engine import NodeError, Preview


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """ComfyUI's 8-bit conversion: ``uint8(clip(255 * x, 0, 255))`` (truncation, not rounding)."""
    return np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)


def tensor_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """An IMAGE batch (or a single ``[H, W, C]``) to PIL images."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    out = []
    for arr in to_uint8(image):
        out.append(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    return out


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image to a ``[1, H, W, 3]`` IMAGE."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).unsqueeze(0)


def mask_from_alpha(img: Image.Image) -> torch.Tensor:
    """ComfyUI's LoadImage mask: ``1 - alpha`` as ``[1, H, W]``, or a 64x64 zero mask without alpha."""
    if "A" in img.getbands():
        a = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        return (1.0 - torch.from_numpy(a.copy())).unsqueeze(0)
    return torch.zeros((1, 64, 64), dtype=torch.float32)


def check_image(image: Any, node: str, input_name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeError(
            f"{node} expects an IMAGE tensor [batch, height, width, channels], got {shape}", input_name=input_name
        )
    return image


def check_mask(mask: Any, input_name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise NodeError(f"expected a MASK tensor [batch, height, width], got {shape}", input_name=input_name)
    return mask.unsqueeze(0) if mask.ndim == 2 else mask


def png_info(texts: dict[str, Any] | None) -> PngImagePlugin.PngInfo | None:
    if not texts:
        return None
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        if v is None:
            continue
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    return info


def comfy_png_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, Any]:
    """The text chunks ComfyUI writes: ``prompt`` plus one per key of ``extra_pnginfo`` (``workflow``)."""
    texts: dict[str, Any] = {}
    if prompt is not None:
        texts["prompt"] = prompt
    for k, v in (extra_pnginfo or {}).items():
        texts[k] = v
    return texts


def encode_png(img: Image.Image, texts: dict[str, Any] | None = None, compress_level: int = 4) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=png_info(texts), compress_level=compress_level)
    return buf.getvalue()


def preview_from_image(image: torch.Tensor, max_size: int = 512, fmt: str = "JPEG", kind: str = "preview") -> Preview:
    """Encode the first image of a batch for a progress preview."""
    img = tensor_to_pil(image[:1])[0]
    if max(img.size) > max_size:
        img.thumbnail((max_size, max_size))
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return Preview(format=fmt, data=buf.getvalue(), kind=kind)


def batch(images: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(images), dim=0)
