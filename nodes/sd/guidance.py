"""From a MODEL and CONDITIONING to a denoiser ``D(x, sigma) -> x0``: the GUIDER value and its guidance
modes (plain, classifier-free, dual CFG, perpendicular negative), ControlNet, and inpainting masks.

CONDITIONING is ComfyUI's list of ``[embedding, options]``; how each entry's options (areas, masks, strength,
timestep ranges, ControlNet, SDXL sizes, inpainting inputs) act is in :mod:`.conds`. Run-time model patches
(:mod:`.model_patch`) are consulted at the points their contract names: ``sampling`` for the sigma table,
``unet_hooks`` around the run, ``cfg`` and ``post_cfg`` at each combination, ``denoise_mask`` per step.

Guidance modes (ComfyUI's guiders; every prediction is in the x0 parametrisation):

- ``basic``: the positive prediction alone.
- ``cfg``: ``uncond + cfg * (cond - uncond)``; at cfg 1 the negative is not evaluated.
- ``dual_cfg``: conditionings positive (cond1), middle (cond2), negative with ``cfg = (cfg_conds,
  cfg_cond2_negative)``. Style "regular": ``CFG(middle, negative, cfg2) + cfg1 * (positive - middle)``;
  "nested": ``negative + cfg2 * (CFG(positive, middle, cfg1) - negative)``.
- ``perp_neg``: positive, negative, empty_negative_prompt; the negative direction's component along the
  positive one is removed before it is subtracted (``neg_scale``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine.fingerprint import encode as encode_literal

from .conds import Evaluator, RunSetup, Unit, batch_to, prepare
from .handles import ControlNetHandle, ModelHandle
from .model_patch import CfgArgs, StepState, effective_sampling
from .noise import make_noise  # noqa: F401  (moved to .noise; old import path kept)
from .samplers import run_sampler  # noqa: F401  (moved to .samplers; old import path kept)


@dataclass(frozen=True, eq=False)
class Control:
    """One applied ControlNet; ``previous`` chains several on the same conditioning."""

    net: ControlNetHandle
    hint: torch.Tensor  # IMAGE [B, H, W, 3]
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: Control | None = None

    def chain(self) -> list[Control]:
        out: list[Control] = []
        c: Control | None = self
        while c is not None:
            out.append(c)
            c = c.previous
        return out[::-1]

    def __kiln_fingerprint__(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for c in self.chain():
            h.update(c.net.__kiln_fingerprint__())
            h.update(c.hint.detach().cpu().contiguous().numpy().tobytes())
            h.update(repr((tuple(c.hint.shape), c.strength, c.start_percent, c.end_percent)).encode())
        return h.digest()


# -- the GUIDER value -----------------------------------------------------------------------------------------

# The conditionings each mode reads, by name (ComfyUI's names for them).
MODES: dict[str, tuple[str, ...]] = {
    "basic": ("positive",),
    "cfg": ("positive", "negative"),
    "dual_cfg": ("positive", "middle", "negative"),
    "perp_neg": ("positive", "negative", "empty_negative_prompt"),
}


def _feed(h: Any, value: Any) -> None:
    """Adds ``value`` to a hash: tensors by dtype, shape and bytes, containers item by item, anything else
    through the engine's literal encoding (objects with ``__kiln_fingerprint__`` included)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(b"T" + repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"D%d" % len(value))
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d" % len(value))
        for item in value:
            _feed(h, item)
    else:
        buf = bytearray()
        encode_literal(value, buf)
        h.update(bytes(buf))


def fingerprint_conditioning(cond: Any) -> bytes:
    """A digest of a CONDITIONING (embeddings, pooled outputs, masks, ControlNets and every option)."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, cond)
    return h.digest()


@dataclass(frozen=True, eq=False)
class GuiderValue:
    """GUIDER: a model, the conditionings its mode reads, cfg scale(s) and mode options. Never mutated."""

    model: ModelHandle
    conds: Mapping[str, list]  # read-only
    cfg: tuple[float, ...] = (1.0,)
    mode: str = "cfg"
    options: tuple[tuple[str, Any], ...] = ()  # dual_cfg: ("style", "regular"|"nested"); perp_neg: ("neg_scale", x)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conds", MappingProxyType(dict(self.conds)))
        if self.mode not in MODES:
            raise ValueError(f"unknown guider mode {self.mode!r}; one of {sorted(MODES)}")
        missing = [n for n in MODES[self.mode] if n not in self.conds]
        if missing:
            raise ValueError(f"a {self.mode} guider needs the conditionings {missing}")

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def __kiln_fingerprint__(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(b"GUIDER\x00" + self.model.__kiln_fingerprint__())
        _feed(h, (self.mode, tuple(float(c) for c in self.cfg), tuple(self.options)))
        for name in sorted(self.conds):
            _feed(h, name)
            _feed(h, self.conds[name])
        return h.digest()

    def __kiln_sizeof__(self) -> int:
        n = 1024
        for cond in self.conds.values():
            for emb, _ in cond:
                n += emb.numel() * emb.element_size()
        return n

    def __repr__(self) -> str:
        return f"<GUIDER {self.mode} cfg={self.cfg} {sorted(self.conds)}>"

    @contextlib.contextmanager
    def denoiser(
        self,
        latent_shape: tuple[int, ...],
        sigmas: torch.Tensor | None = None,
        latent_image: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
    ) -> Iterator[Denoiser]:
        """The denoise callable for one sampling run of latents of ``latent_shape``: the model's weight
        patches are applied and every run-time patch's ``unet_hooks`` is entered for the duration.

        ``latent_image`` and ``noise_mask`` (the latent being sampled and its mask) feed inpainting UNets
        whose conditioning carries no ``concat_latent_image``, as ComfyUI does.
        """
        with self.model.patched():
            unet = self.model.unet
            state = StepState(sigmas=sigmas)
            d = Denoiser(self, unet, tuple(latent_shape), state, latent_image, noise_mask)
            with contextlib.ExitStack() as hooks:
                for patch in self.model.model_patches:
                    hooks.enter_context(patch.unet_hooks(unet, state))
                yield d


def cfg_guider(model: ModelHandle, positive: list, negative: list, cfg: float) -> GuiderValue:
    """KSampler's guidance: classifier-free guidance of ``positive`` against ``negative``."""
    return GuiderValue(model, {"positive": positive, "negative": negative}, (float(cfg),), "cfg")


def perp_neg(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor, neg_scale: float, cfg: float
) -> torch.Tensor:
    """Perpendicular negative guidance: ``empty + cfg * (pos - neg_scale * neg_perp)`` where pos and neg are
    the positive and negative directions from the empty prompt and neg_perp is neg without its component
    along pos."""
    pos = cond - empty
    neg = uncond - empty
    norm2 = (pos * pos).sum()
    along = (neg * pos).sum() / norm2.clamp_min(torch.finfo(norm2.dtype).tiny)  # pos = 0: nothing to remove
    perp = neg - along * pos
    return empty + cfg * (pos - perp * neg_scale)


class Denoiser:
    """The denoise callable ``(x, sigma) -> x0`` of one sampling run under a :class:`GuiderValue`.

    ``last_uncond_denoised``: the negative prediction of the latest call (None when it was skipped), for
    CFG++ samplers. ``model_sampling``: the sigma table after the model's run-time patches. ``state``: the
    :class:`StepState` hooks read. ``predict(x, sigma, which, context=None)``: the combined x0 of one
    conditioning, by name or as a CONDITIONING list, optionally inside an extra context.
    """

    def __init__(
        self,
        guider: GuiderValue,
        unet: torch.nn.Module,
        latent_shape: tuple[int, ...],
        state: StepState,
        latent_image: torch.Tensor | None,
        noise_mask: torch.Tensor | None,
    ):
        model = guider.model
        self.guider = guider
        self.model_sampling = effective_sampling(model)
        self.model_patches = tuple(model.model_patches)
        self.state = state
        state.sampling = self.model_sampling  # patches that read the schedule see the patched one
        self.last_uncond_denoised: torch.Tensor | None = None
        self.device, self.dtype = model.device, model.dtype
        f = model.preview_vae.downscale if model.preview_vae is not None else 8
        in_ch = int(getattr(getattr(unet, "config", None), "in_channels", latent_shape[1]))
        self.setup = RunSetup(
            shape=latent_shape,
            device=self.device,
            dtype=self.dtype,
            pixel_hw=(latent_shape[2] * f, latent_shape[3] * f),
            sdxl=model.family == "sdxl",
            extra_channels=max(0, in_ch - latent_shape[1]),
            ms=self.model_sampling,
            latent_image=latent_image,
            noise_mask=noise_mask,
            context_dim=getattr(getattr(unet, "config", None), "cross_attention_dim", None),
        )
        self.evaluator = Evaluator(unet, self.model_sampling, self.setup, state)
        self.units = prepare(dict(guider.conds), self.setup)
        self._extra: dict[int, tuple[list, list[Unit]]] = {}

    # -- one conditioning on demand (patches that re-run the model) ------------------------------------------

    def _units_for(self, which: str | list) -> list[Unit]:
        if isinstance(which, str):
            if which not in self.units:
                raise KeyError(f"no conditioning {which!r} in this guider; it has {sorted(self.units)}")
            return self.units[which]
        key = id(which)
        if key not in self._extra:
            self._extra[key] = (which, prepare({"extra": which}, self.setup)["extra"])
        return self._extra[key][1]

    def predict(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        which: str | list,
        context: contextlib.AbstractContextManager | None = None,
    ) -> torch.Tensor:
        units = self._units_for(which)
        xd = x.to(self.device, self.dtype)
        out = self.evaluator.predict(xd, float(sigma), [units], context)[0]
        assert out is not None
        return out

    # -- guidance ----------------------------------------------------------------------------------------

    def _combine(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float
    ) -> torch.Tensor:
        """One CFG combination with the patches' ``cfg`` (the last one that answers wins) and ``post_cfg``."""
        args = CfgArgs(
            x=x,
            sigma=sigma,
            cond_denoised=cond,
            uncond_denoised=uncond,
            cfg=cfg,
            state=self.state,
            predict=self.predict,
        )
        out = None
        for patch in reversed(self.model_patches):
            out = patch.cfg(args)
            if out is not None:
                break
        if out is None:
            if uncond is None:
                out = cond if cfg == 1.0 else cond * cfg
            else:
                out = uncond + (cond - uncond) * cfg
        for patch in self.model_patches:
            out = patch.post_cfg(args, out)
        self.last_uncond_denoised = uncond
        return out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = float(sigma)
        st = torch.as_tensor(s, dtype=torch.float32)
        xd = x.to(self.device, self.dtype)
        g, units, predict = self.guider, self.units, self.evaluator.predict
        if g.mode in ("basic", "cfg"):
            cfg = float(g.cfg[0]) if g.mode == "cfg" else 1.0
            neg = None if math.isclose(cfg, 1.0) else units["negative"]
            cond, uncond = predict(xd, s, [units["positive"], neg])
            assert cond is not None
            out = self._combine(xd, st, cond, uncond, cfg)
        elif g.mode == "dual_cfg":
            out = self._dual(xd, st, s)
        else:
            out = self._perp_neg(xd, st, s)
        return out.to(x.device)

    def _dual(self, xd: torch.Tensor, st: torch.Tensor, s: float) -> torch.Tensor:
        cfg1, cfg2 = (float(c) for c in self.guider.cfg[:2])
        nested = self.guider.option("style", "regular") == "nested"
        neg: list[Unit] | None = self.units["negative"]
        mid: list[Unit] | None = self.units["middle"]
        pos = self.units["positive"]
        if not nested and math.isclose(cfg2, 1.0):
            neg = None
            if math.isclose(cfg1, 1.0):
                mid = None
        n, m, p = self.evaluator.predict(xd, s, [neg, mid, pos])
        assert p is not None
        if nested:
            assert n is not None and m is not None
            text = self._combine(xd, st, p, m, cfg1)
            return n + (text - n) * cfg2
        m0 = m if m is not None else torch.zeros_like(p)
        return self._combine(xd, st, m0, n, cfg2) + (p - m0) * cfg1

    def _perp_neg(self, xd: torch.Tensor, st: torch.Tensor, s: float) -> torch.Tensor:
        cfg = float(self.guider.cfg[0])
        neg_scale = float(self.guider.option("neg_scale", 1.0))
        neg: list[Unit] | None = self.units["negative"]
        empty: list[Unit] | None = self.units["empty_negative_prompt"]
        if math.isclose(neg_scale, 0.0):
            neg = None
            if math.isclose(cfg, 1.0):
                empty = None
        p, n, e = self.evaluator.predict(xd, s, [self.units["positive"], neg, empty])
        assert p is not None
        zeros = torch.zeros_like(p)
        out = perp_neg(p, n if n is not None else zeros, e if e is not None else zeros, neg_scale, cfg)
        args = CfgArgs(
            x=xd, sigma=st, cond_denoised=p, uncond_denoised=n, cfg=cfg, state=self.state, predict=self.predict
        )
        for patch in self.model_patches:
            out = patch.post_cfg(args, out)
        self.last_uncond_denoised = n
        return out


class MaskedDenoiser:
    """Inpainting: outside the mask, the input latent (noised to the current sigma) is kept every step.

    Each run-time patch's ``denoise_mask`` may change the mask per step (DifferentialDiffusion). The inner
    denoiser's ``model_sampling``, ``last_uncond_denoised`` and ``state`` show through.
    """

    def __init__(self, denoise: Callable, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        self.inner = denoise
        self.latent, self.noise, self.mask = latent, noise, mask
        self.model_patches = tuple(getattr(denoise, "model_patches", ()))

    def __getattr__(self, name: str) -> Any:
        if name in ("model_sampling", "last_uncond_denoised", "state", "predict"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if self.model_patches:
            st = torch.as_tensor(float(sigma), dtype=torch.float32)
            state = getattr(self.inner, "state", None) or StepState(sigma=float(sigma))
            for patch in self.model_patches:
                mask = patch.denoise_mask(st, mask, state)
        keep = self.latent + self.noise * float(sigma)
        x = x * mask + keep * (1 - mask)
        return self.inner(x, sigma) * mask + self.latent * (1 - mask)


def masked_denoiser(denoise: Callable, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> Callable:
    """Inpainting over ``denoise`` (see :class:`MaskedDenoiser`)."""
    return MaskedDenoiser(denoise, latent, noise, mask)


def prepare_mask(noise_mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    m = noise_mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    m = F.interpolate(m, size=shape[2:], mode="bilinear", align_corners=False)
    return batch_to(m, shape[0]).clamp(0, 1)
