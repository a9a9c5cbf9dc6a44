"""Schedulers and sigma tools for custom sampling: nodes that make, cut, flip and stretch SIGMAS.

SIGMAS is a 1-D float32 tensor of noise levels, highest first, normally ending at 0; a sampler takes one
step per consecutive pair. The schedule maths lives in :mod:`kiln.nodes.sd.schedules` (new families and
tables) and :mod:`kiln.nodes.sd.samplers` (the KSampler's schedulers); these nodes check their inputs and
give ComfyUI's results, including its empty SIGMAS where it returns one (denoise 0).

One module past the usual size: it is one family (ComfyUI's custom-sampling schedulers and sigma tools),
sixteen small nodes that share the same input checks.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Boolean, Combo, Float, Int, NodeError, Output, Socket
from kiln.nodes.sd import schedules
from kiln.nodes.sd.model_patch import effective_sampling
from kiln.nodes.sd.samplers import SCHEDULERS, calculate_sigmas

SCHED_CATEGORY = "sampling/custom_sampling/schedulers"
SIGMA_CATEGORY = "sampling/custom_sampling/sigmas"

# ComfyUI's scheduler names, in its order (BasicScheduler's declared choices).
BASIC_SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]

_SIGMA_BOUND = {"min": 0.0, "max": 5000.0, "step": 0.01}
_NO_ROUND = {"round": False}
_SIGMAS_OUT = Output("SIGMAS", tooltip="The noise levels to visit, highest first.")


def _bound(tooltip: str):
    return Float(**_SIGMA_BOUND, tooltip=tooltip, extra=_NO_ROUND)


def _model_sampling(model: Any) -> Any:
    if not hasattr(model, "sampling"):
        raise NodeError("model is not a MODEL", input_name="model", hint="connect the MODEL output of a loader")
    return effective_sampling(model)


def _steps(steps: int) -> int:
    if int(steps) < 1:
        raise NodeError(f"steps is {steps}; a schedule needs at least 1 step", input_name="steps")
    return int(steps)


def _sigmas(value: Any, minimum: int = 0) -> torch.Tensor:
    """A SIGMAS input as a 1-D float32 tensor with at least ``minimum`` values."""
    if not isinstance(value, torch.Tensor) or value.ndim != 1:
        raise NodeError(
            "sigmas is not a SIGMAS (a 1-D list of noise levels)",
            input_name="sigmas",
            hint="connect the output of a scheduler node such as BasicScheduler",
        )
    if len(value) < minimum:
        raise NodeError(
            f"sigmas has {len(value)} value(s), this node needs at least {minimum}",
            input_name="sigmas",
            hint="connect a schedule with at least one step (steps >= 1 and denoise > 0)",
        )
    return value.detach().to("cpu", torch.float32)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise NodeError(f"{name} is {value}; this schedule takes its logarithm, so it must be above 0", input_name=name)


def basic_sigmas(ms: Any, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """BasicScheduler's result: a schedule of steps / denoise steps of which the last ``steps`` are kept."""
    if denoise <= 0:
        return torch.zeros(0)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return calculate_sigmas(ms, scheduler, total).to(torch.float32)[-(steps + 1) :]


class BasicScheduler(engine.Node):
    """The KSampler's schedule for a model, as SIGMAS (for the custom sampling nodes)."""

    display_name = "BasicScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        model: Annotated[Any, Socket("MODEL", tooltip="The model whose sigma table the schedule spans.")],
        scheduler: Annotated[str, Combo(BASIC_SCHEDULERS, tooltip="How the steps are spaced.")] = "simple",
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        denoise: Annotated[
            float, Float(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the schedule to run (img2img).")
        ] = 1.0,
    ):
        if scheduler not in SCHEDULERS:
            raise NodeError(
                f"unknown scheduler {scheduler!r}", input_name="scheduler", hint=", ".join(BASIC_SCHEDULERS)
            )
        return basic_sigmas(_model_sampling(model), scheduler, _steps(steps), denoise)


class KarrasScheduler(engine.Node):
    """Karras et al.'s schedule: steps evenly spaced in sigma^(1/rho)."""

    display_name = "KarrasScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        sigma_max: Annotated[float, _bound("The first (highest) noise level.")] = 14.614642,
        sigma_min: Annotated[float, _bound("The last noise level before 0.")] = 0.0291675,
        rho: Annotated[
            float,
            Float(min=0.0, max=100.0, step=0.01, tooltip="Higher spends more steps at low noise.", extra=_NO_ROUND),
        ] = 7.0,
    ):
        if not rho > 0:
            raise NodeError(f"rho is {rho}; it must be above 0 (7 is the usual value)", input_name="rho")
        return schedules.karras(_steps(steps), sigma_min, sigma_max, rho)


class ExponentialScheduler(engine.Node):
    """Steps evenly spaced in log sigma."""

    display_name = "ExponentialScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        sigma_max: Annotated[float, _bound("The first (highest) noise level.")] = 14.614642,
        sigma_min: Annotated[float, _bound("The last noise level before 0.")] = 0.0291675,
    ):
        _positive("sigma_max", sigma_max)
        _positive("sigma_min", sigma_min)
        return schedules.exponential(_steps(steps), sigma_min, sigma_max)


class PolyexponentialScheduler(engine.Node):
    """log sigma falls from sigma_max to sigma_min along a power curve (rho 1 is exponential)."""

    display_name = "PolyexponentialScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        sigma_max: Annotated[float, _bound("The first (highest) noise level.")] = 14.614642,
        sigma_min: Annotated[float, _bound("The last noise level before 0.")] = 0.0291675,
        rho: Annotated[
            float, Float(min=0.0, max=100.0, step=0.01, tooltip="The power of the curve.", extra=_NO_ROUND)
        ] = 1.0,
    ):
        _positive("sigma_max", sigma_max)
        _positive("sigma_min", sigma_min)
        return schedules.polyexponential(_steps(steps), sigma_min, sigma_max, rho)


class VPScheduler(engine.Node):
    """The continuous variance-preserving SDE's noise levels."""

    display_name = "VPScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        beta_d: Annotated[float, Float(**_SIGMA_BOUND, tooltip="Growth of beta over time.", extra=_NO_ROUND)] = 19.9,
        beta_min: Annotated[float, Float(**_SIGMA_BOUND, tooltip="beta at time 0.", extra=_NO_ROUND)] = 0.1,
        eps_s: Annotated[
            float, Float(min=0.0, max=1.0, step=0.0001, tooltip="The last time (before 0).", extra=_NO_ROUND)
        ] = 0.001,
    ):
        return schedules.vp(_steps(steps), beta_d, beta_min, eps_s)


class BetaSamplingScheduler(engine.Node):
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution, on the model's sigma table."""

    display_name = "BetaSamplingScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        model: Annotated[Any, Socket("MODEL", tooltip="The model whose sigma table the schedule spans.")],
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        alpha: Annotated[
            float, Float(min=0.0, max=50.0, step=0.01, tooltip="Beta distribution alpha.", extra=_NO_ROUND)
        ] = 0.6,
        beta: Annotated[
            float, Float(min=0.0, max=50.0, step=0.01, tooltip="Beta distribution beta.", extra=_NO_ROUND)
        ] = 0.6,
    ):
        from kiln.nodes.sd.samplers import sched_beta

        for name, v in (("alpha", alpha), ("beta", beta)):
            if not v > 0:
                raise NodeError(f"{name} is {v}; the Beta distribution needs it above 0", input_name=name)
        return sched_beta(_model_sampling(model), _steps(steps), alpha=alpha, beta=beta).to(torch.float32)


class LaplaceScheduler(engine.Node):
    """log sigma at the quantiles of a Laplace(mu, beta) distribution, clamped to [sigma_min, sigma_max]."""

    display_name = "LaplaceScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 20,
        sigma_max: Annotated[float, _bound("The highest noise level.")] = 14.614642,
        sigma_min: Annotated[float, _bound("The lowest noise level.")] = 0.0291675,
        mu: Annotated[
            float, Float(min=-10.0, max=10.0, step=0.1, tooltip="Centre of log sigma.", extra=_NO_ROUND)
        ] = 0.0,
        beta: Annotated[
            float, Float(min=0.0, max=10.0, step=0.1, tooltip="Spread of log sigma.", extra=_NO_ROUND)
        ] = 0.5,
    ):
        return schedules.laplace(_steps(steps), sigma_min, sigma_max, mu, beta)


class AlignYourStepsScheduler(engine.Node):
    """NVIDIA's Align Your Steps noise levels for SD1, SDXL or SVD, stretched to the step count."""

    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        model_type: Annotated[str, Combo(["SD1", "SDXL", "SVD"], v3=True, tooltip="The model family.")] = "SD1",
        steps: Annotated[int, Int(min=1, max=10000, tooltip="Number of sampling steps.")] = 10,
        denoise: Annotated[
            float, Float(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the schedule to run (img2img).")
        ] = 1.0,
    ):
        if model_type not in schedules.AYS_NOISE_LEVELS:
            raise NodeError(f"unknown model_type {model_type!r}", input_name="model_type", hint="SD1, SDXL or SVD")
        return schedules.align_your_steps(model_type, _steps(steps), denoise)


class GITSScheduler(engine.Node):
    """GITS time steps (optimised for SD-style models) for a gradient coefficient."""

    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        coeff: Annotated[
            float, Float(min=0.8, max=1.5, step=0.05, tooltip="The gradient coefficient the table was tuned for.")
        ] = 1.2,
        steps: Annotated[int, Int(min=2, max=1000, tooltip="Number of sampling steps.")] = 10,
        denoise: Annotated[
            float, Float(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the schedule to run (img2img).")
        ] = 1.0,
    ):
        key = round(coeff * 20) / 20
        if abs(coeff - key) > 1e-6 or round(key, 2) not in schedules.GITS_COEFFS:
            raise NodeError(
                f"coeff is {coeff}; the GITS tables exist for 0.80, 0.85, ..., 1.50",
                input_name="coeff",
                hint="use a multiple of 0.05 between 0.8 and 1.5",
            )
        if steps < 2:
            raise NodeError(f"steps is {steps}; GITS needs at least 2", input_name="steps")
        return schedules.gits(round(key, 2), steps, denoise)


class SDTurboScheduler(engine.Node):
    """SD-Turbo's few-step schedule (timesteps 999, 899, ...) on the model's sigma table."""

    display_name = "SDTurboScheduler"
    category = SCHED_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        model: Annotated[Any, Socket("MODEL", tooltip="The model whose sigma table the schedule reads.")],
        steps: Annotated[int, Int(min=1, max=10, tooltip="Number of sampling steps.")] = 1,
        denoise: Annotated[
            float, Float(min=0, max=1.0, step=0.01, tooltip="Fraction of the schedule to run (img2img).")
        ] = 1.0,
    ):
        return schedules.sd_turbo(_model_sampling(model), _steps(steps), denoise)


class SplitSigmas(engine.Node):
    """Cuts a schedule at a step: high_sigmas runs steps 0..step, low_sigmas the rest (they share one sigma)."""

    display_name = "SplitSigmas"
    category = SIGMA_CATEGORY
    outputs = [
        Output("SIGMAS", "high_sigmas", tooltip="The schedule up to and including the split sigma."),
        Output("SIGMAS", "low_sigmas", tooltip="The schedule from the split sigma on."),
    ]

    def run(
        self,
        sigmas: Annotated[Any, Socket("SIGMAS", tooltip="The schedule to cut.")],
        step: Annotated[int, Int(min=0, max=10000, tooltip="The step where the low part starts.")] = 0,
    ):
        sig = _sigmas(sigmas)
        if step < 0:
            raise NodeError(f"step is {step}; it must be 0 or more", input_name="step")
        return sig[: step + 1], sig[step:]


class SplitSigmasDenoise(engine.Node):
    """Cuts a schedule so that low_sigmas holds the last ``denoise`` fraction of its steps."""

    display_name = "SplitSigmasDenoise"
    category = SIGMA_CATEGORY
    outputs = [
        Output("SIGMAS", "high_sigmas", tooltip="The first steps of the schedule."),
        Output("SIGMAS", "low_sigmas", tooltip="The last round(steps * denoise) steps."),
    ]

    def run(
        self,
        sigmas: Annotated[Any, Socket("SIGMAS", tooltip="The schedule to cut.")],
        denoise: Annotated[
            float, Float(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the steps that go to low_sigmas.")
        ] = 1.0,
    ):
        sig = _sigmas(sigmas)
        steps = max(len(sig) - 1, 0)
        low_steps = round(steps * denoise)
        # with no low steps, every step is high (ComfyUI's slice gives an empty high part there)
        high = sig[: len(sig) - low_steps] if low_steps else sig
        return high, sig[-(low_steps + 1) :]


class FlipSigmas(engine.Node):
    """Reverses a schedule (lowest first, for inversion); a first sigma of 0 becomes 0.0001."""

    display_name = "FlipSigmas"
    category = SIGMA_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(self, sigmas: Annotated[Any, Socket("SIGMAS", tooltip="The schedule to reverse.")]):
        sig = _sigmas(sigmas)
        if len(sig) == 0:
            return sig
        out = sig.flip(0).clone()
        if out[0] == 0:
            out[0] = 0.0001
        return out


class SetFirstSigma(engine.Node):
    """Replaces the first (starting) noise level of a schedule."""

    display_name = "SetFirstSigma"
    category = SIGMA_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        sigmas: Annotated[Any, Socket("SIGMAS", tooltip="The schedule to change.")],
        sigma: Annotated[
            float, Float(min=0.0, max=20000.0, step=0.001, tooltip="The new first sigma.", extra=_NO_ROUND)
        ] = 136.0,
    ):
        out = _sigmas(sigmas, minimum=1).clone()
        out[0] = sigma
        return out


class ExtendIntermediateSigmas(engine.Node):
    """Inserts ``steps - 1`` sigmas inside each step whose start lies in [end_at_sigma, start_at_sigma]."""

    display_name = "ExtendIntermediateSigmas"
    category = SIGMA_CATEGORY
    outputs = [_SIGMAS_OUT]

    def run(
        self,
        sigmas: Annotated[Any, Socket("SIGMAS", tooltip="The schedule to refine.")],
        steps: Annotated[int, Int(min=1, max=100, tooltip="Each chosen step becomes this many steps.")] = 2,
        start_at_sigma: Annotated[
            float,
            Float(
                min=-1.0,
                max=20000.0,
                step=0.01,
                tooltip="Refine steps at or below this sigma (-1: no limit).",
                extra=_NO_ROUND,
            ),
        ] = -1.0,
        end_at_sigma: Annotated[
            float,
            Float(min=0.0, max=20000.0, step=0.01, tooltip="Refine steps at or above this sigma.", extra=_NO_ROUND),
        ] = 12.0,
        spacing: Annotated[
            str, Combo(["linear", "cosine", "sine"], tooltip="Where the new sigmas fall inside a step.")
        ] = "linear",
    ):
        sig = _sigmas(sigmas)
        _steps(steps)
        top = math.inf if start_at_sigma < 0 else start_at_sigma
        u = torch.linspace(0, 1, steps + 1)[1:-1]
        if spacing == "cosine":  # dense near the step's end
            frac = torch.sin(u * math.pi / 2)
        elif spacing == "sine":  # dense near the step's start
            frac = 1 - torch.cos(u * math.pi / 2)
        elif spacing == "linear":
            frac = u
        else:
            raise NodeError(f"unknown spacing {spacing!r}", input_name="spacing", hint="linear, cosine or sine")
        out: list[float] = []
        for a, b in zip(sig[:-1].tolist(), sig[1:].tolist()):
            out.append(a)
            if end_at_sigma <= a <= top:
                out.extend((a + frac * (b - a)).tolist())
        if len(sig):
            out.append(float(sig[-1]))
        return torch.tensor(out, dtype=torch.float32)


class SamplingPercentToSigma(engine.Node):
    """The model's sigma after a fraction of the denoising (0: the start, 1: the end)."""

    display_name = "SamplingPercentToSigma"
    category = SIGMA_CATEGORY
    outputs = [Output("FLOAT", "sigma_value", tooltip="The sigma at that point of the schedule.")]

    def run(
        self,
        model: Annotated[Any, Socket("MODEL", tooltip="The model whose sigma table is read.")],
        sampling_percent: Annotated[
            float, Float(min=0.0, max=1.0, step=0.0001, tooltip="0 is the start of sampling, 1 the end.")
        ] = 0.0,
        return_actual_sigma: Annotated[
            bool,
            Boolean(
                tooltip="Give the model's real sigma_max / sigma_min at 0 and 1 instead of the values used "
                "for range checks (a huge number and 0)."
            ),
        ] = False,
    ):
        ms = _model_sampling(model)
        if sampling_percent <= 0.0:
            return float(ms.sigma_max) if return_actual_sigma else 999999999.9
        if sampling_percent >= 1.0:
            return float(ms.sigma_min) if return_actual_sigma else 0.0
        return float(ms.percent_to_sigma(sampling_percent))


NODES = [
    BasicScheduler,
    KarrasScheduler,
    ExponentialScheduler,
    PolyexponentialScheduler,
    VPScheduler,
    BetaSamplingScheduler,
    LaplaceScheduler,
    AlignYourStepsScheduler,
    GITSScheduler,
    SDTurboScheduler,
    SplitSigmas,
    SplitSigmasDenoise,
    FlipSigmas,
    SetFirstSigma,
    ExtendIntermediateSigmas,
    SamplingPercentToSigma,
]
