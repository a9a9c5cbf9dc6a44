"""KSampler and KSamplerAdvanced, and the sampling run every sampler node shares (:func:`run_sampling`).

A run follows ComfyUI step for step, so a seed gives its picture: KSampler's schedule (for dpm_2,
dpm_2_ancestral, uni_pc and uni_pc_bh2 one step longer with its second-to-last sigma dropped, as ComfyUI
computes it: :func:`kiln.nodes.sd.samplers.ksampler_sigmas`), initial noise from the seed on the CPU
(:func:`kiln.nodes.sd.noise.make_noise`), scaled by the model's ``noise_scaling`` (``sqrt(1 + sigma^2)``
from the top of the schedule, else ``sigma``), the sampler with the step noise it declares, and for
inpainting the unmasked latent noised to each step's sigma. Progress is reported every step (also the
cancellation point), with a preview of the predicted clean latent when a client asked for previews.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import SEED_MAX, Combo, Float, Int, NodeError, Output, Socket, TensorEstimate
from kiln.nodes.common import preview_from_image
from kiln.nodes.sd import guidance
from kiln.nodes.sd.model_patch import effective_sampling
from kiln.nodes.sd.noise import make_noise
from kiln.nodes.sd.preview import latent_to_image
from kiln.nodes.sd.samplers import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SamplerChoice,
    get_sampler,
    ksampler_sigmas,
    run_sampler,
    sigmas_for,
)


def check_model(model: Any, input_name: str = "model") -> Any:
    if not hasattr(model, "unet"):
        raise NodeError("model is not a MODEL", input_name=input_name, hint="connect the MODEL output of a loader")
    return model


def check_conditioning(model: Any, name: str, c: Any) -> None:
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


def check_latent_for(model: Any, latent: Any, input_name: str = "latent_image") -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise NodeError(f"{input_name} is not a LATENT", input_name=input_name)
    x = latent["samples"]
    ch = model.unet.config.in_channels
    if x.ndim != 4 or x.shape[1] not in (ch, 4):
        raise NodeError(
            f"{input_name} has shape {tuple(x.shape)}, this model needs [batch, {ch}, h, w]",
            input_name=input_name,
            hint="make the latent with EmptyLatentImage or this model's VAE",
        )
    return x.float()


def check_sigmas(sigmas: Any, input_name: str = "sigmas") -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise NodeError(
            "sigmas is not a SIGMAS (a 1-D list of noise levels)",
            input_name=input_name,
            hint="connect a scheduler node such as BasicScheduler or KarrasScheduler",
        )
    s = sigmas.detach().float().cpu()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise NodeError(
            f"sigmas must be finite and non-negative, got {s.tolist()[:8]}",
            input_name=input_name,
            hint="make the schedule with a scheduler node; noise levels are >= 0",
        )
    return s


def check_sampler_name(name: str, input_name: str) -> None:
    try:
        get_sampler(name)
    except KeyError as exc:
        raise NodeError(
            f"{exc.args[0]}",
            input_name=input_name,
            hint="pick another sampler; `kiln nodes KSamplerSelect` lists them",
        ) from None


def make_cfg_guider(model: Any, positive: list, negative: list, cfg: float) -> Any:
    """KSampler's guider: classifier-free guidance that honours the model's run-time patches."""
    return guidance.cfg_guider(model, positive, negative, cfg)


def _open_denoiser(guider: Any, shape: tuple[int, ...], sigmas: torch.Tensor, latent: torch.Tensor, mask):
    try:
        return guider.denoiser(shape, sigmas, latent_image=latent, noise_mask=mask)
    except TypeError:  # a guider whose denoiser takes only (latent_shape, sigmas)
        return guider.denoiser(shape, sigmas)


def run_sampling(
    guider: Any,
    sampler: SamplerChoice,
    sigmas: torch.Tensor,
    latent: dict,
    noise: torch.Tensor,
    seed: int,
    latent_input: str = "latent_image",
) -> tuple[dict, dict]:
    """One sampling run: ``(output, denoised_output)`` LATENTs, as ComfyUI's custom samplers return them.

    ``noise`` is the initial noise (zeros when noise is disabled), ``seed`` seeds the step noise. With fewer
    than two sigmas there is no step to take and the latent comes back unchanged.
    """
    model = guider.model
    x = check_latent_for(model, latent, latent_input)
    out = dict(latent)
    if len(sigmas) < 2:
        return out, out
    if tuple(noise.shape) != tuple(x.shape):
        raise NodeError(
            f"the noise has shape {tuple(noise.shape)} but {latent_input} has {tuple(x.shape)}",
            input_name="noise",
            hint="generate the noise for this latent (RandomNoise makes it to measure)",
        )
    device = model.device
    ctx = engine.current()
    previews = bool(ctx is not None and ctx.wants_previews)
    steps = len(sigmas) - 1
    last: dict[str, torch.Tensor] = {}

    def callback(i: int, x0: torch.Tensor) -> None:
        last["x0"] = x0
        if ctx is None:
            return
        pv = preview_from_image(latent_to_image(x0, model.preview_vae)) if previews else None
        ctx.progress(i + 1, steps, preview=pv)

    x_dev, noise_dev = x.to(device), noise.float().to(device)
    sig_dev = sigmas.float().to(device)
    mask = latent.get("noise_mask")
    if mask is not None:
        mask = guidance.prepare_mask(mask, tuple(x.shape)).to(device)
    with _open_denoiser(guider, tuple(x.shape), sig_dev, x_dev, mask) as denoise:
        ms = getattr(denoise, "model_sampling", None) or effective_sampling(model)
        if mask is not None:
            keep_noise = noise_dev
            if sampler.name == "ddim":  # ComfyUI's ddim re-noises the kept area with its own draw (seed + 1)
                keep_noise = make_noise((int(seed) + 1) % 2**64, tuple(x.shape)).to(device)
            denoise = guidance.masked_denoiser(denoise, x_dev, keep_noise, mask)
        start = ms.noise_scaling(sig_dev[0], noise_dev, x_dev, ms.is_max_denoise(sig_dev))
        result = run_sampler(sampler.name, denoise, start, sig_dev, seed, callback, sampler.kwargs)
        if mask is not None:
            result = result * mask + x_dev * (1 - mask)
    out["samples"] = result.float().cpu()
    denoised = dict(latent)
    denoised["samples"] = last["x0"].float().cpu() if "x0" in last else out["samples"]
    return out, denoised


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
    sampler_input: str = "sampler_name",
) -> dict:
    """KSampler's run: CFG guidance, noise from ``seed`` (or none), the named sampler with its defaults."""
    check_model(model)
    x = check_latent_for(model, latent)
    for name, c in (("positive", positive), ("negative", negative)):
        check_conditioning(model, name, c)
    check_sampler_name(sampler_name, sampler_input)
    if len(sigmas) < 2:
        return dict(latent)
    noise = make_noise(seed, tuple(x.shape), latent.get("batch_index")) if add_noise else torch.zeros_like(x)
    guider = make_cfg_guider(model, positive, negative, cfg)
    return run_sampling(guider, SamplerChoice(sampler_name), sigmas, latent, noise, seed)[0]


_SEED = Int(
    min=0, max=SEED_MAX, control_after_generate=True, tooltip="Seed for the starting noise (and any per-step noise)."
)
_STEPS = Int(min=1, max=10000, tooltip="How many denoising steps to take.")
_CFG = Float(
    min=0.0,
    max=100.0,
    step=0.1,
    round=0.01,
    tooltip="Classifier-free guidance scale: how closely to follow the prompt.",
)
_SAMPLER = Combo(SAMPLER_NAMES, tooltip="The algorithm that walks the noise levels down to a clean latent.")
_SCHEDULER = Combo(SCHEDULER_NAMES, tooltip="How the noise levels are spaced between the steps.")


def _schedule(model: Any, fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    check_model(model)
    return fn(effective_sampling(model))


def sampling_memory(latent: TensorEstimate | None) -> int | None:
    """Latent-sized tensors a sampling loop keeps (noise, x, the model's conditional and unconditional
    predictions, the denoised estimate, the result): about six; the model's own activations come on top."""
    return None if latent is None else 6 * latent.nbytes


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
        sampler_name: Annotated[str, _SAMPLER] = "euler",
        scheduler: Annotated[str, _SCHEDULER] = "simple",
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        latent_image: Annotated[Any, Socket("LATENT")],
        denoise: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0,
    ):
        sigmas = _schedule(model, lambda ms: sigmas_for(ms, scheduler, steps, denoise, sampler_name))
        return sample(model, seed, cfg, sampler_name, sigmas, positive, negative, latent_image)

    @classmethod
    def estimate_outputs(cls, latent_image: TensorEstimate | None = None, **_: Any) -> tuple:
        return (latent_image,)  # the denoised latent has the shape of the one it started from

    @classmethod
    def estimate_memory(cls, latent_image: TensorEstimate | None = None, **_: Any) -> int | None:
        return sampling_memory(latent_image)


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
        sampler_name: Annotated[str, _SAMPLER] = "euler",
        scheduler: Annotated[str, _SCHEDULER] = "simple",
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        latent_image: Annotated[Any, Socket("LATENT")],
        start_at_step: Annotated[int, Int(min=0, max=10000)] = 0,
        end_at_step: Annotated[int, Int(min=0, max=10000)] = 10000,
        return_with_leftover_noise: Annotated[str, Combo(["disable", "enable"])] = "disable",
    ):
        sigmas = _schedule(model, lambda ms: ksampler_sigmas(ms, scheduler, steps, sampler_name))
        if end_at_step < len(sigmas) - 1:
            sigmas = sigmas[: end_at_step + 1].clone()
            if return_with_leftover_noise == "disable":
                sigmas[-1] = 0
        if start_at_step >= len(sigmas) - 1:
            return dict(latent_image)  # nothing left to do: ComfyUI returns the latent as it came
        sigmas = sigmas[start_at_step:]
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

    @classmethod
    def estimate_outputs(cls, latent_image: TensorEstimate | None = None, **_: Any) -> tuple:
        return (latent_image,)

    @classmethod
    def estimate_memory(cls, latent_image: TensorEstimate | None = None, **_: Any) -> int | None:
        return sampling_memory(latent_image)


NODES = [KSampler, KSamplerAdvanced]
