"""Model patches that change how a MODEL is *run*, not its weights (weights: ``handles.WeightPatch``).

A ``ModelHandle`` carries an immutable tuple of :class:`ModelPatch` objects (``handle.model_patches``);
patch nodes (FreeU, RescaleCFG, SAG, PAG, HyperTile, ModelSamplingDiscrete, DifferentialDiffusion, ...)
return ``handle.with_model_patch(patch)``, a new handle, and never touch the shared module outside a run.

The guider (``guidance.Guider``) consults every patch, in order, at fixed points of each denoising call:

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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


@dataclass
class CfgArgs:
    """The inputs of one guidance combination."""

    x: torch.Tensor  # the noisy latent at this step
    sigma: torch.Tensor  # scalar tensor
    cond_denoised: torch.Tensor
    uncond_denoised: torch.Tensor | None  # None when cfg == 1 skips the negative pass
    cfg: float
    state: StepState
    # Runs the model once more on (x, sigma) for one conditioning ("positive"/"negative"), optionally inside an
    # extra context (for instance with self-attention replaced), and returns its x0 prediction.
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
