"""The sigma table of a model, noise schedules and the sampler table, computed as ComfyUI computes them.

A discrete-time diffusion model (DDPM betas) is viewed as a denoiser ``D(x, sigma) -> x0`` on
``x = x0 + sigma * eps``. A *schedule* picks the decreasing sigmas to visit; a *sampler* walks them. Every
number that decides the picture (the sigma table, the schedules, the integer timestep fed to the UNet, the
samplers' step arithmetic in float32 tensors, the noise) follows ComfyUI, so a seed gives its picture.

The sampler contract (what :mod:`kiln.nodes.sd.solvers` follows too)
---------------------------------------------------------------------
A sampler is ``fn(denoise, x, sigmas, noise, callback, **options) -> Tensor``:

- ``denoise(x, sigma) -> x0``: the guided model. ``sigma`` is a 0-d float32 tensor on ``x``'s device
  (pass ``sigmas[i]`` or a value computed from it). It may carry attributes: ``model_sampling`` (the
  patched :class:`ModelSampling`) and, for CFG++ samplers, ``last_uncond_denoised`` (the negative
  prompt's x0 of the latest call; read it with ``getattr(denoise, "last_uncond_denoised", None)`` right
  after calling ``denoise``; ``None`` when the guider skipped the negative pass, at cfg 1).
- ``x``: the starting latent, already noised to ``sigmas[0]`` (float32, on the sampling device).
- ``sigmas``: 1-D float32 tensor on ``x``'s device, decreasing, usually ending in 0; ``len(sigmas) >= 2``.
  Index it (``sigmas[i]``) and compute with 0-d tensors as k-diffusion does, so rounding matches ComfyUI.
- ``noise(sigma, sigma_next) -> Tensor``: ComfyUI's ``noise_sampler``: unit Gaussian noise of ``x``'s
  shape, dtype and device for the step from ``sigma`` to ``sigma_next``. Which source a sampler gets is
  declared on the function: ``fn.noise_kind = "default"`` (the default when unset: a generator on the
  device seeded with the seed, one draw per call, as ComfyUI's ``default_noise_sampler``), ``"brownian"``
  (ComfyUI's ``BrownianTreeNoiseSampler`` on the CPU over the schedule's smallest positive and largest
  sigma) or ``"brownian_gpu"`` (the same tree on the device, ComfyUI's ``*_gpu`` samplers). Use
  :func:`noise_kind` as a decorator; an undeclared entry named after one of ComfyUI's Brownian samplers
  (dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde and their ``_gpu`` twins) gets the tree
  anyway, and a missing ``*_gpu`` twin is made from its base. Call ``noise`` exactly where ComfyUI calls
  its noise sampler (and only there), with the same arguments, so draws line up. It may be ``None`` for
  deterministic samplers called directly. ``noise.fresh(shape)`` (default source only) draws another
  shape from the same stream.
- ``callback(i, x0)``: once per step ``i`` (0-based), with the step's x0 prediction (progress/previews).
- ``options``: ComfyUI's k-diffusion keyword names and defaults (``eta``, ``s_noise``, ``r``,
  ``solver_type``, ``order``, ``s_churn``, ``rtol``, ...); unknown options raise ``TypeError``.

The table :func:`sampler_table` is this module's :data:`SAMPLERS` plus ``SOLVERS`` from
:mod:`kiln.nodes.sd.solvers` (names defined here win). :data:`SAMPLER_NAMES` is ComfyUI's full list in
its order; :func:`run_sampler` draws the noise a sampler declared and runs it.

One module, past the usual size, because the sigma table, the schedules and the samplers are read
together and share the same few tensor helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .noise import NOISE_KINDS, step_noise

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- the discrete model's sigmas ------------------------------------------------------------------------


def _rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last timestep has (almost) zero SNR (Lin et al. 2023)."""
    ab_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))
    ab = ab_sqrt**2
    ab[-1] = 4.8973451890853435e-08  # ComfyUI's floor: a finite sigma_max (about 4500) instead of infinity
    return ((1 - ab) / ab) ** 0.5


class ModelSampling:
    """The sigma table and parametrisation of a DDPM-trained model, from its (diffusers) scheduler config.

    Config keys: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (scaled_linear,
    linear, squaredcos_cap_v2), ``prediction_type`` (epsilon, v_prediction, sample), ``rescale_betas_zero_snr``.
    """

    def __init__(self, config: dict):
        self.config = dict(config)
        n = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":  # ComfyUI/LDM's "linear"
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":  # LDM's "sqrt_linear"
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        elif kind == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}; use scaled_linear, linear or squaredcos_cap_v2")
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.zero_snr = bool(config.get("rescale_betas_zero_snr", False))
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if self.zero_snr:
            sigmas = _rescale_zero_terminal_snr(sigmas)
        self.alphas_cumprod = 1 / (sigmas * sigmas + 1)
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()  # the log in float64, then rounded, as ComfyUI
        self.num_timesteps = n
        self.sigma_data = 1.0

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's timestep for a sigma: the index of the nearest table entry in log sigma (an integer
        tensor of sigma's shape: the UNet sees whole timesteps, as in ComfyUI)."""
        sigma = torch.as_tensor(sigma)
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """Sigma of a (fractional) timestep: linear interpolation of the table in log sigma."""
        t = torch.as_tensor(t)
        tt = t.float().clamp(0, len(self.sigmas) - 1)
        lo, hi = tt.floor().long(), tt.ceil().long()
        w = tt.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp().to(t.device)

    sigma_at = sigma

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma reached after ``percent`` of the denoising (0 -> above every sigma, 1 -> 0)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    # parametrisation (ComfyUI's EPS / V_PREDICTION)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=out.device).reshape(-1, *([1] * (out.ndim - 1)))
        if self.prediction_type == "v_prediction":
            sd2 = self.sigma_data**2
            return x * sd2 / (sigma**2 + sd2) - out * sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        if self.prediction_type == "sample":  # diffusers' name for a model that predicts x0 itself
            return out
        return x - out * sigma

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """The starting point at ``sigma``: ``latent + noise * sigma``, or ``* sqrt(1 + sigma^2)`` from the top
        of the schedule (pure noise carries the data's unit variance too)."""
        sigma = torch.as_tensor(sigma, device=noise.device).reshape(-1, *([1] * (noise.ndim - 1)))
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """Whether a run starts at (or above) the top of the table: ComfyUI's ``max_denoise``."""
        top, first = self.sigma_max, float(sigmas[0])
        return math.isclose(top, first, rel_tol=1e-05) or first > top


# -- schedules: n steps -> decreasing sigmas (float32), usually ending in 0 --------------------------------


def sched_simple(ms: ModelSampling, n: int) -> torch.Tensor:
    stride = len(ms.sigmas) / n
    return torch.tensor([float(ms.sigmas[-(1 + int(i * stride))]) for i in range(n)] + [0.0])


def sched_normal(ms: ModelSampling, n: int, sgm: bool = False) -> torch.Tensor:
    start = ms.timestep(torch.tensor(ms.sigma_max))
    end = ms.timestep(torch.tensor(ms.sigma_min))
    append_zero = True
    if sgm:
        ts = torch.linspace(start, end, n + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            n += 1
            append_zero = False
        ts = torch.linspace(start, end, n)
    sigs = [float(ms.sigma(t)) for t in ts]
    return torch.tensor(sigs + ([0.0] if append_zero else []))


def sched_sgm_uniform(ms: ModelSampling, n: int) -> torch.Tensor:
    return sched_normal(ms, n, sgm=True)


def sched_karras(ms: ModelSampling, n: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def sched_exponential(ms: ModelSampling, n: int) -> torch.Tensor:
    s = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), n).exp()
    return torch.cat([s, s.new_zeros(1)])


def sched_ddim_uniform(ms: ModelSampling, n: int) -> torch.Tensor:
    """Every ``len // n``-th table entry from timestep 1 upwards (DDIM's uniform spacing), then 0."""
    stride = max(len(ms.sigmas) // n, 1)
    first_is_zero = math.isclose(float(ms.sigmas[1]), 0, abs_tol=0.00001)
    sigs = [] if first_is_zero else [0.0]
    sigs += [float(ms.sigmas[t]) for t in range(1, len(ms.sigmas), stride)]
    return torch.tensor(sigs[::-1])


def sched_beta(ms: ModelSampling, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    from scipy import stats

    total = len(ms.sigmas) - 1
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta) * total)
    sigs, last = [], -1.0
    for t in ts:  # repeats are skipped so no step has zero length
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.tensor(sigs + [0.0])


def sched_linear_quadratic(
    ms: ModelSampling, n: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """Linear in noise level for the first half (up to ``threshold_noise``), quadratic after (Mochi's)."""
    if n == 1:
        levels = [1.0, 0.0]
    else:
        lin = n // 2 if linear_steps is None else linear_steps
        head = [i * threshold_noise / lin for i in range(lin)]
        diff = lin - threshold_noise * n
        quad_steps = n - lin
        a = diff / (lin * quad_steps**2)
        b = threshold_noise / lin - 2 * diff / (quad_steps**2)
        c = a * (lin**2)
        tail = [a * (i**2) + b * i + c for i in range(lin, n)]
        levels = [1.0 - v for v in head + tail + [1.0]]
    return torch.tensor(levels, dtype=torch.float32) * ms.sigmas[-1]


def sched_kl_optimal(ms: ModelSampling, n: int) -> torch.Tensor:
    """Even steps in arctan(sigma) (Align Your Steps' KL-optimal schedule)."""
    if n == 1:  # ComfyUI divides by n - 1 here and yields NaN; one step from the top is what was meant
        return torch.tensor([ms.sigma_max, 0.0])
    w = torch.arange(n, dtype=torch.float).div_(n - 1)
    out = w.new_zeros(n + 1)
    out[:-1] = (w * math.atan(ms.sigma_min) + (1 - w) * math.atan(ms.sigma_max)).tan_()
    return out


SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": sched_simple,
    "sgm_uniform": sched_sgm_uniform,
    "karras": sched_karras,
    "exponential": sched_exponential,
    "ddim_uniform": sched_ddim_uniform,
    "beta": sched_beta,
    "normal": sched_normal,
    "linear_quadratic": sched_linear_quadratic,
    "kl_optimal": sched_kl_optimal,
}
SCHEDULER_NAMES = list(SCHEDULERS)  # ComfyUI's list, in its order


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    return SCHEDULERS[scheduler](ms, steps).float()


# KSampler (and KSamplerAdvanced) gives these samplers a schedule one step longer and drops its
# second-to-last sigma, as ComfyUI's KSampler does; schedules from the scheduler nodes are used as they are
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def ksampler_sigmas(ms: ModelSampling, scheduler: str, steps: int, sampler_name: str | None = None) -> torch.Tensor:
    """The whole schedule KSampler runs for ``sampler_name`` (see :data:`DISCARD_PENULTIMATE`)."""
    if sampler_name not in DISCARD_PENULTIMATE:
        return calculate_sigmas(ms, scheduler, steps)
    s = calculate_sigmas(ms, scheduler, steps + 1)
    return torch.cat([s[:-2], s[-1:]])


def sigmas_for(
    ms: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str | None = None
) -> torch.Tensor:
    """KSampler's schedule: for denoise < 1, the tail of a longer schedule (img2img). With ``sampler_name``,
    that sampler's schedule as KSampler computes it (:func:`ksampler_sigmas`)."""
    if denoise is None or denoise > 0.9999:
        return ksampler_sigmas(ms, scheduler, steps, sampler_name)
    if denoise <= 0.0:
        return torch.zeros(0)
    return ksampler_sigmas(ms, scheduler, int(steps / denoise), sampler_name)[-(steps + 1) :]


# -- step helpers (k-diffusion's, in float32 tensors) -------------------------------------------------------


def noise_kind(kind: str) -> Callable[[Callable], Callable]:
    """Declare which noise source a sampler gets (see the module docstring)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; use one of {', '.join(NOISE_KINDS)}")

    def mark(fn: Callable) -> Callable:
        fn.noise_kind = kind  # type: ignore[attr-defined]
        return fn

    return mark


def to_d(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma."""
    return (x - x0) / sigma


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step into a deterministic part down to ``sigma_down`` plus fresh noise of size ``sigma_up``."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def _t(sigma):  # log-SNR-like time of the DPM-Solver family: -log(sigma)
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


def _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s optional noise increase before a step; returns (x, sigma_hat)."""
    if s_churn <= 0:
        return x, sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


# -- samplers -----------------------------------------------------------------------------------------------


def sample_euler(denoise, x, sigmas, noise, callback, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoise(x, sigma_hat)
        callback(i, x0)
        x = x + to_d(x, sigma_hat, x0) * (sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        callback(i, x0)
        if down == 0:
            x = x0
        else:
            x = x + to_d(x, sigmas[i], x0) * (down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def sample_heun(denoise, x, sigmas, noise, callback, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, x0)
        callback(i, x0)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = to_d(x2, sigmas[i + 1], denoise(x2, sigmas[i + 1]))
            x = x + (d + d2) / 2 * dt
    return x


def sample_dpm_2(denoise, x, sigmas, noise, callback, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, x0)
        callback(i, x0)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()  # halfway in log sigma
            x2 = x + d * (mid - sigma_hat)
            x = x + to_d(x2, mid, denoise(x2, mid)) * (sigmas[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        callback(i, x0)
        d = to_d(x, sigmas[i], x0)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(down.log(), 0.5).exp()
            x2 = x + d * (mid - sigmas[i])
            x = x + to_d(x2, mid, denoise(x2, mid)) * (down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def _lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the Lagrange basis polynomial of node t_(i-j) (numerically, as ComfyUI)."""
    from scipy import integrate

    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    others = [k for k in range(order) if k != j]

    def basis(tau):
        value = 1.0
        for k in others:
            value *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return value

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(denoise, x, sigmas, noise, callback, order=4):
    t = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], x0))
        if len(ds) > order:
            ds.pop(0)
        callback(i, x0)
        if sigmas[i + 1] == 0:
            x = x0
            continue
        k = min(i + 1, order)
        coeffs = [_lms_coefficient(k, t, i, j) for j in range(k)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2s_ancestral(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        callback(i, x0)
        if down == 0:
            x = x + to_d(x, sigmas[i], x0) * (down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(down)
            h = t_next - t
            s = t + 0.5 * h
            x2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * x0
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoise(x2, _sigma(s))
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@noise_kind("brownian")
def sample_dpmpp_sde(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), two model calls per step; noise from the Brownian tree."""
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if sigmas[i + 1] == 0:
            x = x0
            continue
        lam_s, lam_t = _t(sigmas[i]), _t(sigmas[i + 1])
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        sigma_s1 = _sigma(lam_s1)
        alpha_s = sigmas[i] * lam_s.exp()
        alpha_s1 = sigma_s1 * lam_s1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        # stage 1: to the intermediate point
        down, up = ancestral_step(lam_s.neg().exp(), lam_s1.neg().exp(), eta)
        h_ = down.log().neg() - lam_s
        x2 = (alpha_s1 / alpha_s) * (-h_).exp() * x - alpha_s1 * (-h_).expm1() * x0
        if eta > 0 and s_noise > 0:
            x2 = x2 + alpha_s1 * noise(sigmas[i], sigma_s1) * s_noise * up
        x0_2 = denoise(x2, sigma_s1)
        # stage 2: the whole step with the blended prediction
        down, up = ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = down.log().neg() - lam_s
        blend = (1 - fac) * x0 + fac * x0_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * blend
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def sample_dpmpp_2m(denoise, x, sigmas, noise, callback):
    old_x0 = None
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_x0 is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * x0
        else:
            r = (t - _t(sigmas[i - 1])) / h
            blend = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * blend
        old_x0 = x0
    return x


@noise_kind("brownian")
def sample_dpmpp_2m_sde(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', not {solver_type!r}")
    old_x0, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if sigmas[i + 1] == 0:
            x = x0
        else:
            lam_s, lam_t = _t(sigmas[i]), _t(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * x0
            if old_x0 is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (x0 - old_x0)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (x0 - old_x0)
            if eta > 0 and s_noise > 0:
                scale = sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * scale
        old_x0, h_last = x0, h
    return x


@noise_kind("brownian")
def sample_dpmpp_2m_sde_heun(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0, solver_type="heun"):
    return sample_dpmpp_2m_sde(denoise, x, sigmas, noise, callback, eta=eta, s_noise=s_noise, solver_type=solver_type)


def _on_device_tree(fn: Callable) -> Callable:
    """The ``*_gpu`` twin of a Brownian sampler: the same steps, the tree built on the sampling device."""

    def twin(denoise, x, sigmas, noise, callback, **options):
        return fn(denoise, x, sigmas, noise, callback, **options)

    twin.__name__ = fn.__name__ + "_gpu"
    twin.__doc__ = fn.__doc__
    return noise_kind("brownian_gpu")(twin)


def sample_lcm(denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        x = x0
        if sigmas[i + 1] > 0:
            x = noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


def sample_lcm_upscale(
    denoise, x, sigmas, noise, callback, total_upscale=2.0, upscale_method="bislerp", upscale_steps=None
):
    """LCM steps that also enlarge the latent, by equal factors over the first ``upscale_steps`` steps.

    ComfyUI draws the re-noising here from the unseeded global generator; Kiln draws it from the run's
    seeded step noise, so the picture is reproducible."""
    from kiln.nodes.latent import resize_latent

    steps = max(len(sigmas) // 2 + 1, 2) if upscale_steps is None else max(upscale_steps + 1, 2)
    factors = np.linspace(1.0, total_upscale, steps)[1:]
    h0, w0 = x.shape[-2], x.shape[-1]
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        x = x0
        if i < len(factors):
            x = resize_latent(x, round(h0 * factors[i]), round(w0 * factors[i]), upscale_method)
        if sigmas[i + 1] > 0:
            fresh = noise.fresh(tuple(x.shape)) if hasattr(noise, "fresh") else torch.randn_like(x)
            x = x + sigmas[i + 1] * fresh
    return x


def sample_euler_cfg_pp_alt(denoise, x, sigmas, noise, callback):
    """Euler CFG++, "alternative" form: the step direction uses the negative prompt's prediction."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        uncond = getattr(denoise, "last_uncond_denoised", None)
        uncond = x0 if uncond is None else uncond
        callback(i, x0)
        x = x + to_d(x - x0 + uncond, sigmas[i], x0) * (sigmas[i + 1] - sigmas[i])
    return x


# -- UniPC (ComfyUI's form: variance-preserving space, noise-prediction model, last sigma 0 -> 0.001) ----------


def _vp_log_alpha(s):
    return 0.5 * torch.log(1 / ((s * s) + 1))


def _vp_alpha(s):
    return torch.exp(_vp_log_alpha(s))


def _vp_std(s):
    return torch.sqrt(1.0 - torch.exp(2.0 * _vp_log_alpha(s)))


def _vp_lambda(s):
    la = _vp_log_alpha(s)
    return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))


def _unipc_update(model_fn, x, prev_x0, prev_t, t, order: int, variant: str, use_corrector: bool):
    """One UniP step to ``t`` from the newest history point, then (optionally) the UniC correction."""
    lam_0, lam_t = _vp_lambda(prev_t[-1]), _vp_lambda(t)
    m0 = prev_x0[-1]
    alpha_t = torch.exp(_vp_log_alpha(t))
    h = lam_t - lam_0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_vp_lambda(prev_t[-(k + 1)]) - lam_0) / h
        rks.append(rk)
        d1s.append((prev_x0[-(k + 1)] - m0) / rk)
    rks.append(torch.ones_like(h))
    r = torch.stack(rks)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, fact = [], [], 1
    for k in range(1, order + 1):
        rows.append(torch.pow(r, k - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    rmat, bvec = torch.stack(rows), torch.stack(b)
    d1 = torch.stack(d1s, dim=1) if d1s else None
    base = (_vp_std(t) / _vp_std(prev_t[-1])) * x - (alpha_t * h_phi_1) * m0
    if d1 is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(rmat[:-1, :-1], bvec[:-1])
        x_t = base - (alpha_t * b_h) * torch.einsum("k,bkchw->bchw", rhos_p, d1)
    else:
        x_t = base - (alpha_t * b_h) * 0
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(rmat, bvec)
    m_t = model_fn(x_t, t)
    corr = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1) if d1 is not None else 0
    return base - (alpha_t * b_h) * (corr + rhos_c[-1] * (m_t - m0)), m_t


def sample_uni_pc(denoise, x, sigmas, noise, callback, variant="bh1"):
    """UniPC (bh1: B(h) = h; bh2: B(h) = e^h - 1), multistep up to order 3, lower orders at both ends.

    As in ComfyUI: it runs in variance-preserving space on the model's noise prediction, a final sigma of 0
    is replaced by 0.001 (the result keeps that much noise), and the order is ``min(3, steps - 1)``. With a
    single step ComfyUI returns its (rescaled) input; Kiln returns the model's prediction instead.
    """
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    steps = len(ts) - 1
    order = min(3, len(ts) - 2)

    def model_fn(xv, s):
        xin = xv * ((s**2 + 1.0) ** 0.5)
        eps = (xin - denoise(xin, s)) / s
        return (xv - _vp_std(s) * eps) / _vp_alpha(s)

    xv = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    if steps == 1:
        x0 = denoise(x, sigmas[0])
        callback(0, x0)
        return x0
    hist_x0, hist_t = [model_fn(xv, ts[0])], [ts[0]]
    callback(0, hist_x0[-1])
    for i in range(1, steps):
        if i < order:  # warm-up: lower orders until there is enough history
            xv, m = _unipc_update(model_fn, xv, hist_x0, hist_t, ts[i], i, variant, True)
            hist_x0.append(m if m is not None else model_fn(xv, ts[i]))
            hist_t.append(ts[i])
        else:
            for step in range(i, i + 1 + (1 if i == steps - 1 else 0)):
                p = min(order, steps + 1 - step)
                xv, m = _unipc_update(model_fn, xv, hist_x0, hist_t, ts[step], p, variant, step != steps)
                hist_x0, hist_t = hist_x0[1:] + hist_x0[-1:], hist_t[1:] + [ts[step]]
                if step < steps:
                    hist_x0[-1] = m if m is not None else model_fn(xv, ts[step])
        callback(i, hist_x0[-1])
    return xv / _vp_alpha(ts[-1])


def sample_uni_pc_bh2(denoise, x, sigmas, noise, callback):
    return sample_uni_pc(denoise, x, sigmas, noise, callback, variant="bh2")


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": _on_device_tree(sample_dpmpp_sde),
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": _on_device_tree(sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": _on_device_tree(sample_dpmpp_2m_sde_heun),
    "lcm": sample_lcm,
    "ddim": sample_euler,  # ComfyUI's ddim is its Euler step (plus seed+1 noise for inpainting, see sampling.py)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    # reached through SamplerEulerCFGpp / SamplerLCMUpscale only (not in ComfyUI's name list)
    "euler_cfg_pp_alt": sample_euler_cfg_pp_alt,
    "lcm_upscale": sample_lcm_upscale,
}

# ComfyUI's KSampler list, in its order (tests/nodes/reference/comfyui-core-interface.json)
SAMPLER_NAMES = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]

# ComfyUI's samplers that draw Brownian-tree noise, for table entries that do not declare a noise kind
_BROWNIAN = {
    base + suffix: "brownian" + suffix
    for base in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
    for suffix in ("", "_gpu")
}

_TABLE: dict[str, Callable] | None = None


def sampler_table() -> dict[str, Callable]:
    """Every implemented sampler: this module's plus :mod:`.solvers`' (loaded on first use)."""
    global _TABLE
    if _TABLE is None:
        table: dict[str, Callable] = {}
        try:
            from . import solvers
        except ModuleNotFoundError as exc:  # the solvers module is optional; its own import errors are not
            if exc.name != f"{__package__}.solvers":
                raise
        else:
            table.update(getattr(solvers, "SOLVERS", {}))
        table.update(SAMPLERS)
        for name in SAMPLER_NAMES:  # a *_gpu twin for any Brownian sampler that comes without one
            base = name.removesuffix("_gpu")
            if name != base and name not in table and base in table:
                table[name] = _on_device_tree(table[base])
        _TABLE = table
    return _TABLE


def get_sampler(name: str) -> Callable:
    table = sampler_table()
    if name not in table:
        known = "in ComfyUI's list but not implemented in Kiln" if name in SAMPLER_NAMES else "unknown"
        raise KeyError(f"sampler {name!r} is {known}")
    return table[name]


@dataclass(frozen=True)
class SamplerChoice:
    """A SAMPLER value: a sampler name and its options (immutable, so it fingerprints and caches)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, **options: Any) -> SamplerChoice:
        return cls(name, tuple(sorted(options.items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def __kiln_fingerprint__(self) -> bytes:
        return repr((self.name, self.options)).encode()


def run_sampler(
    name: str,
    denoise: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int,
    callback: Callable[[int, torch.Tensor], None],
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run sampler ``name`` from ``x`` (already noised to ``sigmas[0]``) with the noise it declares."""
    fn = get_sampler(name)
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    if len(sigmas) < 2:
        return x
    kind = getattr(fn, "noise_kind", None) or _BROWNIAN.get(name, "default")
    noise = step_noise(kind, x, sigmas, seed)
    with torch.inference_mode():
        return fn(denoise, x, sigmas, noise, callback, **(options or {}))
