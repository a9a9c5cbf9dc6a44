"""Custom sampling: the sampler, noise and driver nodes that take a graph apart where KSampler is one node.

A run is assembled from values: NOISE (where the starting noise comes from), GUIDER (model plus prompts
and guidance), SAMPLER (an algorithm and its options) and SIGMAS (the noise levels to visit, from the
scheduler nodes). SamplerCustomAdvanced runs them through the same machinery as KSampler
(:func:`kiln.nodes.sampling.run_sampling`), so KSamplerSelect + BasicScheduler + CFGGuider + RandomNoise
gives KSampler's latent bit for bit. Both custom samplers also return ``denoised_output``: the model's
prediction of the clean latent at the last step.

One module, past the usual size: ComfyUI's custom-sampling family, whose nodes share the NOISE and
SAMPLER value types and their input checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import SEED_MAX, Boolean, Combo, Float, Int, NodeError, Output, Socket
from kiln.nodes.sampling import (
    check_conditioning,
    check_latent_for,
    check_model,
    check_sampler_name,
    check_sigmas,
    make_cfg_guider,
    run_sampling,
)
from kiln.nodes.sd.model_patch import effective_sampling
from kiln.nodes.sd.noise import make_noise
from kiln.nodes.sd.samplers import SAMPLER_NAMES, SamplerChoice

CATEGORY = "sampling/custom_sampling"
SAMPLERS_CATEGORY = "sampling/custom_sampling/samplers"
NOISE_CATEGORY = "sampling/custom_sampling/noise"

_NO_ROUND = {"round": False}


def _opt(tooltip: str) -> Any:
    return Float(min=0.0, max=100.0, step=0.01, tooltip=tooltip, extra=_NO_ROUND)


# -- NOISE values ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomNoiseSource:
    """NOISE: Gaussian noise from a seed, drawn on the CPU for the latent it is asked for."""

    seed: int

    def generate(self, latent: dict) -> torch.Tensor:
        x = latent["samples"]
        return make_noise(self.seed, tuple(x.shape), latent.get("batch_index"))

    generate_noise = generate  # the name ComfyUI's node packs call

    def __kiln_fingerprint__(self) -> bytes:
        return f"RandomNoise:{int(self.seed)}".encode()


@dataclass(frozen=True)
class DisabledNoise:
    """NOISE: none at all (the latent already carries its noise); step noise still uses ``seed``."""

    seed: int = 0

    def generate(self, latent: dict) -> torch.Tensor:
        return torch.zeros_like(latent["samples"], dtype=torch.float32)

    generate_noise = generate

    def __kiln_fingerprint__(self) -> bytes:
        return b"DisableNoise"


def _check_noise(noise: Any) -> Any:
    if not callable(getattr(noise, "generate", None)) and not callable(getattr(noise, "generate_noise", None)):
        raise NodeError("noise is not a NOISE", input_name="noise", hint="connect RandomNoise or DisableNoise")
    return noise


def _generate(noise: Any, latent: dict) -> torch.Tensor:
    gen = getattr(noise, "generate", None) or noise.generate_noise
    return gen(latent)


def _check_noise_for(latent: dict, sigmas: torch.Tensor, disabled: bool, input_name: str, hint: str) -> None:
    """Sampling an all-zero latent with no noise added denoises nothing: the result is meaningless."""
    if disabled and len(sigmas) >= 2 and float(sigmas[0]) > 0 and not torch.any(latent["samples"] != 0):
        raise NodeError(
            "no noise is added and the latent is empty (all zeros), so there is nothing to denoise",
            input_name=input_name,
            hint=hint,
        )


def _check_sampler(sampler: Any) -> SamplerChoice:
    if not isinstance(sampler, SamplerChoice):
        raise NodeError(
            "sampler is not a SAMPLER", input_name="sampler", hint="connect KSamplerSelect or a Sampler... node"
        )
    check_sampler_name(sampler.name, "sampler")
    return sampler


def _check_guider(guider: Any) -> Any:
    if not callable(getattr(guider, "denoiser", None)) or not hasattr(guider, "model"):
        raise NodeError("guider is not a GUIDER", input_name="guider", hint="connect CFGGuider or BasicGuider")
    check_model(guider.model, "guider")
    return guider


# -- the drivers ----------------------------------------------------------------------------------------------

_OUTPUTS = [
    Output("LATENT", "output", tooltip="The sampled latent."),
    Output("LATENT", "denoised_output", tooltip="The model's clean-latent prediction at the last step."),
]


class SamplerCustomAdvanced(engine.Node):
    """Runs a sampler over the given noise levels with a guider, starting from the given noise."""

    category = CATEGORY
    outputs = _OUTPUTS

    def run(
        self,
        *,
        noise: Annotated[Any, Socket("NOISE")],
        guider: Annotated[Any, Socket("GUIDER")],
        sampler: Annotated[Any, Socket("SAMPLER")],
        sigmas: Annotated[Any, Socket("SIGMAS")],
        latent_image: Annotated[Any, Socket("LATENT")],
    ):
        _check_noise(noise)
        _check_guider(guider)
        sampler = _check_sampler(sampler)
        sig = check_sigmas(sigmas)
        check_latent_for(guider.model, latent_image)
        if len(sig) < 2:
            return (dict(latent_image), dict(latent_image))
        _check_noise_for(
            latent_image,
            sig,
            isinstance(noise, DisabledNoise),
            "noise",
            "use RandomNoise, or add noise to the latent first (AddNoise) when you disable it here",
        )
        return run_sampling(guider, sampler, sig, latent_image, _generate(noise, latent_image), int(noise.seed))


class SamplerCustom(engine.Node):
    """SamplerCustomAdvanced with classifier-free guidance and the noise settings in one node."""

    category = CATEGORY
    outputs = _OUTPUTS

    def run(
        self,
        *,
        model: Annotated[Any, Socket("MODEL")],
        add_noise: Annotated[bool, Boolean(tooltip="Add seeded noise to the latent before sampling.")] = True,
        noise_seed: Annotated[
            int, Int(min=0, max=SEED_MAX, control_after_generate=True, tooltip="The seed of the noise.")
        ] = 0,
        cfg: Annotated[
            float, Float(min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale.")
        ] = 8.0,
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        sampler: Annotated[Any, Socket("SAMPLER")],
        sigmas: Annotated[Any, Socket("SIGMAS")],
        latent_image: Annotated[Any, Socket("LATENT")],
    ):
        check_model(model)
        for name, c in (("positive", positive), ("negative", negative)):
            check_conditioning(model, name, c)
        sampler = _check_sampler(sampler)
        sig = check_sigmas(sigmas)
        x = check_latent_for(model, latent_image)
        if len(sig) < 2:
            return (dict(latent_image), dict(latent_image))
        _check_noise_for(
            latent_image, sig, not add_noise, "add_noise", "turn add_noise on, or sample a latent that has content"
        )
        source = RandomNoiseSource(noise_seed) if add_noise else DisabledNoise(noise_seed)
        noise = source.generate(latent_image) if add_noise else torch.zeros_like(x)
        guider = make_cfg_guider(model, positive, negative, cfg)
        return run_sampling(guider, sampler, sig, latent_image, noise, int(noise_seed))


# -- NOISE nodes ------------------------------------------------------------------------------------------------


class RandomNoise(engine.Node):
    """Seeded Gaussian noise, the same as KSampler draws for the same seed."""

    category = NOISE_CATEGORY
    outputs = ("NOISE",)

    def run(
        self,
        *,
        noise_seed: Annotated[
            int, Int(min=0, max=SEED_MAX, control_after_generate=True, tooltip="The seed of the noise.")
        ] = 0,
    ):
        return RandomNoiseSource(int(noise_seed))


class DisableNoise(engine.Node):
    """No starting noise: for latents that already carry theirs (AddNoise, a first KSamplerAdvanced pass)."""

    category = NOISE_CATEGORY
    outputs = ("NOISE",)

    def run(self):
        return DisabledNoise()


class AddNoise(engine.Node):
    """Adds noise to a latent at the size the schedule covers (its first minus its last noise level)."""

    category = "_for_testing/custom_sampling/noise"
    outputs = ("LATENT",)

    def run(
        self,
        *,
        model: Annotated[Any, Socket("MODEL")],
        noise: Annotated[Any, Socket("NOISE")],
        sigmas: Annotated[Any, Socket("SIGMAS")],
        latent_image: Annotated[Any, Socket("LATENT")],
    ):
        check_model(model)
        _check_noise(noise)
        sig = check_sigmas(sigmas)
        x = check_latent_for(model, latent_image)
        if len(sig) == 0:
            return dict(latent_image)
        scale = (sig[0] - sig[-1]).abs() if len(sig) > 1 else sig[0]
        drawn = _generate(noise, latent_image).float()
        noisy = effective_sampling(model).noise_scaling(scale, drawn, x)
        out = dict(latent_image)
        out["samples"] = torch.nan_to_num(noisy, nan=0.0, posinf=0.0, neginf=0.0)
        return out


# -- SAMPLER nodes ----------------------------------------------------------------------------------------------

_ETA = Float(min=0.0, max=100.0, step=0.01, tooltip="How much fresh noise each step adds (0: none).", extra=_NO_ROUND)
_S_NOISE = Float(min=0.0, max=100.0, step=0.01, tooltip="Scale of the added noise.", extra=_NO_ROUND)
_NOISE_DEVICE = Combo(["gpu", "cpu"], tooltip="Where the Brownian-tree noise is drawn (each gives its own picture).")


def _tree(name: str, device: str) -> str:
    return name if device == "cpu" else name + "_gpu"


class KSamplerSelect(engine.Node):
    """A sampler by name, with its default settings."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(self, *, sampler_name: Annotated[str, Combo(SAMPLER_NAMES, tooltip="The sampling algorithm.")]):
        check_sampler_name(sampler_name, "sampler_name")
        return SamplerChoice(sampler_name)


class SamplerEulerAncestral(engine.Node):
    """Euler ancestral: Euler steps that add fresh noise each time."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(self, *, eta: Annotated[float, _ETA] = 1.0, s_noise: Annotated[float, _S_NOISE] = 1.0):
        return SamplerChoice.of("euler_ancestral", eta=eta, s_noise=s_noise)


class SamplerEulerAncestralCFGPP(engine.Node):
    """Euler ancestral with CFG++ (the step direction uses the negative prompt's prediction)."""

    display_name = "SamplerEulerAncestralCFG++"
    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(
        self,
        *,
        eta: Annotated[
            float, Float(min=0.0, max=1.0, step=0.01, tooltip="Fresh noise per step.", extra=_NO_ROUND)
        ] = 1.0,
        s_noise: Annotated[float, Float(min=0.0, max=10.0, step=0.01, tooltip="Noise scale.", extra=_NO_ROUND)] = 1.0,
    ):
        return SamplerChoice.of("euler_ancestral_cfg_pp", eta=eta, s_noise=s_noise)


class SamplerEulerCFGpp(engine.Node):
    """Euler with CFG++; "alternative" is the formulation that adds the guidance difference to the slope."""

    display_name = "SamplerEulerCFG++"
    category = "_for_testing"
    experimental = True
    outputs = ("SAMPLER",)

    def run(self, *, version: Annotated[str, Combo(["regular", "alternative"], v3=True)] = "regular"):
        return SamplerChoice("euler_cfg_pp_alt" if version == "alternative" else "euler_cfg_pp")


class SamplerDPMPP_2M_SDE(engine.Node):
    """DPM-Solver++(2M) SDE, with Brownian-tree noise."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(
        self,
        *,
        solver_type: Annotated[str, Combo(["midpoint", "heun"], tooltip="The second-order correction.")] = "midpoint",
        eta: Annotated[float, _ETA] = 1.0,
        s_noise: Annotated[float, _S_NOISE] = 1.0,
        noise_device: Annotated[str, _NOISE_DEVICE] = "gpu",
    ):
        name = _tree("dpmpp_2m_sde", noise_device)
        return SamplerChoice.of(name, eta=eta, s_noise=s_noise, solver_type=solver_type)


class SamplerDPMPP_3M_SDE(engine.Node):
    """DPM-Solver++(3M) SDE, with Brownian-tree noise."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(
        self,
        *,
        eta: Annotated[float, _ETA] = 1.0,
        s_noise: Annotated[float, _S_NOISE] = 1.0,
        noise_device: Annotated[str, _NOISE_DEVICE] = "gpu",
    ):
        return SamplerChoice.of(_tree("dpmpp_3m_sde", noise_device), eta=eta, s_noise=s_noise)


class SamplerDPMPP_SDE(engine.Node):
    """DPM-Solver++ SDE (two model calls per step, the second at ratio ``r`` of the step), Brownian noise."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(
        self,
        *,
        eta: Annotated[float, _ETA] = 1.0,
        s_noise: Annotated[float, _S_NOISE] = 1.0,
        r: Annotated[
            float, Float(min=0.0, max=100.0, step=0.01, tooltip="Where the middle evaluation sits.", extra=_NO_ROUND)
        ] = 0.5,
        noise_device: Annotated[str, _NOISE_DEVICE] = "gpu",
    ):
        return SamplerChoice.of(_tree("dpmpp_sde", noise_device), eta=eta, s_noise=s_noise, r=r)


class SamplerDPMPP_2S_Ancestral(engine.Node):
    """DPM-Solver++(2S) ancestral."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(self, *, eta: Annotated[float, _ETA] = 1.0, s_noise: Annotated[float, _S_NOISE] = 1.0):
        return SamplerChoice.of("dpmpp_2s_ancestral", eta=eta, s_noise=s_noise)


class SamplerLMS(engine.Node):
    """Linear multistep of the given order."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(self, *, order: Annotated[int, Int(min=1, max=100, tooltip="How many earlier slopes to use.")] = 4):
        return SamplerChoice.of("lms", order=int(order))


class SamplerDPMAdaptative(engine.Node):
    """DPM-Solver with adaptive step size (it picks its own steps between the first and last sigma)."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(
        self,
        *,
        order: Annotated[int, Int(min=2, max=3, tooltip="Solver order.")] = 3,
        rtol: Annotated[float, _opt("Relative error tolerance.")] = 0.05,
        atol: Annotated[float, _opt("Absolute error tolerance.")] = 0.0078,
        h_init: Annotated[float, _opt("First step size (in log sigma).")] = 0.05,
        pcoeff: Annotated[float, _opt("Step controller: proportional term.")] = 0.0,
        icoeff: Annotated[float, _opt("Step controller: integral term.")] = 1.0,
        dcoeff: Annotated[float, _opt("Step controller: derivative term.")] = 0.0,
        accept_safety: Annotated[float, _opt("Accept a step when the error factor is above this.")] = 0.81,
        eta: Annotated[float, _ETA] = 0.0,
        s_noise: Annotated[float, _S_NOISE] = 1.0,
    ):
        return SamplerChoice.of(
            "dpm_adaptive",
            order=int(order),
            rtol=rtol,
            atol=atol,
            h_init=h_init,
            pcoeff=pcoeff,
            icoeff=icoeff,
            dcoeff=dcoeff,
            accept_safety=accept_safety,
            eta=eta,
            s_noise=s_noise,
        )


class SamplerLCMUpscale(engine.Node):
    """LCM sampling that also enlarges the latent over the first steps."""

    category = SAMPLERS_CATEGORY
    outputs = ("SAMPLER",)

    def run(
        self,
        *,
        scale_ratio: Annotated[float, Float(min=0.1, max=20.0, step=0.01, tooltip="Total enlargement.")] = 1.0,
        scale_steps: Annotated[
            int, Int(min=-1, max=1000, step=1, tooltip="Steps to spread it over (-1: about half the steps).")
        ] = -1,
        upscale_method: Annotated[
            str, Combo(["bislerp", "nearest-exact", "bilinear", "area", "bicubic"], v3=True)
        ] = "bislerp",
    ):
        return SamplerChoice.of(
            "lcm_upscale",
            total_upscale=scale_ratio,
            upscale_steps=None if scale_steps < 0 else int(scale_steps),
            upscale_method=upscale_method,
        )


NODES = [
    SamplerCustom,
    SamplerCustomAdvanced,
    RandomNoise,
    DisableNoise,
    AddNoise,
    KSamplerSelect,
    SamplerEulerAncestral,
    SamplerEulerAncestralCFGPP,
    SamplerEulerCFGpp,
    SamplerDPMPP_2M_SDE,
    SamplerDPMPP_3M_SDE,
    SamplerDPMPP_SDE,
    SamplerDPMPP_2S_Ancestral,
    SamplerLMS,
    SamplerDPMAdaptative,
    SamplerLCMUpscale,
]
