"""Mask nodes with ComfyUI's names and inputs. MASK is float32 [B, H, W] in 0..1 (1 = the area to change)."""

from __future__ import annotations

from typing import Annotated

import torch

from kiln.engine import MAX_RESOLUTION, Combo, Float, Int, Node, Socket

from .common import check_image, check_mask


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


NODES = [SolidMask, InvertMask, ImageToMask, MaskToImage]
