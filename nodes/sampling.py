"""KSampler and KSamplerAdvanced.

Noise comes from the seed on the CPU, so a seed gives the same image on any device. Progress is reported
every step (also the cancellation point), with a preview of the predicted clean latent when a client asked
for previews.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import SEED_MAX, Combo, Float, Int, NodeError, Output, Socket
from kiln.nodes.common import preview_from_image
from kiln.nodes.sd.guidance import Guider, make_noise, masked_denoiser, prepare_mask, run_sampler
from kiln.nodes.sd.preview import latent_to_image
from kiln.nodes.sd.samplers import SAMPLER_NAMES, SCHEDULER_NAMES, calculate_sigmas, sigmas_for


def _check_inputs(model: Any, positive: Any, negative: Any, latent: Any) -> torch.Tensor:
    if not hasattr(model, "unet"):
        raise NodeError("model is not a MODEL", input_name="model", hint="connect the MODEL output of a loader")
    for name, c in (("positive", positive), ("negative", negative)):
        if not isinstance(c, list) or not c or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in c):
            raise NodeError(
                f"{name} is not a CONDITIONING",
                input_name=name,
                hint="connect the output of CLIPTextEncode (or another conditioning node)",
            )
        dim = c[0][0].shape[-1]
        want = model.unet.config.cross_attention_dim
        if dim != want:
            raise NodeError(
                f"{name} has embeddings of size {dim}, this model expects {want}",
                input_name=name,
                hint="encode the prompt with the CLIP of the same checkpoint as the model",
            )
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise NodeError("latent_image is not a LATENT", input_name="latent_image")
    x = latent["samples"]
    ch = model.unet.config.in_channels
    if x.ndim != 4 or x.shape[1] != ch:
        raise NodeError(
            f"latent_image has shape {tuple(x.shape)}, this model needs [batch, {ch}, h, w]",
            input_name="latent_image",
            hint="make the latent with EmptyLatentImage or this model's VAE",
        )
    return x.float()


def sample(
    model: Any,
    seed: int,
    cfg: float,
    sampler_name: str,
    sigmas: torch.Tensor,
    positive: list,
    negative: list,
    latent: dict,
    add_noise: bool = True,
) -> dict:
    x = _check_inputs(model, positive, negative, latent)
    out = dict(latent)
    if len(sigmas) < 2:
        return out
    noise = make_noise(seed, tuple(x.shape), latent.get("batch_index")) if add_noise else torch.zeros_like(x)
    device = model.device
    ctx = engine.current()
    previews = bool(ctx is not None and ctx.wants_previews)
    steps = len(sigmas) - 1

    def callback(i: int, x0: torch.Tensor) -> None:
        if ctx is None:
            return
        pv = preview_from_image(latent_to_image(x0, model.preview_vae)) if previews else None
        ctx.progress(i + 1, steps, preview=pv)

    x_dev, noise_dev = x.to(device), noise.to(device)
    with model.patched() as unet:
        guider = Guider(model, unet, positive, negative, cfg, tuple(x.shape))
        denoise = guider
        mask = latent.get("noise_mask")
        if mask is not None:
            mask = prepare_mask(mask, tuple(x.shape)).to(device)
            denoise = masked_denoiser(guider, x_dev, noise_dev, mask)
        s0 = float(sigmas[0])
        # from pure noise (the top of the schedule), x has the variance of data plus noise: 1 + sigma^2
        scale = math.sqrt(1 + s0 * s0) if s0 >= model.sampling.sigma_max * 0.999 else s0
        start = x_dev + noise_dev * scale
        result = run_sampler(sampler_name, denoise, start, sigmas.to(torch.float32), seed, callback)
        if mask is not None:
            result = result * mask + x_dev * (1 - mask)
    out["samples"] = result.float().cpu()
    return out


_SEED = Int(min=0, max=SEED_MAX, control_after_generate=True, tooltip="The random seed used for creating the noise.")
_STEPS = Int(min=1, max=10000, tooltip="The number of steps used in the denoising process.")
_CFG = Float(
    min=0.0,
    max=100.0,
    step=0.1,
    round=0.01,
    tooltip="Classifier-free guidance scale: how closely to follow the prompt.",
)


class KSampler(engine.Node):
    """Denoises a latent with the given model, prompts, sampler and scheduler."""

    category = "sampling"
    outputs = [Output("LATENT", tooltip="The denoised latent.")]

    def run(
        self,
        *,
        model: Annotated[Any, Socket("MODEL")],
        seed: Annotated[int, _SEED] = 0,
        steps: Annotated[int, _STEPS] = 20,
        cfg: Annotated[float, _CFG] = 8.0,
        sampler_name: Annotated[str, Combo(SAMPLER_NAMES)] = "euler",
        scheduler: Annotated[str, Combo(SCHEDULER_NAMES)] = "simple",
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        latent_image: Annotated[Any, Socket("LATENT")],
        denoise: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0,
    ):
        sigmas = sigmas_for(model.sampling, scheduler, steps, denoise)
        return sample(model, seed, cfg, sampler_name, sigmas, positive, negative, latent_image)


class KSamplerAdvanced(engine.Node):
    """KSampler with control over noise and the range of steps (for multi-pass workflows)."""

    display_name = "KSampler (Advanced)"
    category = "sampling"
    outputs = ("LATENT",)

    def run(
        self,
        *,
        model: Annotated[Any, Socket("MODEL")],
        add_noise: Annotated[str, Combo(["enable", "disable"])] = "enable",
        noise_seed: Annotated[int, _SEED] = 0,
        steps: Annotated[int, _STEPS] = 20,
        cfg: Annotated[float, _CFG] = 8.0,
        sampler_name: Annotated[str, Combo(SAMPLER_NAMES)] = "euler",
        scheduler: Annotated[str, Combo(SCHEDULER_NAMES)] = "simple",
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        latent_image: Annotated[Any, Socket("LATENT")],
        start_at_step: Annotated[int, Int(min=0, max=10000)] = 0,
        end_at_step: Annotated[int, Int(min=0, max=10000)] = 10000,
        return_with_leftover_noise: Annotated[str, Combo(["disable", "enable"])] = "disable",
    ):
        sigmas = calculate_sigmas(model.sampling, scheduler, steps)
        if end_at_step < steps:
            sigmas = sigmas[: end_at_step + 1].clone()
            if return_with_leftover_noise == "disable":
                sigmas[-1] = 0
        sigmas = sigmas[start_at_step:] if start_at_step < len(sigmas) - 1 else sigmas[:0]
        return sample(
            model,
            noise_seed,
            cfg,
            sampler_name,
            sigmas,
            positive,
            negative,
            latent_image,
            add_noise=add_noise == "enable",
        )


NODES = [KSampler, KSamplerAdvanced]
