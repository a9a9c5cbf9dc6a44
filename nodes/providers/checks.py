"""Output validation shared by ValidateImage and the sinks' ``validate`` option: reject blank,
single-colour, corrupt (NaN, out of range) or too small images with an error that names the image."""

from __future__ import annotations

import torch

from kiln.engine import NodeError
from kiln.nodes.common import check_image


def describe_problem(img: torch.Tensor, min_std: float, min_size: int) -> str | None:
    """Why one ``[H, W, C]`` image is unusable, or None.

    The spread test reads a 2x2-strided sample (a quarter of the pixels), which keeps validation cheap
    next to encoding; range and finiteness are checked on every pixel.
    """
    h, w = int(img.shape[0]), int(img.shape[1])
    if h < min_size or w < min_size:
        return f"is {w}x{h}, smaller than {min_size}x{min_size}"
    lo, hi = torch.aminmax(img)
    lo, hi = float(lo), float(hi)
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        return "holds NaN or infinite values (a broken decode or upstream node)"
    if lo < -1e-3 or hi > 1 + 1e-3:
        return f"has values in [{lo:.3g}, {hi:.3g}], outside 0..1"
    c = min(3, int(img.shape[-1]))
    sample = img[::2, ::2, :c] if h > 1 and w > 1 else img[..., :c]
    std = float(sample.reshape(-1, c).std(dim=0, correction=0).max()) if hi - lo >= min_std else 0.0
    if std < min_std:
        mean = float(sample.mean())
        kind = "blank (black)" if mean < 0.02 else "blank (white)" if mean > 0.98 else "a single colour"
        return f"is {kind}: pixel spread {std:.4f} is below min_std {min_std:g}"
    return None


def check_images(
    images: torch.Tensor, node: str, input_name: str = "images", min_std: float = 0.004, min_size: int = 1
) -> torch.Tensor:
    check_image(images, node, input_name)
    for i in range(images.shape[0]):
        problem = describe_problem(images[i], min_std, min_size)
        if problem:
            raise NodeError(
                f"image {i} of {images.shape[0]} {problem}",
                input_name=input_name,
                hint="the generator returned an unusable image: change the prompt or seed and run again, "
                "or lower min_std if flat images are intended",
            )
    return images
