"""Minimal stand-ins for image-family nodes, registered by the tests only when the real ones are absent."""
from __future__ import annotations

from typing import Annotated, Any

import torch
from PIL import Image

import engine
from engine import Int, Socket, String

from nodes.common import mask_from_alpha, pil_to_tensor


class _LoadImage(engine.Node):
    name = "LoadImage"
    outputs = ("IMAGE", "MASK")

    def run(self, image: Annotated[str, String()] = ""):
        img = Image.open(engine.current().folders.safe_path("input", image))
        return pil_to_tensor(img), mask_from_alpha(img)


class _ImagePadForOutpaint(engine.Node):
    name = "ImagePadForOutpaint"
    outputs = ("IMAGE", "MASK")

    def run(self, image: Annotated[Any, Socket("IMAGE")], left: Annotated[int, Int(min=0)] = 0,
            top: Annotated[int, Int(min=0)] = 0, right: Annotated[int, Int(min=0)] = 0,
            bottom: Annotated[int, Int(min=0)] = 0, feathering: Annotated[int, Int(min=0)] = 40):
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
        out[:, top:top + h, left:left + w] = image
        mask = torch.ones((h + top + bottom, w + left + right))
        mask[top:top + h, left:left + w] = 0
        return out, mask[None]


FALLBACKS = [_LoadImage, _ImagePadForOutpaint]
