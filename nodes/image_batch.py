"""Image batch nodes with ComfyUI's names, inputs and behaviour: join two batches, take a slice, repeat,
and regroup a list of batches into batches of a chosen size."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from kiln.engine import Int, Node, NodeError, Output, Socket, TensorEstimate

from .common import check_image
from .image import scale_image

IMAGE = Socket("IMAGE")


def _non_empty(image: torch.Tensor, node: str, input_name: str = "image") -> torch.Tensor:
    check_image(image, node, input_name)
    if image.shape[0] == 0:
        raise NodeError(
            f"{node} got an empty batch (0 images)",
            input_name=input_name,
            hint="connect a node that produces at least one image",
        )
    return image


def _with_alpha(image: torch.Tensor) -> torch.Tensor:
    """Add an opaque alpha channel to an RGB batch (ComfyUI pads the missing channel with ones)."""
    return F.pad(image, (0, 1), mode="constant", value=1.0)


class ImageBatch(Node):
    """Join two image batches into one. ``image2`` is rescaled (bilinear, centre crop) to ``image1``'s size;
    an RGB batch joined with an RGBA one gets an opaque alpha channel."""

    display_name = "Batch Images"
    category = "image"
    outputs = ("IMAGE",)

    def run(self, image1: Annotated[torch.Tensor, IMAGE], image2: Annotated[torch.Tensor, IMAGE]) -> torch.Tensor:
        check_image(image1, "ImageBatch", "image1")
        check_image(image2, "ImageBatch", "image2")
        c1, c2 = image1.shape[-1], image2.shape[-1]
        if c1 != c2:
            if {c1, c2} != {3, 4}:
                raise NodeError(
                    f"cannot batch images with {c1} and {c2} channels",
                    input_name="image2",
                    hint="convert both to RGB or RGBA first",
                )
            image1, image2 = (image1, _with_alpha(image2)) if c1 > c2 else (_with_alpha(image1), image2)
        if image2.shape[1:3] != image1.shape[1:3] and image2.shape[0] > 0:
            image2 = scale_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
        return torch.cat((image1, image2.to(image1.dtype)), dim=0)


class ImageFromBatch(Node):
    """Take ``length`` images starting at ``batch_index``. As in ComfyUI an index past the end selects the
    last image and the length is cut to what the batch holds."""

    display_name = "ImageFromBatch"
    category = "image/batch"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        batch_index: Annotated[int, Int(min=0, max=4095, tooltip="first image to take (0-based)")] = 0,
        length: Annotated[int, Int(min=1, max=4096, tooltip="how many images to take")] = 1,
    ) -> torch.Tensor:
        _non_empty(image, "ImageFromBatch")
        if batch_index < 0 or length < 1:
            raise NodeError(
                f"batch_index {batch_index} / length {length} out of range",
                input_name="batch_index" if batch_index < 0 else "length",
                hint="batch_index must be >= 0 and length >= 1",
            )
        start = min(image.shape[0] - 1, batch_index)
        count = min(image.shape[0] - start, length)
        return image[start : start + count].clone()


class RepeatImageBatch(Node):
    """Repeat the whole batch ``amount`` times (a batch [a, b] with amount 2 gives [a, b, a, b])."""

    display_name = "RepeatImageBatch"
    category = "image/batch"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        amount: Annotated[int, Int(min=1, max=4096)] = 1,
    ) -> torch.Tensor:
        check_image(image, "RepeatImageBatch")
        if amount < 1:
            raise NodeError(f"amount must be at least 1, got {amount}", input_name="amount")
        return image.repeat((amount, 1, 1, 1))

    @classmethod
    def estimate_outputs(cls, image: TensorEstimate | None = None, amount: int = 1, **_: Any) -> tuple | None:
        if image is None or len(image.shape) != 4:
            return None
        return (image.with_shape(image.shape[0] * amount, *image.shape[1:]),)


class RebatchImages(Node):
    """Regroup a list of image batches into batches of ``batch_size`` images (the last may be smaller).
    Takes the whole list at once and outputs a list."""

    display_name = "Rebatch Images"
    category = "image/batch"
    input_is_list = True
    outputs = (Output("IMAGE", is_list=True),)

    def run(
        self,
        images: Annotated[list, IMAGE],
        batch_size: Annotated[list, Int(min=1, max=4096)] = 1,  # type: ignore[assignment]
    ) -> list[torch.Tensor]:
        size = batch_size[0] if isinstance(batch_size, (list, tuple)) else batch_size
        if not isinstance(size, int) or size < 1:
            raise NodeError(f"batch_size must be a whole number >= 1, got {size!r}", input_name="batch_size")
        frames: list[torch.Tensor] = []
        for i, batch in enumerate(images if isinstance(images, (list, tuple)) else [images]):
            check_image(batch, "RebatchImages", "images")
            if frames and batch.shape[1:] != frames[0].shape[1:] and batch.shape[0]:
                raise NodeError(
                    f"list item {i} has images of {tuple(batch.shape[1:])} (height, width, channels) but "
                    f"earlier items have {tuple(frames[0].shape[1:])}; images of different sizes cannot share "
                    "a batch",
                    input_name="images",
                    hint="scale the images to one size first (e.g. ImageScale)",
                )
            frames.extend(batch[j : j + 1] for j in range(batch.shape[0]))
        return [torch.cat(frames[i : i + size], dim=0) for i in range(0, len(frames), size)]


NODES = [ImageBatch, ImageFromBatch, RepeatImageBatch, RebatchImages]
