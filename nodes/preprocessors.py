"""ControlNet preprocessors."""

from __future__ import annotations

from typing import Annotated, Any

import cv2
import numpy as np
import torch

from kiln import engine
from kiln.engine import Float, NodeError, Socket
from kiln.nodes.common import check_image, to_uint8


class Canny(engine.Node):
    """Edge map (white edges on black) of an image, for a canny ControlNet. Thresholds are fractions of
    the full intensity range; gradients between them count as edges only when connected to a strong edge."""

    category = "image/preprocessors"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[Any, Socket("IMAGE")],
        low_threshold: Annotated[float, Float(min=0.01, max=0.99, step=0.01)] = 0.4,
        high_threshold: Annotated[float, Float(min=0.01, max=0.99, step=0.01)] = 0.8,
    ):
        image = check_image(image, "Canny")
        if low_threshold > high_threshold:
            raise NodeError(
                f"low_threshold {low_threshold} is above high_threshold {high_threshold}",
                input_name="low_threshold",
                hint="set low_threshold <= high_threshold",
            )
        out = []
        for arr in to_uint8(image[..., :3] if image.shape[-1] >= 3 else image.repeat(1, 1, 1, 3)):
            gray = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
            edges = cv2.Canny(gray, low_threshold * 255, high_threshold * 255, L2gradient=True)
            out.append(torch.from_numpy(edges.astype(np.float32) / 255.0))
        return torch.stack(out)[..., None].repeat(1, 1, 1, 3)


NODES = [Canny]
