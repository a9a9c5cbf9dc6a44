"""CONDITIONING entries made ready for one sampling run, and the batched model evaluation over them.

The semantics are ComfyUI's (its ``calc_cond_batch``), written for Kiln. Each entry ``[embedding, options]``
becomes a :class:`Unit`:

- ``area``: ``(h, w, y, x)`` in latent units, or ``("percentage", h, w, y, x)`` as fractions of the latent;
  the unit's prediction covers only that window. Without a mask its edges are feathered (a linear ramp of
  up to 8 latent pixels, a quarter of the window at most) on every side that is not the latent's border.
- ``strength``: the unit's weight. ``mask`` (resized to the latent), ``mask_strength``: a per-pixel weight;
  ``set_area_to_bounds``: the window shrinks to the mask's bounding box (at least 8x8).
- ``start_percent`` / ``end_percent``: the unit takes part only while the current sigma lies between the
  model's sigmas at those percents of the denoising.
- ``control`` (ControlNet chain), ``pooled_output`` and SDXL's size/crop options, ``concat_latent_image`` /
  ``concat_mask`` (for inpainting UNets with extra input channels).

The predictions of the active units of one conditioning are summed with their weights and divided by the
summed weights; where no unit covers a pixel the prediction is 0, as in ComfyUI. For every unit with an
area, the other conditionings get a unit over the same area (from their smallest entry that covers it)
unless they have one, so positive and negative stay balanced region by region.

Units with the same input window, ControlNet chain and extra inputs run in one UNet call.

Read but not acted on: ``aesthetic_score`` (only SDXL refiner UNets take it; Kiln loads none) and
``noise_augmentation`` (unCLIP models). SDXL's size options default to the latent's size in pixels.

One file past the usual size: preparing the units and evaluating them are one mechanism, read together.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine import NodeError

from .model_patch import StepState

# Options that describe what the model is conditioned on (ComfyUI's "model conds"); an area copied to another
# conditioning takes these from that conditioning and everything else (area, strength, range) from the unit.
MODEL_KEYS = frozenset(
    {
        "pooled_output",
        "width",
        "height",
        "crop_w",
        "crop_h",
        "target_width",
        "target_height",
        "aesthetic_score",
        "concat_latent_image",
        "concat_mask",
        "noise_augmentation",
    }
)

# A latent of 4 channels showing mid-grey pixels (the "blank" image an inpainting UNet sees without one).
_BLANK_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)
_FEATHER = 8
_MAX_PAD = 4  # embeddings of different lengths share a batch when the padded length is at most 4x the shorter


def batch_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with ``n`` items along dim 0: itself, repeated whole, or its first item repeated."""
    if t.shape[0] == n:
        return t
    if n % t.shape[0] == 0:
        return t.repeat(n // t.shape[0], *([1] * (t.ndim - 1)))
    return t[:1].repeat(n, *([1] * (t.ndim - 1)))


def check_conditioning(model: Any, cond: Any, input_name: str) -> list:
    """``cond`` as a list of ``[embedding, options]``, or a NodeError naming ``input_name``."""
    if not isinstance(cond, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)
        for e in cond
    ):
        raise NodeError(
            f"{input_name} is not a CONDITIONING",
            input_name=input_name,
            hint="connect the output of CLIPTextEncode (or another conditioning node)",
        )
    want = getattr(getattr(getattr(model, "unet", None), "config", None), "cross_attention_dim", None)
    for emb, _ in cond:
        if emb.ndim != 3:
            raise NodeError(
                f"{input_name} holds an embedding of shape {tuple(emb.shape)}; expected [batch, tokens, size]",
                input_name=input_name,
                hint="connect the output of CLIPTextEncode (or another conditioning node)",
            )
        if want is not None and emb.shape[-1] != want:
            raise NodeError(
                f"{input_name} has embeddings of size {emb.shape[-1]}, this model expects {want}",
                input_name=input_name,
                hint="encode the prompt with the CLIP of the same checkpoint as the model",
            )
    return list(cond)


@dataclass(eq=False)
class Unit:
    """One conditioning entry, ready for a run of a given latent shape."""

    name: str  # the conditioning it belongs to ("positive", "negative", ...)
    emb: torch.Tensor  # [B, tokens, D] on the model's device
    area: tuple[int, int, int, int] | None  # h, w, y, x (latent units), inside the latent
    weight: float | torch.Tensor  # scalar, or [B, 1, h, w] over the area (or the whole latent)
    sigma_hi: float
    sigma_lo: float
    control: Any
    added: dict | None  # SDXL: text_embeds, time_ids
    concat: torch.Tensor | None  # extra UNet input channels [B, k, h, w]

    def active(self, sigma: float) -> bool:
        return self.sigma_lo <= sigma <= self.sigma_hi

    @property
    def window(self) -> tuple[int, int] | None:
        return None if self.area is None else (self.area[0], self.area[1])


def _resolve(name: str, emb: torch.Tensor, opts: dict, hw: tuple[int, int], batch: int) -> tuple[torch.Tensor, dict]:
    """The entry with a numeric area and a mask of the latent's size."""
    h, w = hw
    o = dict(opts)
    area = o.get("area")
    if area is not None:
        if len(area) == 5 and area[0] == "percentage":
            _, ah, aw, ay, ax = area
            area = (max(1, round(ah * h)), max(1, round(aw * w)), round(ay * h), round(ax * w))
        if len(area) != 4:
            raise NodeError(f"{name} has an area of the wrong form {area!r}", input_name=name)
        o["area"] = tuple(int(a) for a in area)
    mask = o.get("mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            raise NodeError(
                f"{name} carries a mask of shape {tuple(getattr(mask, 'shape', ()))}; expected [batch, height, width]",
                input_name=name,
                hint="set the mask with ConditioningSetMask from a MASK",
            )
        m = mask.float()[None] if mask.ndim == 2 else mask.float()
        m = m[:batch]  # extra masks are ignored, as in ComfyUI
        if batch % m.shape[0] != 0:
            raise NodeError(
                f"{name} has a mask batch of {m.shape[0]} for a latent batch of {batch}",
                input_name=name,
                hint="use one mask, or one per latent in the batch",
            )
        if tuple(m.shape[1:]) != (h, w):
            m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        if o.get("set_area_to_bounds", False):
            nz = (m.abs().amax(0) != 0).nonzero()
            if len(nz) == 0:
                o["area"] = (8, 8, 0, 0)
            else:
                y0, x0 = (int(v) for v in nz.min(0).values)
                y1, x1 = (int(v) for v in nz.max(0).values)
                o["area"] = (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)
        o["mask"] = m
    return emb, o


def _pair_areas(resolved: dict[str, list[tuple[torch.Tensor, dict]]]) -> None:
    """For each entry with an area, give every other conditioning an entry over the same area (ComfyUI's
    balancing of positive and negative areas)."""
    for name, entries in resolved.items():
        for _, o in list(entries):
            area = o.get("area")
            if area is None:
                continue
            for other, theirs in resolved.items():
                if other == name:
                    continue
                smallest = None
                for e2, o2 in theirs:
                    a = o2.get("area")
                    if a is None:
                        if smallest is None:
                            smallest = (e2, o2)
                        continue
                    inside = area[2] >= a[2] and area[3] >= a[3] and a[0] + a[2] >= area[0] + area[2]
                    inside = inside and a[1] + a[3] >= area[1] + area[3]
                    if not inside:
                        continue
                    s_area = None if smallest is None else smallest[1].get("area")
                    if smallest is None or s_area is None or s_area[0] * s_area[1] > a[0] * a[1]:
                        smallest = (e2, o2)
                if smallest is None or smallest[1].get("area") == area:
                    continue
                copy = {k: v for k, v in o.items() if k not in MODEL_KEYS}
                copy.update({k: v for k, v in smallest[1].items() if k in MODEL_KEYS})
                theirs.append((smallest[0], copy))


def _clamp_area(name: str, area: tuple[int, int, int, int], hw: tuple[int, int]) -> tuple[int, int, int, int]:
    ah, aw, ay, ax = area
    ah, aw = min(hw[0] - ay, ah), min(hw[1] - ax, aw)
    if ah <= 0 or aw <= 0 or ay < 0 or ax < 0:
        raise NodeError(
            f"{name} has an area at y={ay}, x={ax} (latent units) outside the {hw[0]}x{hw[1]} latent",
            input_name=name,
            hint="move the area inside the image (ConditioningSetArea takes pixels: x and y below the image size)",
        )
    return ah, aw, ay, ax


def _feathered(weight: torch.Tensor, area: tuple[int, int, int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Linear ramps on the window's inner edges, so an area blends into its surroundings."""
    ah, aw, ay, ax = area
    for dim, (size, start, full) in enumerate(((ah, ay, hw[0]), (aw, ax, hw[1]))):
        ramp = min(_FEATHER, size // 4)
        axis = 2 + dim
        for t in range(ramp):
            f = (t + 1) / ramp
            if start != 0:
                weight.narrow(axis, t, 1).mul_(f)
            if size + start < full:
                weight.narrow(axis, size - 1 - t, 1).mul_(f)
    return weight


def _time_ids(o: dict, pixel_hw: tuple[int, int]) -> list[float]:
    h, w = pixel_hw
    height, width = o.get("height", h), o.get("width", w)
    return [
        height,
        width,
        o.get("crop_h", 0),
        o.get("crop_w", 0),
        o.get("target_height", height),
        o.get("target_width", width),
    ]


@dataclass
class RunSetup:
    """What every unit of a run shares: the latent's shape, device, model kind."""

    shape: tuple[int, ...]  # [B, C, h, w]
    device: torch.device
    dtype: torch.dtype
    pixel_hw: tuple[int, int]
    sdxl: bool
    extra_channels: int  # UNet input channels beyond the latent's (inpainting models: 5)
    ms: Any  # the effective sampling (percent_to_sigma)
    latent_image: torch.Tensor | None = None
    noise_mask: torch.Tensor | None = None
    context_dim: int | None = None  # the UNet's cross-attention size


def _concat_for(name: str, o: dict, setup: RunSetup) -> torch.Tensor:
    b, c, h, w = setup.shape
    mask = o.get("concat_mask", setup.noise_mask)
    image = o.get("concat_latent_image") if "concat_latent_image" in o else setup.latent_image
    if mask is not None:
        m = mask.float()
        m = m.reshape(-1, 1, *m.shape[-2:])
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = batch_to(m.round(), b)
        if image is None:
            raise NodeError(
                f"{name}: this inpainting model needs the image to inpaint",
                input_name=name,
                hint="use InpaintModelConditioning, or sample a latent made from an image",
            )
        img = image.float()
        if tuple(img.shape[-2:]) != (h, w):
            img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        parts = [m, batch_to(img, b)]
    else:
        blank = torch.ones(b, c, h, w)
        if c == len(_BLANK_LATENT):
            blank = blank * torch.tensor(_BLANK_LATENT).view(1, c, 1, 1)
        parts = [torch.ones(b, 1, h, w), blank]
    out = torch.cat(parts, dim=1)
    if out.shape[1] != setup.extra_channels:
        raise NodeError(
            f"{name}: the model takes {setup.extra_channels} extra input channels, the inpainting inputs give "
            f"{out.shape[1]}",
            input_name=name,
            hint="encode the image with this model's VAE (InpaintModelConditioning)",
        )
    return out.to(setup.device, setup.dtype)


def _unit(name: str, emb: torch.Tensor, o: dict, setup: RunSetup) -> Unit:
    b, _, h, w = setup.shape
    if setup.context_dim is not None and emb.shape[-1] != setup.context_dim:
        raise NodeError(
            f"{name} has embeddings of size {emb.shape[-1]}, this model expects {setup.context_dim}",
            input_name=name,
            hint="encode every prompt with the CLIP of the same checkpoint as the model",
        )
    hw = (h, w)
    area = o.get("area")
    if area is not None:
        area = _clamp_area(name, area, hw)
    strength = float(o.get("strength", 1.0))
    mask = o.get("mask")
    weight: float | torch.Tensor = strength
    if mask is not None:
        m = batch_to(mask, b)[:, None] * float(o.get("mask_strength", 1.0))
        if area is not None:
            m = m[:, :, area[2] : area[2] + area[0], area[3] : area[3] + area[1]]
        weight = (m * strength).to(setup.device, torch.float32)
    elif area is not None:
        weight = _feathered(torch.full((1, 1, area[0], area[1]), strength), area, hw).to(setup.device)
    ms = setup.ms
    sigma_hi = ms.percent_to_sigma(float(o["start_percent"])) if "start_percent" in o else math.inf
    sigma_lo = ms.percent_to_sigma(float(o["end_percent"])) if "end_percent" in o else -math.inf
    added = None
    if setup.sdxl:
        pooled = o.get("pooled_output")
        if pooled is None:
            raise NodeError(
                f"{name} lacks the pooled output SDXL needs",
                input_name=name,
                hint="encode the prompt with this model's CLIP (CLIPTextEncode or CLIPTextEncodeSDXL)",
            )
        ids = torch.tensor([_time_ids(o, setup.pixel_hw)], dtype=torch.float32)
        added = {
            "text_embeds": batch_to(pooled.float(), b).to(setup.device, setup.dtype),
            "time_ids": ids.repeat(b, 1).to(setup.device, setup.dtype),
        }
    concat = _concat_for(name, o, setup) if setup.extra_channels else None
    if concat is not None and area is not None:
        concat = concat[:, :, area[2] : area[2] + area[0], area[3] : area[3] + area[1]]
    return Unit(
        name=name,
        emb=batch_to(emb, b).to(setup.device, setup.dtype),
        area=area,
        weight=weight,
        sigma_hi=sigma_hi,
        sigma_lo=sigma_lo,
        control=o.get("control"),
        added=added,
        concat=concat,
    )


def prepare(conds: dict[str, list | None], setup: RunSetup) -> dict[str, list[Unit]]:
    """Units for each named conditioning (a ``None`` conditioning gets no units)."""
    b, _, h, w = setup.shape
    resolved = {
        name: [_resolve(name, e, o, (h, w), b) for e, o in cond] for name, cond in conds.items() if cond is not None
    }
    _pair_areas(resolved)
    return {name: [_unit(name, e, o, setup) for e, o in entries] for name, entries in resolved.items()}


def sigma_to_percent(ms: Any, sigma: float) -> float:
    """How far the denoising is at ``sigma``: 0 at the model's largest sigma, 1 at sigma 0."""
    n = int(getattr(ms, "num_timesteps", 1000))
    if sigma <= 0 or n <= 1:
        return 1.0
    t = float(ms.timestep(torch.tensor(float(sigma))))
    return min(max(1.0 - t / (n - 1), 0.0), 1.0)


def model_input(ms: Any, sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The UNet's input for ``x`` at ``sigma`` (the sampling's ``calculate_input``; EPS scaling otherwise)."""
    calc = getattr(ms, "calculate_input", None)
    if calc is not None:
        return calc(torch.tensor(sigma, dtype=torch.float32, device=x.device), x)
    return x * (1.0 / math.sqrt(sigma * sigma + 1.0))


def denoised(ms: Any, sigma: float, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The x0 prediction from the UNet's output (the sampling's ``calculate_denoised``)."""
    calc = getattr(ms, "calculate_denoised", None)
    if calc is not None:
        return calc(torch.tensor(sigma, dtype=torch.float32, device=out.device), out, x)
    if ms.prediction_type == "v_prediction":
        return x / (sigma * sigma + 1) - out * (sigma / math.sqrt(sigma * sigma + 1))
    return x - out * sigma


def repeat_to(emb: torch.Tensor, length: int) -> torch.Tensor:
    reps = length // emb.shape[1]
    return emb.repeat(1, reps, 1) if reps > 1 else emb


def same_control(a: Any, b: Any) -> bool:
    """Whether two ControlNet chains act the same (the same nets on the same hints with the same settings),
    so units carrying them can share one ControlNet and UNet call."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    ca, cb = a.chain(), b.chain()
    return len(ca) == len(cb) and all(
        x.net is y.net
        and x.hint is y.hint
        and (x.strength, x.start_percent, x.end_percent) == (y.strength, y.start_percent, y.end_percent)
        for x, y in zip(ca, cb)
    )


def _batchable(a: Unit, b: Unit) -> bool:
    if a.window != b.window or not same_control(a.control, b.control):
        return False
    if (a.concat is None) != (b.concat is None) or (a.added is None) != (b.added is None):
        return False
    la, lb = a.emb.shape[1], b.emb.shape[1]
    return la == lb or math.lcm(la, lb) // min(la, lb) <= _MAX_PAD


@dataclass
class Evaluator:
    """Runs the UNet over units and combines their predictions (x0) per conditioning."""

    unet: torch.nn.Module
    ms: Any
    setup: RunSetup
    state: StepState
    max_units: int = 16  # units in one UNet call, at most
    _hints: dict = field(default_factory=dict)
    _per_sigma: dict = field(default_factory=dict)  # sigma -> (percent, timestep on the device); one per step

    def _at(self, sigma: float) -> tuple[float, torch.Tensor]:
        hit = self._per_sigma.get(sigma)
        if hit is None:
            t = self.ms.timestep(torch.tensor(sigma)).to(self.setup.device)
            hit = self._per_sigma[sigma] = (sigma_to_percent(self.ms, sigma), t)
        return hit

    def _hint(self, c: Any, hw: tuple[int, int], n: int) -> torch.Tensor:
        key = (id(c), hw)
        if key not in self._hints:
            img = c.hint.movedim(-1, 1).float()
            img = F.interpolate(img, size=hw, mode="bilinear", align_corners=False)
            self._hints[key] = (c, batch_to(img, self.setup.shape[0]).to(self.setup.device, self.setup.dtype))
        return self._hints[key][1].repeat(n, 1, 1, 1)

    def _control(self, control: Any, xin: torch.Tensor, t: torch.Tensor, kwargs: dict, sigma: float, n: int):
        if control is None:
            return None, None
        f = self.setup.pixel_hw[0] // self.setup.shape[2]
        hw = (xin.shape[2] * f, xin.shape[3] * f)
        down, mid = None, None
        for c in control.chain():
            hi, lo = self.ms.percent_to_sigma(c.start_percent), self.ms.percent_to_sigma(c.end_percent)
            if not (lo <= sigma <= hi) or c.strength == 0:
                continue
            extra = {"added_cond_kwargs": kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in kwargs else {}
            d, m = c.net.model(
                xin,
                t,
                encoder_hidden_states=kwargs["encoder_hidden_states"],
                controlnet_cond=self._hint(c, hw, n),
                conditioning_scale=float(c.strength),
                return_dict=False,
                **extra,
            )
            down = list(d) if down is None else [a + x for a, x in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid

    def _run(self, x: torch.Tensor, sigma: float, units: list[Unit]) -> list[torch.Tensor]:
        """x0 predictions, one ``[B, C, h, w]`` per unit (over its window)."""
        crops = []
        for u in units:
            if u.area is None:
                crops.append(x)
            else:
                ah, aw, ay, ax = u.area
                crops.append(x[:, :, ay : ay + ah, ax : ax + aw])
        xin = torch.cat(crops) if len(crops) > 1 else crops[0]
        length = math.lcm(*[u.emb.shape[1] for u in units])
        context = torch.cat([repeat_to(u.emb, length) for u in units]) if len(units) > 1 else units[0].emb
        t = self._at(sigma)[1].expand(xin.shape[0])
        scaled = model_input(self.ms, sigma, xin)
        kwargs: dict[str, Any] = {"encoder_hidden_states": context, "return_dict": False}
        if units[0].added is not None:
            kwargs["added_cond_kwargs"] = {
                k: torch.cat([u.added[k] for u in units if u.added is not None]) for k in units[0].added
            }
        down, mid = self._control(units[0].control, scaled, t, kwargs, sigma, len(units))
        if down is not None:
            kwargs["down_block_additional_residuals"] = down
            kwargs["mid_block_additional_residual"] = mid
        unet_in = scaled
        if units[0].concat is not None:
            unet_in = torch.cat([scaled, torch.cat([u.concat for u in units if u.concat is not None])], dim=1)
        self.state.units = [u.name for u in units]
        out = self.unet(unet_in, t.to(self.setup.dtype), **kwargs)[0].float()
        x0 = denoised(self.ms, sigma, out, xin.float())
        return list(x0.split(x.shape[0]))

    def predict(
        self,
        x: torch.Tensor,
        sigma: float,
        groups: Sequence[list[Unit] | None],
        context: contextlib.AbstractContextManager | None = None,
    ) -> list[torch.Tensor | None]:
        """The combined x0 of each group of units at (x, sigma); ``None`` for a ``None`` group."""
        self.state.sigma = sigma
        self.state.percent = self._at(sigma)[0]
        todo = [(g, u) for g, units in enumerate(groups) if units is not None for u in units if u.active(sigma)]
        acc: list[torch.Tensor | None] = [None] * len(groups)
        count: list[float | torch.Tensor] = [0.0] * len(groups)
        with context if context is not None else contextlib.nullcontext():
            while todo:
                first = todo[0][1]
                batch = [p for p in todo if _batchable(p[1], first)][: self.max_units]
                todo = [p for p in todo if all(p is not q for q in batch)]
                outs = self._run(x, sigma, [u for _, u in batch])
                for (g, u), x0 in zip(batch, outs):
                    self._accumulate(acc, count, g, u, x0, x)
        result: list[torch.Tensor | None] = []
        for g, units in enumerate(groups):
            total = acc[g]
            if units is None:
                result.append(None)
            elif total is None:
                result.append(torch.zeros_like(x, dtype=torch.float32))
            else:
                result.append(total / (count[g] + 1e-37))
        return result

    @staticmethod
    def _accumulate(acc: list, count: list, g: int, u: Unit, x0: torch.Tensor, x: torch.Tensor) -> None:
        if u.area is None and not isinstance(u.weight, torch.Tensor):
            w = u.weight
            part = x0 if w == 1.0 else x0 * w
            acc[g] = part if acc[g] is None else acc[g] + part
            count[g] = count[g] + w
            return
        if acc[g] is None:
            acc[g] = torch.zeros(x.shape, dtype=torch.float32, device=x0.device)
        if not isinstance(count[g], torch.Tensor):
            count[g] = torch.full((x.shape[0], 1, *x.shape[2:]), float(count[g]), device=x0.device)
        if u.area is None:
            acc[g] = acc[g] + x0 * u.weight
            count[g] = count[g] + u.weight
            return
        ah, aw, ay, ax = u.area
        acc[g][:, :, ay : ay + ah, ax : ax + aw] += x0 * u.weight
        count[g][:, :, ay : ay + ah, ax : ax + aw] += u.weight
