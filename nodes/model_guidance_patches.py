"""Run-time model patches that change the sampling and the guidance: ModelSamplingDiscrete, RescaleCFG,
Self-Attention Guidance, Perturbed-Attention Guidance and Differential Diffusion.

Each node returns ``model.with_model_patch(patch)``: a new MODEL whose :class:`ModelPatch` the guider
consults during a run (``nodes/sd/model_patch.py`` has the contract). Attention is changed by swapping the
processor of diffusers ``Attention`` modules for the run (or for one extra model call) and putting the
previous one back, also when the run fails; the shared UNet is never left changed.

One file a little past the usual size: these are the patches the guider consults at its combination step
(parametrisation, ``cfg``, ``post_cfg``, ``denoise_mask``), read together with ``nodes/sd/guidance.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from kiln import engine
from kiln.engine import Boolean, Combo, Float, NodeError, Socket
from kiln.nodes.sd.model_patch import (
    CfgArgs,
    ModelPatch,
    StepState,
    effective_sampling,
    find_attention,
    swap_attention,
)
from kiln.nodes.sd.samplers import ModelSampling


def check_model(model: Any, input_name: str = "model") -> Any:
    if not hasattr(model, "with_model_patch"):
        raise NodeError(
            "model is not a MODEL", input_name=input_name, hint="connect the MODEL output of a loader or a patch"
        )
    return model


# -- ModelSamplingDiscrete ----------------------------------------------------------------------------------


class X0Sampling(ModelSampling):
    """A model that predicts the clean latent itself (ComfyUI's ``x0`` sampling)."""

    def __init__(self, config: dict):
        super().__init__({**config, "prediction_type": "epsilon"})
        self.prediction_type = "x0"

    def calculate_denoised(self, sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out


class ImgToImgSampling(X0Sampling):
    """An x0 model that takes the noisy latent unscaled (ComfyUI's ``img_to_img``, for Lotus-style models)."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.prediction_type = "img_to_img"

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x


def zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """A sigma table rescaled so its last entry has (almost) zero signal, in float64 (Lin et al. 2023)."""
    root = (1 / (sigmas.double() ** 2 + 1)).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alpha_bar[-1] = 4.8973451890853435e-08
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


class LcmSampling(ModelSampling):
    """Latent Consistency Models: 50 of the 1000 SD timesteps (every 20th, ending at 999), and the
    consistency boundary condition ``c_skip * x + c_out * x0`` on top of the epsilon prediction."""

    ORIGINAL_STEPS = 50

    def __init__(self, config: dict, zsnr: bool = False):
        base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
        super().__init__({**config, **base, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
        self.prediction_type = "lcm"
        self.skip = self.num_timesteps // self.ORIGINAL_STEPS
        full = ((1 - self.alphas_cumprod.double()) / self.alphas_cumprod.double()) ** 0.5
        picked = full[[self.num_timesteps - 1 - i * self.skip for i in range(self.ORIGINAL_STEPS)][::-1]]
        if zsnr:
            picked = zero_terminal_snr(picked)
        self.sigmas = picked.float()
        self.log_sigmas = picked.log().float()
        self.alphas_cumprod = 1 / (picked * picked + 1)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        dists = sigma.log().reshape(-1).to(self.log_sigmas.device) - self.log_sigmas[:, None]
        idx = dists.abs().argmin(dim=0).view(sigma.shape)
        return (idx * self.skip + (self.skip - 1)).to(sigma.device)

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        tt = ((t.float() - (self.skip - 1)) / self.skip).clamp(0, len(self.sigmas) - 1)
        lo, hi = tt.floor().long(), tt.ceil().long()
        w = tt.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp().to(t.device)

    sigma_at = sigma

    def calculate_denoised(self, sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=out.device).reshape(-1, *([1] * (out.ndim - 1)))
        t = self.timestep(s).float() * 10.0  # LCM's timestep scaling
        x0 = x - out * s
        c_skip = 0.25 / (t * t + 0.25)  # sigma_data 0.5
        c_out = t / (t * t + 0.25) ** 0.5
        return c_out * x0 + c_skip * x


SAMPLING_TYPES = ["eps", "v_prediction", "lcm", "x0", "img_to_img"]


class SamplingPatch(ModelPatch):
    """Replaces the model's parametrisation and sigma table (ModelSamplingDiscrete)."""

    def __init__(self, kind: str, zsnr: bool, base_config: dict):
        self.kind, self.zsnr, self.base_config = kind, bool(zsnr), dict(base_config)

    def token(self) -> str:
        return f"sampling:{self.kind}:zsnr={self.zsnr}"

    def sampling(self, ms: Any) -> Any:
        # built from the checkpoint's own schedule, as ComfyUI builds it from the model's config: a later
        # ModelSamplingDiscrete replaces an earlier one instead of stacking on it
        config = {**self.base_config, "rescale_betas_zero_snr": self.zsnr}
        if self.kind == "lcm":
            return LcmSampling(config, self.zsnr)
        if self.kind == "x0":
            return X0Sampling(config)
        if self.kind == "img_to_img":
            return ImgToImgSampling(config)
        return ModelSampling(
            {**config, "prediction_type": "v_prediction" if self.kind == "v_prediction" else "epsilon"}
        )


class ModelSamplingDiscrete(engine.Node):
    """Sets what the model predicts (noise, v, x0, LCM) and optionally rescales its noise schedule to zero
    terminal SNR: for checkpoints whose file does not say so (v-prediction SD2 fine-tunes, LCM merges)."""

    category = "advanced/model"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        sampling: Annotated[str, Combo(SAMPLING_TYPES)] = "eps",
        zsnr: Annotated[bool, Boolean()] = False,
    ):
        check_model(model)
        return model.with_model_patch(SamplingPatch(sampling, zsnr, model.scheduler_config))


# -- RescaleCFG -----------------------------------------------------------------------------------------


class RescaleCfgPatch(ModelPatch):
    """CFG in v-space, rescaled towards the positive prediction's standard deviation (Lin et al. 2023)."""

    def __init__(self, multiplier: float):
        self.multiplier = float(multiplier)

    def token(self) -> str:
        return f"rescale_cfg:{self.multiplier!r}"

    def cfg(self, args: CfgArgs) -> torch.Tensor | None:
        if self.multiplier == 0.0 or args.uncond_denoised is None:
            return None  # plain CFG
        s = float(args.sigma)
        if s <= 0.0:
            return None
        x = args.x.float()
        root = math.sqrt(s * s + 1.0)
        xs = x / (s * s + 1.0)
        v_cond = (xs - args.cond_denoised) * (root / s)
        v_uncond = (xs - args.uncond_denoised) * (root / s)
        v_cfg = v_uncond + args.cfg * (v_cond - v_uncond)
        std_cond = v_cond.std(dim=tuple(range(1, v_cond.ndim)), keepdim=True)
        std_cfg = v_cfg.std(dim=tuple(range(1, v_cfg.ndim)), keepdim=True)
        rescaled = v_cfg * (std_cond / std_cfg)
        v_final = self.multiplier * rescaled + (1.0 - self.multiplier) * v_cfg
        return xs - v_final * (s / root)


class RescaleCFG(engine.Node):
    """Rescales classifier-free guidance so high cfg values do not over-saturate (meant for v-prediction and
    zero-terminal-SNR models). multiplier 0 is plain CFG."""

    category = "advanced/model"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        multiplier: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.7,
    ):
        return check_model(model).with_model_patch(RescaleCfgPatch(multiplier))


# -- attention processors for SAG and PAG ---------------------------------------------------------------


def _attention_output(attn: Any, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    hidden = attn.to_out[1](attn.to_out[0](hidden))
    if attn.residual_connection:
        hidden = hidden + residual
    return hidden / attn.rescale_output_factor


class RecordingAttention:
    """Self-attention computed explicitly so its probabilities can be kept: those of the negative
    conditioning's share of the batch go to ``state.extra[key]``; other batches use the usual processor."""

    def __init__(self, inner: Any, state: StepState, key: str):
        self.inner, self.state, self.key = inner, state, key

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kw):
        units = self.state.units
        if "negative" not in units or hidden_states.ndim != 3 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        per_unit = hidden_states.shape[0] // len(units) * attn.heads
        i = units.index("negative")
        self.state.extra[self.key] = probs[i * per_unit : (i + 1) * per_unit].detach()
        return _attention_output(attn, out, hidden_states)


class IdentityAttention:
    """Self-attention with the identity as attention map: each token keeps its own value (PAG)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kw):
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return _attention_output(attn, attn.to_v(source), hidden_states)


# -- Self-Attention Guidance ----------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size)
    k1 = torch.exp(-0.5 * (t / max(sigma, 1e-8)) ** 2)
    k1 = (k1 / k1.sum()).to(x.device, x.dtype)
    k2 = (k1[:, None] @ k1[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), k2, groups=x.shape[1])


def sag_degraded(x0: torch.Tensor, attn: torch.Tensor, blur_sigma: float, threshold: float = 1.0) -> torch.Tensor:
    """``x0`` blurred where the self-attention map says the model looks most (attention received > threshold)."""
    b, _, lh, lw = x0.shape
    _, hw1, hw2 = attn.shape
    attn = attn.reshape(b, -1, hw1, hw2)
    salient = attn.mean(1).sum(1) > threshold
    ratio = 2 ** (math.ceil(math.sqrt(lh * lw / hw1)) - 1).bit_length()
    mh, mw = math.ceil(lh / ratio), math.ceil(lw / ratio)
    mask = F.interpolate(salient.reshape(b, 1, mh, mw).to(x0.dtype), (lh, lw))
    return gaussian_blur(x0, 9, blur_sigma) * mask + x0 * (1 - mask)


class SagPatch(ModelPatch):
    def __init__(self, scale: float, blur_sigma: float):
        self.scale, self.blur_sigma = float(scale), float(blur_sigma)
        self.key = f"sag:{id(self)}"

    def token(self) -> str:
        return f"sag:{self.scale!r}:{self.blur_sigma!r}"

    @contextlib.contextmanager
    def unet_hooks(self, unet: torch.nn.Module, state: StepState) -> Iterator[None]:
        names = find_attention(unet, "middle", 0, "attn1")[:1]  # the middle block's first transformer
        modules = dict(unet.named_modules())
        recorders = {n: RecordingAttention(modules[n].processor, state, self.key) for n in names}
        try:
            with swap_attention(unet, recorders):
                yield
        finally:
            state.extra.pop(self.key, None)

    def post_cfg(self, args: CfgArgs, denoised: torch.Tensor) -> torch.Tensor:
        if min(denoised.shape[2:]) <= 4:
            return denoised  # too small to blur
        uncond = args.uncond_denoised
        if uncond is None:
            uncond = args.predict(args.x, args.sigma, "negative")
        attn = args.state.extra.get(self.key)
        if attn is None:
            return denoised
        degraded = sag_degraded(uncond, attn.to(uncond.dtype), self.blur_sigma)
        sag = args.predict(degraded + args.x - uncond, args.sigma, "negative")
        return denoised + (degraded - sag) * self.scale


class SelfAttentionGuidance(engine.Node):
    """Self-Attention Guidance: blurs the regions the model attends to most and steers away from the
    model's prediction for that blurred image, for sharper details. Runs the model once more per step."""

    display_name = "Self-Attention Guidance"
    category = "_for_testing"
    experimental = True
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        scale: Annotated[float, Float(min=-2.0, max=5.0, step=0.01)] = 0.5,
        blur_sigma: Annotated[float, Float(min=0.0, max=10.0, step=0.1)] = 2.0,
    ):
        return check_model(model).with_model_patch(SagPatch(scale, blur_sigma))


# -- Perturbed-Attention Guidance -------------------------------------------------------------------------


class PagPatch(ModelPatch):
    def __init__(self, scale: float):
        self.scale = float(scale)
        self.key = f"pag:{id(self)}"

    def token(self) -> str:
        return f"pag:{self.scale!r}"

    @contextlib.contextmanager
    def unet_hooks(self, unet: torch.nn.Module, state: StepState) -> Iterator[None]:
        state.extra[self.key] = unet
        try:
            yield
        finally:
            state.extra.pop(self.key, None)

    def post_cfg(self, args: CfgArgs, denoised: torch.Tensor) -> torch.Tensor:
        unet = args.state.extra.get(self.key)
        if self.scale == 0.0 or unet is None:
            return denoised
        names = find_attention(unet, "middle", 0, "attn1")
        perturbed = swap_attention(unet, {n: IdentityAttention() for n in names})
        pag = args.predict(args.x, args.sigma, "positive", context=perturbed)
        return denoised + (args.cond_denoised - pag) * self.scale


class PerturbedAttentionGuidance(engine.Node):
    """Perturbed-Attention Guidance: steers away from the model's prediction with the middle block's
    self-attention replaced by the identity, for better structure. Runs the model once more per step."""

    category = "model_patches/unet"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        scale: Annotated[float, Float(min=0.0, max=100.0, step=0.01, round=0.01)] = 3.0,
    ):
        return check_model(model).with_model_patch(PagPatch(scale))


# -- Differential Diffusion -------------------------------------------------------------------------------


class DifferentialDiffusionPatch(ModelPatch):
    """Per-step inpainting masks: a pixel is changed from the step whose progress reaches its mask value,
    so a soft mask gives soft, graded changes."""

    def __init__(self, strength: float, sampling: Any):
        self.strength = float(strength)
        self.fallback_sampling = sampling

    def token(self) -> str:
        return f"differential_diffusion:{self.strength!r}"

    def threshold(self, sigma: float, sigmas: torch.Tensor, ms: Any) -> float:
        sigma_from = float(sigmas[0])
        sigma_to = max(float(sigmas[-1]), float(ms.sigma_min))
        ts_from = float(ms.timestep(torch.tensor(sigma_from)))
        ts_to = float(ms.timestep(torch.tensor(sigma_to)))
        now = float(ms.timestep(torch.tensor(float(sigma))))
        if ts_from == ts_to:
            return 0.0
        return (now - ts_to) / (ts_from - ts_to)

    def denoise_mask(self, sigma: torch.Tensor, mask: torch.Tensor, state: StepState) -> torch.Tensor:
        if state.sigmas is None:
            return mask
        ms = state.sampling if state.sampling is not None else self.fallback_sampling
        binary = (mask >= self.threshold(float(sigma), state.sigmas, ms)).to(mask.dtype)
        if 0.0 < self.strength < 1.0:
            return self.strength * binary + (1.0 - self.strength) * mask
        return binary


class DifferentialDiffusion(engine.Node):
    """Inpainting with soft masks: how strongly the mask is set (0..1) decides from which step a pixel may
    change. Use with a latent that has a noise mask (SetLatentNoiseMask, VAEEncodeForInpaint)."""

    display_name = "Differential Diffusion"
    category = "_for_testing"
    experimental = True
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        strength: Annotated[float, Float(min=0.0, max=1.0, step=0.01, optional=True)] = 1.0,
    ):
        check_model(model)
        return model.with_model_patch(DifferentialDiffusionPatch(strength, effective_sampling(model)))


NODES = [
    ModelSamplingDiscrete,
    RescaleCFG,
    SelfAttentionGuidance,
    PerturbedAttentionGuidance,
    DifferentialDiffusion,
]
