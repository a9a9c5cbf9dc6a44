"""Run-time patches on the UNet's structure: FreeU, FreeU_V2, HyperTile and Kohya Deep Shrink.

The structural patches install forward hooks / attention processors on the shared diffusers UNet for the
duration of a run (``ModelPatch.unet_hooks``) and remove them on exit, also when the run fails. ComfyUI
names places in the LDM layout; here is how they map onto diffusers' modules:

- an *output block*'s ``(h, skip)`` pair (ComfyUI's ``output_block_patch``) is the input of each up-block
  resnet, ``cat([h, skip])``: its first channels are ``h`` (the previous resnet's output, or the block's
  input for the first resnet);
- *input block* ``N`` is ``conv_in`` (N = 0), then each down block's (resnet, attention) layers and its
  downsampler, in order (``ldm_keys.UnetLayout`` numbers them the same way);
- ``attn1`` (self-attention) is every transformer block's ``attn1`` module.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Boolean, Combo, Float, Int, NodeError, Socket
from kiln.nodes.latent import resize_latent
from kiln.nodes.model_guidance_patches import check_model
from kiln.nodes.sd.model_patch import (
    ModelPatch,
    StepState,
    attention_modules,
    effective_sampling,
    module_hooks,
    swap_attention,
)

# -- FreeU ----------------------------------------------------------------------------------------------


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scales the lowest spatial frequencies (a ``2 * threshold`` square around DC) of ``x`` by ``scale``."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones(freq.shape[-2:], device=x.device)
    ch, cw = h // 2, w // 2
    mask[max(ch - threshold, 0) : ch + threshold, max(cw - threshold, 0) : cw + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def up_resnets(unet: Any) -> list[tuple[torch.nn.Module, int]]:
    """``(resnet, channels of h)`` for every up-block resnet, whose input is ``cat([h, skip])``."""
    rev = list(reversed(list(unet.config.block_out_channels)))
    out = []
    for j, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            h_ch = (rev[j - 1] if j > 0 else rev[0]) if i == 0 else rev[j]
            if 0 < h_ch < resnet.in_channels:
                out.append((resnet, h_ch))
    return out


class FreeUPatch(ModelPatch):
    """FreeU (Si et al. 2023): in the decoder, scale half of the backbone features ``h`` by ``b`` and the
    low frequencies of the skip features by ``s``; b1/s1 where h has 4x the model's base channels, b2/s2
    where it has 2x. Version 2 scales by ``b`` in proportion to each location's mean activation."""

    def __init__(self, b1: float, b2: float, s1: float, s2: float, version: int):
        self.b1, self.b2, self.s1, self.s2 = float(b1), float(b2), float(s1), float(s2)
        self.version = version

    def token(self) -> str:
        return f"freeu{self.version}:{self.b1!r},{self.b2!r},{self.s1!r},{self.s2!r}"

    def scale_h(self, h: torch.Tensor, b: float) -> torch.Tensor:
        half = h.shape[1] // 2
        if self.version == 1:
            factor: Any = b
        else:
            mean = h.mean(1, keepdim=True)
            flat = mean.flatten(1)
            lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
            hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
            factor = (b - 1.0) * ((mean - lo) / (hi - lo)) + 1.0
        return torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)

    def unet_hooks(self, unet: Any, state: StepState) -> contextlib.AbstractContextManager:
        base = int(unet.config.block_out_channels[0])
        scales = {base * 4: (self.b1, self.s1), base * 2: (self.b2, self.s2)}
        hooks = []
        for resnet, h_ch in up_resnets(unet):
            if h_ch not in scales or scales[h_ch] == (1.0, 1.0):
                continue
            b, s = scales[h_ch]

            def pre(module: Any, args: tuple, h_ch: int = h_ch, b: float = b, s: float = s) -> tuple:
                x = args[0]
                h, skip = x[:, :h_ch], x[:, h_ch:]
                if b != 1.0:
                    h = self.scale_h(h, b)
                if s != 1.0:
                    skip = fourier_filter(skip, 1, s)
                return (torch.cat([h, skip], dim=1), *args[1:])

            hooks.append((resnet, "pre", pre))
        return module_hooks(hooks)


_FREEU_B: dict[str, Any] = dict(min=0.0, max=10.0, step=0.01)


class FreeU(engine.Node):
    """FreeU: re-weights the UNet decoder's backbone and skip features for more detail, at no cost."""

    category = "model_patches/unet"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        b1: Annotated[float, Float(**_FREEU_B)] = 1.1,
        b2: Annotated[float, Float(**_FREEU_B)] = 1.2,
        s1: Annotated[float, Float(**_FREEU_B)] = 0.9,
        s2: Annotated[float, Float(**_FREEU_B)] = 0.2,
    ):
        return check_model(model).with_model_patch(FreeUPatch(b1, b2, s1, s2, 1))


class FreeU_V2(engine.Node):  # noqa: N801 (ComfyUI's class name)
    """FreeU version 2: the backbone scale follows each location's mean activation."""

    category = "model_patches/unet"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        b1: Annotated[float, Float(**_FREEU_B)] = 1.3,
        b2: Annotated[float, Float(**_FREEU_B)] = 1.4,
        s1: Annotated[float, Float(**_FREEU_B)] = 0.9,
        s2: Annotated[float, Float(**_FREEU_B)] = 0.2,
    ):
        return check_model(model).with_model_patch(FreeUPatch(b1, b2, s1, s2, 2))


# -- HyperTile ------------------------------------------------------------------------------------------


def tile_count(size: int, min_tile: int, options: int, seed: int) -> int:
    """How many tiles to cut ``size`` into: one of the ``options`` largest tile sizes (>= min_tile) that
    divide it, chosen by a generator seeded with ``seed``."""
    min_tile = min(min_tile, size)
    sizes = [t for t in range(min_tile, size + 1) if size % t == 0]
    counts = [size // t for t in sizes[:options]]
    return counts[random.Random(seed).randint(0, len(counts) - 1)]


class TilingAttention:
    """Self-attention within tiles of the feature map (HyperTile)."""

    def __init__(self, inner: Any, patch: HyperTilePatch, run: dict):
        self.inner, self.patch, self.run = inner, patch, run

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kw):
        shape = self.run.get("latent_hw")
        if shape is None or hidden_states.ndim != 3 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        seq = hidden_states.shape[1]
        h, w = shape
        depth = None
        for d in range(self.patch.max_depth + 1):
            if h * w == seq:
                depth = d
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if depth is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        factor = 2**depth if self.patch.scale_depth else 1
        tile = self.patch.latent_tile * factor
        nh = tile_count(h, tile, self.patch.swap_size, self.run["counter"])
        nw = tile_count(w, tile, self.patch.swap_size, self.run["counter"] + 1)
        self.run["counter"] += 2
        if nh * nw == 1:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        b, _, c = hidden_states.shape
        th, tw = h // nh, w // nw
        tiles = hidden_states.view(b, nh, th, nw, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, th * tw, c)
        out = self.inner(attn, tiles, None, attention_mask, **kw)
        c_out = out.shape[-1]
        return out.view(b, nh, nw, th, tw, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c_out)


class HyperTilePatch(ModelPatch):
    def __init__(self, tile_size: int, swap_size: int, max_depth: int, scale_depth: bool):
        self.tile_size, self.swap_size = int(tile_size), int(swap_size)
        self.max_depth, self.scale_depth = int(max_depth), bool(scale_depth)
        self.latent_tile = max(32, self.tile_size) // 8

    def token(self) -> str:
        return f"hypertile:{self.tile_size},{self.swap_size},{self.max_depth},{self.scale_depth}"

    @contextlib.contextmanager
    def unet_hooks(self, unet: torch.nn.Module, state: StepState) -> Iterator[None]:
        run: dict[str, Any] = {"counter": 1}  # the tile choices restart with every run: same seed, same image

        def record(module: Any, args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs["sample"]
            run["latent_hw"] = tuple(sample.shape[-2:])

        procs = {n: TilingAttention(m.processor, self, run) for n, m in attention_modules(unet, "attn1").items()}
        with module_hooks([(unet, "pre_kwargs", record)]), swap_attention(unet, procs):
            yield


class HyperTile(engine.Node):
    """HyperTile: self-attention within tiles of the latent instead of across all of it, which is faster
    on large images. Tiles of about tile_size pixels; swap_size picks among that many tile sizes per step."""

    category = "model_patches/unet"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        tile_size: Annotated[int, Int(min=1, max=2048)] = 256,
        swap_size: Annotated[int, Int(min=1, max=128)] = 2,
        max_depth: Annotated[int, Int(min=0, max=10)] = 0,
        scale_depth: Annotated[bool, Boolean()] = False,
    ):
        return check_model(model).with_model_patch(HyperTilePatch(tile_size, swap_size, max_depth, scale_depth))


# -- Kohya Deep Shrink ----------------------------------------------------------------------------------

SHRINK_METHODS = ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]


def input_stages(unet: Any) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``(module that outputs it, module that reads it next)`` for each LDM input block, in order."""
    outs: list[torch.nn.Module] = [unet.conv_in]
    ins: list[torch.nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            ins.append(resnet)
            outs.append(attns[j] if attns is not None and j < len(attns) else resnet)
        for down in block.downsamplers or []:
            ins.append(down)
            outs.append(down)
    readers = ins[1:] + [unet.mid_block]
    return list(zip(outs, readers))


def _resize_first(value: Any, size: tuple[int, int], method: str) -> Any:
    """Resizes a tensor, or the first tensor of a tuple (a transformer's ``return_dict=False`` output)."""
    t = value[0] if isinstance(value, tuple) else value
    if tuple(t.shape[-2:]) == tuple(size):
        return value
    r = resize_latent(t, size[0], size[1], method).to(t.dtype)
    return (r, *value[1:]) if isinstance(value, tuple) else r


class DeepShrinkPatch(ModelPatch):
    def __init__(
        self,
        block_number: int,
        factor: float,
        sigma_start: float,
        sigma_end: float,
        after_skip: bool,
        down_method: str,
        up_method: str,
        label: str,
    ):
        self.block_number, self.factor = int(block_number), float(factor)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.after_skip, self.down_method, self.up_method = bool(after_skip), down_method, up_method
        self.label = label

    def token(self) -> str:
        return f"deep_shrink:{self.label}"

    def active(self, state: StepState) -> bool:
        return self.sigma_end <= state.sigma <= self.sigma_start

    def shrink(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        return resize_latent(t, round(h / self.factor), round(w / self.factor), self.down_method).to(t.dtype)

    def unet_hooks(self, unet: Any, state: StepState) -> contextlib.AbstractContextManager:
        hooks: list[tuple[torch.nn.Module, str, Any]] = []
        stages = input_stages(unet)
        if self.block_number < len(stages):
            producer, reader = stages[self.block_number]
            if self.after_skip:

                def pre(module: Any, args: tuple) -> tuple | None:
                    return (self.shrink(args[0]), *args[1:]) if self.active(state) else None

                hooks.append((reader, "pre", pre))
            else:

                def post(module: Any, args: tuple, output: Any) -> Any:
                    if not self.active(state):
                        return None
                    if isinstance(output, tuple):
                        return (self.shrink(output[0]), *output[1:])
                    return self.shrink(output)

                hooks.append((producer, "forward", post))
        # on the way up, h is brought back to its skip's size wherever they differ (ComfyUI's output patch)
        skips: dict[int, tuple] = {}
        for j, block in enumerate(unet.up_blocks):

            def block_pre(module: Any, args: tuple, kwargs: dict, j: int = j) -> tuple:
                tup = kwargs["res_hidden_states_tuple"]
                skips[j] = tup
                kwargs["hidden_states"] = _resize_first(kwargs["hidden_states"], tup[-1].shape[-2:], self.up_method)
                return args, kwargs

            hooks.append((block, "pre_kwargs", block_pre))
            attns = getattr(block, "attentions", None)
            for i in range(1, len(block.resnets)):
                producer = attns[i - 1] if attns is not None else block.resnets[i - 1]

                def fix(module: Any, args: tuple, output: Any, j: int = j, i: int = i) -> Any:
                    return _resize_first(output, skips[j][-(i + 1)].shape[-2:], self.up_method)

                hooks.append((producer, "forward", fix))
        return module_hooks(hooks)


class PatchModelAddDownscale(engine.Node):
    """Kohya Deep Shrink: for the first steps, the UNet works on a downscaled copy of its features after one
    input block and scales them back up on the way out, which avoids repeated subjects at high resolutions."""

    display_name = "PatchModelAddDownscale (Kohya Deep Shrink)"
    category = "model_patches/unet"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        block_number: Annotated[int, Int(min=1, max=32, step=1)] = 3,
        downscale_factor: Annotated[float, Float(min=0.1, max=9.0, step=0.001)] = 2.0,
        start_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.0,
        end_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.35,
        downscale_after_skip: Annotated[bool, Boolean()] = True,
        downscale_method: Annotated[str, Combo(SHRINK_METHODS, v3=True)] = "bicubic",
        upscale_method: Annotated[str, Combo(SHRINK_METHODS, v3=True)] = "bicubic",
    ):
        check_model(model)
        n = len(input_stages(model.unet))
        if block_number >= n:
            raise NodeError(
                f"block_number {block_number} is past this model's last input block ({n - 1})",
                input_name="block_number",
                hint=f"use a block between 1 and {n - 1}",
            )
        ms = effective_sampling(model)
        label = (
            f"{block_number},{downscale_factor!r},{start_percent!r},{end_percent!r},{downscale_after_skip},"
            f"{downscale_method},{upscale_method}"
        )
        patch = DeepShrinkPatch(
            block_number,
            downscale_factor,
            ms.percent_to_sigma(start_percent),
            ms.percent_to_sigma(end_percent),
            downscale_after_skip,
            downscale_method,
            upscale_method,
            label,
        )
        return model.with_model_patch(patch)


NODES = [
    FreeU,
    FreeU_V2,
    HyperTile,
    PatchModelAddDownscale,
]
