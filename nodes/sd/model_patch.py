"""Model patches that change how a MODEL is *run*, not its weights (weights: ``handles.WeightPatch``).

A ``ModelHandle`` carries an immutable tuple of :class:`ModelPatch` objects (``handle.model_patches``);
patch nodes (FreeU, RescaleCFG, SAG, PAG, HyperTile, ModelSamplingDiscrete, DifferentialDiffusion, ...)
return ``handle.with_model_patch(patch)``, a new handle, and never touch the shared module outside a run.

The guider (``guidance.Denoiser``, from ``GuiderValue.denoiser``) consults every patch, in order, at fixed
points of each denoising call:

1. ``sampling(ms)``: once, when the guider is built: replaces the model's sigma table / parametrisation
   (ModelSamplingDiscrete: v-prediction, zero-terminal-SNR, LCM...).
2. ``unet_hooks(unet, state)``: once around the whole sampling run, a context manager that may install
   forward hooks / attention processors on the shared UNet and MUST restore it on exit (the guider holds
   the module's patch lock for the run). ``state`` is a :class:`StepState` the guider updates before every
   UNet call (current sigma, the run's sigmas, which conditioning units are in the batch), so hooks can act
   on a percent range or capture attention for one unit.
3. ``cfg(args)``: may replace the classifier-free guidance combination; return ``None`` to leave it.
4. ``post_cfg(args, denoised)``: after the combination; returns the (possibly changed) prediction.
5. ``denoise_mask(sigma, mask, state)``: inpainting masks per step (DifferentialDiffusion).

Everything is in the *denoised* (x0) parametrisation: ``args.cond_denoised`` and ``args.uncond_denoised``
are the model's x0 predictions for the positive and negative conditioning.

Below the contract: helpers that patches share to change a diffusers UNet for one run and put it back
exactly, also when the run raises: :func:`swap_attention` (attention processors), :func:`module_hooks`
(forward hooks and pre-hooks), :func:`attention_modules` and :func:`find_attention` (which ``attn1``/``attn2``
modules an LDM block name such as ``"middle"`` 0 means).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepState:
    """What the guider is doing now; one per sampling run, updated before each UNet call."""

    sigma: float = 0.0
    sigmas: torch.Tensor | None = None  # the run's whole schedule, when known
    percent: float = 0.0  # 0 at sigma_max, 1 at sigma 0 (from the model's sigma table)
    units: list[str] = field(default_factory=list)  # "positive"/"negative"/... for each chunk of the UNet batch
    extra: dict[str, Any] = field(default_factory=dict)  # scratch space for hooks (keyed by the patch)
    sampling: Any = None  # the run's ModelSampling after the patches' ``sampling``, when the guider sets it


@dataclass
class CfgArgs:
    """The inputs of one guidance combination."""

    x: torch.Tensor  # the noisy latent at this step
    sigma: torch.Tensor  # scalar tensor
    cond_denoised: torch.Tensor
    uncond_denoised: torch.Tensor | None  # None when cfg == 1 skips the negative pass
    cfg: float
    state: StepState
    # ``predict(x, sigma, which, context=None)``: runs the model once more on (x, sigma) for one conditioning
    # (``which``: "positive"/"negative", or a CONDITIONING list), inside ``context`` when given (for instance
    # with self-attention replaced), and returns its x0 prediction.
    predict: Callable[..., torch.Tensor]


class ModelPatch:
    """Base class: every hook is a no-op. Subclasses override what they need and give a stable ``token``."""

    def token(self) -> str:
        """A string that identifies this patch and its settings (part of the MODEL's fingerprint)."""
        raise NotImplementedError

    def sampling(self, ms: Any) -> Any:
        return ms

    def unet_hooks(self, unet: torch.nn.Module, state: StepState) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def cfg(self, args: CfgArgs) -> torch.Tensor | None:
        return None

    def post_cfg(self, args: CfgArgs, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def denoise_mask(self, sigma: torch.Tensor, mask: torch.Tensor, state: StepState) -> torch.Tensor:
        return mask


def effective_sampling(model: Any) -> Any:
    """The model's sigma table after its run-time patches (what schedulers and the guider must use)."""
    ms = model.sampling
    for patch in getattr(model, "model_patches", ()):
        ms = patch.sampling(ms)
    return ms


# -- helpers for patches that change the UNet for one run -------------------------------------------------


def attention_modules(unet: torch.nn.Module, kind: str) -> dict[str, torch.nn.Module]:
    """``{module name: Attention}`` of every transformer block's ``attn1`` (self) or ``attn2`` (cross)."""
    return {n: m for n, m in unet.named_modules() if n.endswith("." + kind) and hasattr(m, "set_processor")}


def find_attention(unet: Any, block: str, index: int, kind: str = "attn1") -> list[str]:
    """Names of the ``kind`` attention modules of one LDM block: ``("middle", 0)`` is the middle block's
    transformer; ``("input", n)`` / ``("output", n)`` the transformer of ``input_blocks.n`` / ``output_blocks.n``.
    Every transformer layer of the block is included (SDXL stacks several)."""
    from .ldm_keys import UnetLayout

    if block == "middle":
        prefix = "mid_block.attentions.0."
    else:
        layout = UnetLayout(dict(unet.config))
        starts = layout.down_start if block == "input" else layout.up_start
        counts = layout.layers if block == "input" else layout.up_layers
        prefix = ""
        for i, start in enumerate(starts):
            if start <= index < start + counts[i]:
                prefix = f"{'down' if block == 'input' else 'up'}_blocks.{i}.attentions.{index - start}."
        if not prefix:
            return []
    return [n for n in attention_modules(unet, kind) if n.startswith(prefix)]


@contextlib.contextmanager
def swap_attention(unet: torch.nn.Module, processors: Mapping[str, Any]) -> Iterator[None]:
    """Attention modules (by name) use the given processors inside the block; the previous processor
    objects are put back on exit, also when the block raises."""
    modules = dict(unet.named_modules())
    saved: list[tuple[Any, Any]] = []
    try:
        for name, proc in processors.items():
            attn = modules[name]
            saved.append((attn, attn.processor))
            attn.set_processor(proc)
        yield
    finally:
        for attn, proc in reversed(saved):
            attn.set_processor(proc)


@contextlib.contextmanager
def module_hooks(
    hooks: Iterable[tuple[torch.nn.Module, str, Callable[..., Any]]],
) -> Iterator[None]:
    """Registers ``(module, kind, fn)`` hooks for the block (``kind``: "forward", "pre", or "pre_kwargs" for a
    pre-hook that receives and returns ``(args, kwargs)``) and removes every one of them on exit."""
    handles: list[Any] = []
    try:
        for module, kind, fn in hooks:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn))
            elif kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kwargs":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                raise ValueError(f"unknown hook kind {kind!r}")
        yield
    finally:
        for h in reversed(handles):
            h.remove()
