"""Tiled VAE decode and encode: large images in overlapping tiles, blended so no seam shows.

Each pass cuts the input into tiles that overlap by ``overlap``, runs the VAE on each, and blends the results
with weights that ramp linearly across the overlap. As ComfyUI does, three passes with differently shaped tiles
(square, wide, tall) are averaged, so a seam of one pass is covered by the interior of another. The temporal
inputs exist for video VAEs and are accepted but unused for images.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Int, Output, Socket, TensorEstimate
from kiln.engine.context import current
from kiln.nodes.common import check_image
from kiln.nodes.latent import (
    check_latent,
    check_vae,
    check_vae_channels,
    decode_raw,
    decoded_estimate,
    encode_raw,
    from_image,
    to_image,
)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one axis begin: every ``tile - overlap``; the last one may be shorter."""
    if size <= tile:
        return [0]
    out = []
    for pos in range(0, size - overlap, tile - overlap):
        out.append(max(0, min(size - overlap, pos)))
    return out


def _ramp(out: torch.Tensor, dim: int, feather: int) -> None:
    """Weights that rise from 1/feather to 1 over the first and last ``feather`` entries along ``dim``."""
    if feather <= 0 or feather >= out.shape[dim]:
        return
    for t in range(feather):
        a = (t + 1) / feather
        out.narrow(dim, t, 1).mul_(a)
        out.narrow(dim, out.shape[dim] - 1 - t, 1).mul_(a)


def tiled_apply(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    tile: tuple[int, int],
    overlap: int,
    scale: float,
    out_channels: int,
    tick: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Apply ``fn`` (which resizes by ``scale``) to ``x`` ``[B, C, H, W]`` tile by tile, blending the overlaps.

    ``tile`` is (height, width) in input pixels. A batch item that fits in one tile is processed whole.
    """
    b, _, h, w = x.shape
    oh, ow = round(h * scale), round(w * scale)
    result = torch.empty((b, out_channels, oh, ow), dtype=torch.float32)
    th, tw = tile
    feather = round(overlap * scale)
    for i in range(b):
        item = x[i : i + 1]
        if h <= th and w <= tw:
            result[i : i + 1] = fn(item).float()
            if tick:
                tick()
            continue
        acc = torch.zeros((1, out_channels, oh, ow))
        weight = torch.zeros((1, 1, oh, ow))
        for y0, x0 in itertools.product(_starts(h, th, overlap), _starts(w, tw, overlap)):
            part = item[:, :, y0 : y0 + min(th, h - y0), x0 : x0 + min(tw, w - x0)]
            out = fn(part).float()
            mask = torch.ones((1, 1, out.shape[2], out.shape[3]))
            _ramp(mask, 2, feather)
            _ramp(mask, 3, feather)
            oy, ox = round(y0 * scale), round(x0 * scale)
            acc[:, :, oy : oy + out.shape[2], ox : ox + out.shape[3]] += out * mask
            weight[:, :, oy : oy + out.shape[2], ox : ox + out.shape[3]] += mask
            if tick:
                tick()
        result[i : i + 1] = acc / weight
    return result


def three_pass(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    overlap: int,
    scale: float,
    out_channels: int,
    multiple: int = 1,
) -> torch.Tensor:
    """The average of square, wide and tall tilings (tiles ``tile``, ``tile/2 x 2*tile``, ``2*tile x tile/2``).

    ``multiple`` keeps tile sides and overlap on the VAE's grid when tiling pixels for the encoder.
    """

    def snap(v: int) -> int:
        return max(multiple, v - v % multiple)

    plans = []
    for th, tw in [(snap(tile), snap(tile)), (snap(tile // 2), snap(tile * 2)), (snap(tile * 2), snap(tile // 2))]:
        ov = _fit(overlap, th, tw)
        plans.append((th, tw, ov - ov % multiple))
    ctx = current()
    total = sum(
        x.shape[0] * len(_starts(x.shape[2], th, ov)) * len(_starts(x.shape[3], tw, ov)) for th, tw, ov in plans
    )
    done = [0]

    def tick() -> None:
        done[0] += 1
        if ctx is not None:
            ctx.progress(done[0], total)

    acc = None
    for th, tw, ov in plans:
        out = tiled_apply(x, fn, (th, tw), ov, scale, out_channels, tick)
        acc = out if acc is None else acc + out
    assert acc is not None
    return acc / len(plans)


def _fit(overlap: int, th: int, tw: int) -> int:
    """An overlap at least as large as a tile would never advance: use a quarter of the tile instead."""
    smallest = min(th, tw)
    return overlap if overlap < smallest else smallest // 4


class VAEDecodeTiled(engine.Node):
    """Decodes latents tile by tile, for images too large to decode at once; the tiles overlap and are
    blended so no seam shows."""

    display_name = "VAE Decode (Tiled)"
    category = "_for_testing"
    outputs = [Output("IMAGE", tooltip="Pixels decoded from the latent.")]

    def run(
        self,
        samples: Annotated[Any, Socket("LATENT", tooltip="Latent samples to turn into pixels.")],
        vae: Annotated[Any, Socket("VAE", tooltip="VAE whose decoder maps latents to pixels.")],
        tile_size: Annotated[int, Int(min=64, max=4096, step=32, tooltip="Tile side in pixels.")] = 512,
        overlap: Annotated[int, Int(min=0, max=4096, step=32, tooltip="Overlap between tiles in pixels.")] = 64,
        temporal_size: Annotated[
            int, Int(min=8, max=4096, step=4, tooltip="Frames per tile for video VAEs (unused for images).")
        ] = 64,
        temporal_overlap: Annotated[
            int, Int(min=4, max=4096, step=4, tooltip="Frame overlap for video VAEs (unused for images).")
        ] = 8,
    ):
        vae = check_vae(vae)
        latent = check_latent(samples)["samples"]
        check_vae_channels(vae, latent)
        if tile_size < overlap * 4:  # as ComfyUI: the overlap is at most a quarter of the tile
            overlap = tile_size // 4
        f = vae.downscale
        raw = three_pass(
            latent, lambda z: decode_raw(vae, z), max(1, tile_size // f), overlap // f, float(f), out_channels=3
        )
        return to_image(raw)

    @classmethod
    def estimate_outputs(cls, samples: TensorEstimate | None = None, **_: Any) -> tuple:
        return (decoded_estimate(samples),)

    @classmethod
    def estimate_memory(cls, samples: TensorEstimate | None = None, **_: Any) -> int | None:
        """Tiles bound the decoder's activations, not the result: the three passes keep the running sum,
        the pass in progress and their new sum (three decoded batches), and ``to_image`` copies again."""
        image = decoded_estimate(samples)
        return None if image is None else 4 * image.nbytes


class VAEEncodeTiled(engine.Node):
    """Encodes an image tile by tile, for images too large to encode at once (centre-cropped to a multiple
    of 8, as VAE Encode)."""

    display_name = "VAE Encode (Tiled)"
    category = "_for_testing"
    outputs = ("LATENT",)

    def run(
        self,
        pixels: Annotated[Any, Socket("IMAGE")],
        vae: Annotated[Any, Socket("VAE")],
        tile_size: Annotated[int, Int(min=64, max=4096, step=64, tooltip="Tile side in pixels.")] = 512,
        overlap: Annotated[int, Int(min=0, max=4096, step=32, tooltip="Overlap between tiles in pixels.")] = 64,
        temporal_size: Annotated[
            int, Int(min=8, max=4096, step=4, tooltip="Frames per tile for video VAEs (unused for images).")
        ] = 64,
        temporal_overlap: Annotated[
            int, Int(min=4, max=4096, step=4, tooltip="Frame overlap for video VAEs (unused for images).")
        ] = 8,
    ):
        vae = check_vae(vae)
        f = vae.downscale
        x = from_image(check_image(pixels, "VAEEncodeTiled", "pixels"), f)
        z = three_pass(x, lambda p: encode_raw(vae, p), tile_size, overlap, 1.0 / f, vae.latent_channels, multiple=f)
        return {"samples": z}


NODES = [VAEDecodeTiled, VAEEncodeTiled]
