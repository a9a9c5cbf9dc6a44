"""The rest of ComfyUI's samplers: CFG++ variants, DPM-Solver fast/adaptive, DPM-Solver++(3M) SDE, DDPM,
Adams-type (iPNDM, DEIS), exponential-integrator (RES, SEEDS, ER-SDE) and stochastic Adams (SA-Solver).

Same contract as :mod:`kiln.nodes.sd.samplers`: ``fn(denoise, x, sigmas, noise, callback, **options)``.

- ``denoise(x, sigma) -> x0`` with ``sigma`` a 0-dim tensor. The CFG++ solvers also read
  ``denoise.last_uncond_denoised`` after each call (the negative prompt's x0; when it is None, the guided
  x0 is used, which makes them the plain solver). ``denoise.model_sampling`` (the model's sigma table) is read
  by ``sa_solver`` for its default noise interval.
- ``noise(sigma, sigma_next)`` returns unit Gaussian noise shaped like ``x`` for the step between those two
  sigmas (0-dim tensors). It is called exactly where ComfyUI calls its noise sampler, with the same
  arguments, so the draws line up with ComfyUI's for a seed (also where ComfyUI scales a draw by 0, as in
  ``dpm_fast`` and ``res_multistep``; ``noise`` may be None for those when called directly).
  ``dpmpp_3m_sde`` wants a Brownian tree there (the caller's table decides that by name, as ComfyUI does);
  the others want independent draws.
- ``callback(i, x0)`` once per step ``i`` of ``sigmas`` (``dpm_fast``/``dpm_adaptive`` take their own steps and
  report the matching fraction of ``len(sigmas) - 1``).
- options carry ComfyUI's argument names and defaults (``eta``, ``s_noise``, ``r``, ``solver_type``, ...).

The models here are discrete-time eps/v models (variance exploding in x/sigma space, alpha = 1), so the
half-log-SNR is ``-log(sigma)``. Latents stay float32; per-step coefficients are scalars computed in double
precision, so results agree with ComfyUI's float32 arithmetic to about 1e-6 relative, not bit for bit.

One module, past the usual size, because these solvers share their step helpers (ancestral split,
exponential-integrator phi functions, the CFG++ read-back) and are read as one table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# -- shared helpers ----------------------------------------------------------------------------------------


def _floats(sigmas: torch.Tensor) -> list[float]:
    return [float(v) for v in sigmas]


def _scalar(sigmas: torch.Tensor, v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=sigmas.dtype, device=sigmas.device)


def _draw(noise: Noise, sigmas: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return noise(_scalar(sigmas, a), _scalar(sigmas, b))


def _add_noise(x: torch.Tensor, noise: Noise | None, sigmas: torch.Tensor, a: float, b: float, scale: float):
    """x + scale * noise for the step a -> b. The draw happens even when ``scale`` is 0 (ComfyUI's draws
    stay in step); without a noise source that is only allowed when ``scale`` is 0."""
    if noise is None:
        if scale:
            raise ValueError("this sampler needs a noise source for these options")
        return x
    return x + _draw(noise, sigmas, a, b) * scale


def _uncond(denoise: Any, fallback: torch.Tensor) -> torch.Tensor:
    u = getattr(denoise, "last_uncond_denoised", None)
    return fallback if u is None else u


def _ancestral_split(s: float, s_next: float, eta: float = 1.0) -> tuple[float, float]:
    """An ancestral step s -> s_next as a deterministic step to ``down`` plus fresh noise of size ``up``
    (down^2 + up^2 = s_next^2); eta scales the noise, 0 is deterministic."""
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
    return math.sqrt(max(s_next**2 - up**2, 0.0)), up


def _phi1(h: float) -> float:
    """h * phi_1(h) = e^h - 1."""
    return math.expm1(h)


def _phi2(h: float) -> float:
    """h * phi_2(h) = (e^h - 1 - h) / h."""
    return (math.expm1(h) - h) / h


# -- CFG++ -------------------------------------------------------------------------------------------------


def sample_euler_ancestral_cfg_pp(denoise, x, sigmas, noise, callback, eta: float = 1.0, s_noise: float = 1.0):
    """Euler (ancestral) where the direction back to the noise uses the unconditional x0 (CFG++)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        u = _uncond(denoise, x0)
        callback(i, x0)
        if sn == 0:
            x = x0
            continue
        down, up = _ancestral_split(s, sn, eta)
        x = x0 + (x - u) * (down / s)
        if eta > 0 and s_noise > 0:
            x = x + _draw(noise, sigmas, s, sn) * (s_noise * up)
    return x


def sample_euler_cfg_pp(denoise, x, sigmas, noise, callback):
    return sample_euler_ancestral_cfg_pp(denoise, x, sigmas, noise, callback, eta=0.0, s_noise=0.0)


def sample_dpmpp_2s_ancestral_cfg_pp(denoise, x, sigmas, noise, callback, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral on the unconditional x0, with the guidance difference added after each step."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        u = _uncond(denoise, x0)
        guidance = x0 - u
        callback(i, x0)
        down, up = _ancestral_split(s, sn, eta)
        if down == 0:
            x = u
        else:
            h = math.log(s / down)
            s_mid = math.sqrt(s * down)  # halfway in log sigma
            x_mid = (s_mid / s) * x - math.expm1(-h / 2) * u
            u_mid = _uncond(denoise, denoise(x_mid, _scalar(sigmas, s_mid)))
            x = (down / s) * x - math.expm1(-h) * u_mid
        if sn > 0:
            x = _add_noise(x, noise, sigmas, s, sn, s_noise * up)
        x = x + guidance
    return x


def sample_dpmpp_2m_cfg_pp(denoise, x, sigmas, noise, callback):
    """DPM-Solver++(2M) stepping along the unconditional x0, correcting with the guided one (CFG++)."""
    sig = _floats(sigmas)
    old_u = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        u = _uncond(denoise, x0)
        callback(i, x0)
        if sn == 0:
            x = x0
        else:
            h = math.log(s / sn)
            decay = math.exp(-h)
            mix = -decay * u
            if old_u is not None:
                r = math.log(sig[i - 1] / s) / h
                mix = mix - math.expm1(-h) / (2 * r) * (x0 - old_u)
            x = x0 + mix + decay * x
        old_u = u
    return x


# -- Heun++ ------------------------------------------------------------------------------------------------


def sample_heunpp2(
    denoise,
    x,
    sigmas,
    noise,
    callback,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
):
    """Heun with a third stage: the slopes at sigma, sigma_next and the sigma after are blended with weights
    that grow with the noise level (Euler on the last step, two stages on the one before)."""
    sig = _floats(sigmas)
    n = len(sig) - 1
    end = sig[-1]
    for i in range(n):
        s = sig[i]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (gamma + 1)
        if gamma > 0:
            x = x + _draw(noise, sigmas, s, sig[i + 1]) * (s_noise * math.sqrt(s_hat**2 - s**2))
        x0 = denoise(x, _scalar(sigmas, s_hat))
        d = (x - x0) / s_hat
        callback(i, x0)
        dt = sig[i + 1] - s_hat
        if sig[i + 1] == end:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = (x2 - denoise(x2, sigmas[i + 1])) / sig[i + 1]
        if sig[i + 2] == end:
            w2 = sig[i + 1] / (2 * sig[0])
            x = x + (d * (1 - w2) + d2 * w2) * dt
            continue
        x3 = x2 + d2 * (sig[i + 2] - sig[i + 1])
        d3 = (x3 - denoise(x3, sigmas[i + 2])) / sig[i + 2]
        w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
        x = x + (d * (1 - w2 - w3) + d2 * w2 + d3 * w3) * dt
    return x


# -- DPM-Solver (fast and adaptive), in the noise-prediction form over t = -log(sigma) -------------------


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps; ``eps`` evaluations are counted in ``nfe``."""

    def __init__(self, denoise: Denoise, sigmas: torch.Tensor):
        self.denoise, self.sigmas, self.nfe = denoise, sigmas, 0

    def eps(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) of the model at x, time t."""
        s = math.exp(-t)
        x0 = self.denoise(x, _scalar(self.sigmas, s))
        self.nfe += 1
        return (x - x0) / s, x0

    @staticmethod
    def first(x, t, t_next, e0):
        return x - math.exp(-t_next) * math.expm1(t_next - t) * e0

    def second(self, x, t, t_next, e0, r1=0.5):
        h = t_next - t
        s1 = t + r1 * h
        e1, _ = self.eps(x - math.exp(-s1) * math.expm1(r1 * h) * e0, s1)
        out = x - math.exp(-t_next) * math.expm1(h) * e0 - math.exp(-t_next) / (2 * r1) * math.expm1(h) * (e1 - e0)
        return out, e1

    def third(self, x, t, t_next, e0, e1=None, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        if e1 is None:
            s1 = t + r1 * h
            e1, _ = self.eps(x - math.exp(-s1) * math.expm1(r1 * h) * e0, s1)
        s2 = t + r2 * h
        u2 = (
            x
            - math.exp(-s2) * math.expm1(r2 * h) * e0
            - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0)
        )
        e2, _ = self.eps(u2, s2)
        return x - math.exp(-t_next) * math.expm1(h) * e0 - math.exp(-t_next) / r2 * (math.expm1(h) / h - 1) * (e2 - e0)


def _range(sigmas: torch.Tensor) -> tuple[float, float]:
    """(sigma_min, sigma_max) the way the KSampler hands them to dpm_fast/dpm_adaptive: the last sigma, or the
    one before it when the schedule ends at 0."""
    lo = float(sigmas[-1]) if float(sigmas[-1]) != 0 else float(sigmas[-2])
    hi = float(sigmas[0])
    if lo <= 0 or hi <= 0:
        raise ValueError("dpm_fast/dpm_adaptive need sigmas above 0 (besides a final 0)")
    return lo, hi


def _noise_shift(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """Where an ancestral DPM step really ends (time) and how much noise it then adds."""
    if not eta:
        return t_next, 0.0
    down, _ = _ancestral_split(math.exp(-t), math.exp(-t_next), eta)
    t_to = min(t_end, -math.log(down)) if down > 0 else t_end
    return t_to, math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * t_to), 0.0))


def sample_dpm_fast(denoise, x, sigmas, noise, callback, eta: float = 0.0, s_noise: float = 1.0):
    """DPM-Solver-fast: len(sigmas) - 1 model evaluations spent as third-order steps evenly spaced in log sigma
    from sigma_max to sigma_min (ending with a lower order to use the budget exactly). Ends at sigma_min."""
    if len(sigmas) <= 1:
        return x
    n = len(sigmas) - 1
    lo, hi = _range(sigmas)
    t_start, t_end = -math.log(hi), -math.log(lo)
    m = n // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    solver = _DPMSolver(denoise, sigmas)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_to, su = _noise_shift(t, t_next, t_end, eta)
        e0, x0 = solver.eps(x, t)
        if order == 1:
            x = solver.first(x, t, t_to, e0)
        elif order == 2:
            x, _ = solver.second(x, t, t_to, e0)
        else:
            x = solver.third(x, t, t_to, e0)
        callback(min(solver.nfe, n) - 1, x0)
        x = _add_noise(x, noise, sigmas, math.exp(-t), math.exp(-t_next), su * s_noise)
    return x


class _PID:
    """PID step-size control on the inverse error, with an arctan limiter (Söderlind)."""

    def __init__(self, h: float, p: float, i: float, d: float, order: float, accept_safety: float, eps: float = 1e-8):
        self.h = h
        self.b = ((p + i + d) / order, -(p + 2 * d) / order, d / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b[0] * self.errs[1] ** self.b[1] * self.errs[2] ** self.b[2]
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(
    denoise,
    x,
    sigmas,
    noise,
    callback,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    max_attempts: int = 10000,
):
    """DPM-Solver-12/23 with adaptive steps: each attempt compares an order-(k-1) and an order-k step, and a
    PID controller on their difference accepts or shrinks the step. Ends at sigma_min."""
    if order not in (2, 3):
        raise ValueError("dpm_adaptive order must be 2 or 3")
    if len(sigmas) <= 1:
        return x
    n = len(sigmas) - 1
    lo, hi = _range(sigmas)
    t_start, t_end = -math.log(hi), -math.log(lo)
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("dpm_adaptive: eta must be 0 when the sigmas increase")
    pid = _PID(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    solver = _DPMSolver(denoise, sigmas)
    s, x_prev = t_start, x
    cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (eps, x0) at (x, s); unchanged by a rejection
    span = t_end - t_start
    for _ in range(max_attempts):
        if not (s < t_end - 1e-5 if forward else s > t_end + 1e-5):
            return x
        t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
        t_to, su = _noise_shift(s, t, t_end, eta)
        if cached is None:
            cached = solver.eps(x, s)
        e0, x0 = cached
        if order == 2:
            x_low = solver.first(x, s, t_to, e0)
            x_high, _ = solver.second(x, s, t_to, e0)
        else:
            x_low, e1 = solver.second(x, s, t_to, e0, r1=1 / 3)
            x_high = solver.third(x, s, t_to, e0, e1=e1)
        scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.vector_norm((x_low - x_high) / scale)) / math.sqrt(x.numel())
        if not math.isfinite(error):
            raise ValueError("dpm_adaptive: the step error is not finite (the model output diverged)")
        if pid.propose(error):
            x_prev = x_low
            x = _add_noise(x_high, noise, sigmas, math.exp(-s), math.exp(-t), su * s_noise)
            s, cached = t, None
            done = (s - t_start) / span if span else 1.0
            callback(max(0, min(n - 1, math.ceil(done * n - 1e-9) - 1)), x0)
    raise ValueError(f"dpm_adaptive: no convergence after {max_attempts} attempts; loosen rtol/atol")


# -- SDE multistep (DPM-Solver++ 3M SDE; the 2M SDE is in samplers.py) -----------------------------------


def sample_dpmpp_3m_sde(denoise, x, sigmas, noise, callback, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE: the x0 history gives first and second divided differences in log sigma."""
    sig = _floats(sigmas)
    x0_1 = x0_2 = None
    h: float | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if sn == 0:
            x = x0
        else:
            h = math.log(s / sn)
            he = h * (eta + 1)
            x = (sn / s) * math.exp(-h * eta) * x + -math.expm1(-he) * x0
            phi_2 = math.expm1(-he) / he + 1
            if h_2 is not None and h_1 is not None and x0_1 is not None and x0_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / he - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and x0_1 is not None:
                x = x + phi_2 * ((x0 - x0_1) / (h_1 / h))
            if eta > 0 and s_noise > 0:
                x = x + _draw(noise, sigmas, s, sn) * (sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        x0_1, x0_2 = x0, x0_1
        h_1, h_2 = h, h_1
    return x


# -- DDPM ancestral ----------------------------------------------------------------------------------------


def sample_ddpm(denoise, x, sigmas, noise, callback):
    """The DDPM posterior step between the two sigmas' cumulative alphas, in the model's scaled space."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        ac, ac_next = 1 / (s * s + 1), 1 / (sn * sn + 1)
        a = ac / ac_next
        eps = (x - x0) / s
        mean = (x / math.sqrt(1 + s * s) - eps * ((1 - a) / math.sqrt(1 - ac))) / math.sqrt(a)
        if sn > 0:
            mean = mean + _draw(noise, sigmas, s, sn) * math.sqrt((1 - a) * (1 - ac_next) / (1 - ac))
            x = mean * math.sqrt(1 + sn * sn)
        else:
            x = mean
    return x


# -- Adams-Bashforth family on dx/dsigma (iPNDM, iPNDM-v, DEIS) -------------------------------------------


def _push(history: list[torch.Tensor], d: torch.Tensor, keep: int) -> list[torch.Tensor]:
    return (history + [d])[-keep:] if keep > 0 else []


_IPNDM = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_ipndm(denoise, x, sigmas, noise, callback, max_order: int = 4):
    """Improved PNDM: Adams-Bashforth with fixed (equal-step) coefficients on the slopes, up to order 4."""
    sig = _floats(sigmas)
    hist: list[torch.Tensor] = []  # earlier slopes, oldest first
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        d = (x - x0) / s
        order = min(max_order, i + 1)
        if sn == 0:
            x = x0
        else:
            coeffs = _IPNDM[order]
            slope = coeffs[0] * d
            for k, c in enumerate(coeffs[1:], start=1):
                slope = slope + c * hist[-k]
            x = x + (sn - s) * slope
        hist = _push(hist, d, max_order - 1)
    return x


def _ipndm_v_coeffs(order: int, h: list[float]) -> list[float]:
    """iPNDM-v weights for the current and earlier slopes; h[0] is this step, h[k] the k-th earlier step."""
    h0 = h[0]
    if order == 2:
        return [1 + h0 / (2 * h[1]), -h0 / (2 * h[1])]
    h1, h2 = h[1], h[2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [1 + h0 / (2 * h1) + t1, -h0 / (2 * h1) - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) * (
        h0 * (h0 + h1) * (h0 + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    return [
        1 + h0 / (2 * h1) + t1 + t2,
        -h0 / (2 * h1) - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
        t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    ]


def sample_ipndm_v(denoise, x, sigmas, noise, callback, max_order: int = 4):
    """iPNDM with weights adapted to unequal steps (iPNDM-v), up to order 4."""
    sig = _floats(sigmas)
    hist: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        d = (x - x0) / s
        order = min(max_order, i + 1)
        if sn == 0:
            x = x0
        elif order == 1:
            x = x + (sn - s) * d
        else:
            steps = [sn - s] + [sig[i - k + 1] - sig[i - k] for k in range(1, order)]
            w = _ipndm_v_coeffs(order, steps)
            slope = w[0] * d
            for k in range(1, order):
                slope = slope + w[k] * hist[-k]
            x = x + (sn - s) * slope
        hist = _push(hist, d, max_order - 1)
    return x


def deis_coefficients(sig: list[float], max_order: int, points: int = 10000) -> list[list[float]]:
    """DEIS ("tAB") weights: per step, the integral of dsigma against each Lagrange basis polynomial through
    the current and earlier steps, in the time of a VP SDE that spans EDM's sigma range [0.002, 80]
    (eps_s = 1e-3), by a Riemann sum over ``points`` samples. Steps of order 1 (and the last) get []."""
    eps_s, s_lo, s_hi = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(s_lo**2 + 1) / eps_s - math.log(s_hi**2 + 1)) / (eps_s - 1)
    beta_min = math.log(s_hi**2 + 1) - 0.5 * beta_d
    ts = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log(v * v + 1)) - beta_min) / beta_d for v in sig]
    out: list[list[float]] = []
    for i in range(len(ts) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sig[i + 1] <= 0:
            out.append([])
            continue
        tau = np.linspace(ts[i], ts[i + 1], points)
        dtau = (ts[i + 1] - ts[i]) / points
        alpha = np.exp(-0.5 * tau**2 * beta_d - tau * beta_min)  # 1 / (1 + sigma(tau)^2)
        dsigma = 0.5 * (tau * beta_d + beta_min) / np.sqrt(alpha * (1 - alpha))  # d sigma / d tau
        nodes = [ts[i - k] for k in range(order)]
        row = []
        for j in range(order):
            basis = np.ones_like(tau)
            for k, tk in enumerate(nodes):
                if k != j:
                    basis = basis * (tau - tk) / (nodes[j] - tk)
            row.append(float(np.sum(dsigma * basis) * dtau))
        out.append(row)
    return out


def sample_deis(denoise, x, sigmas, noise, callback, max_order: int = 3, deis_mode: str = "tab"):
    """DEIS multistep (tAB, up to order 3 by default): x advances by weights on the current and earlier slopes."""
    if deis_mode != "tab":
        raise ValueError("deis_mode: only 'tab' is implemented")
    sig = _floats(sigmas)
    table = deis_coefficients(sig, max_order)
    hist: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        d = (x - x0) / s
        order = min(max_order, i + 1) if sn > 0 else 1
        if order == 1:
            x = x + (sn - s) * d
        else:
            w = table[i]
            step = w[0] * d
            for k in range(1, order):
                step = step + w[k] * hist[-k]
            x = x + step
        hist = _push(hist, d, max_order - 1)
    return x


# -- RES multistep and gradient estimation ---------------------------------------------------------------


def _res_multistep(denoise, x, sigmas, noise, callback, eta: float, s_noise: float, cfg_pp: bool):
    """RES second-order multistep (exponential integrator, arXiv 2308.02157), optionally ancestral and CFG++."""
    sig = _floats(sigmas)
    old_x0: torch.Tensor | None = None
    old_down = 0.0
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        u = _uncond(denoise, x0) if cfg_pp else x0
        callback(i, x0)
        down, up = _ancestral_split(s, sn, eta)
        if down == 0 or old_x0 is None:
            x = x0 + (x - u) * (down / s) if cfg_pp else x + (x - x0) / s * (down - s)
        else:
            h = math.log(s / down)
            c2 = (math.log(old_down) - math.log(sig[i - 1])) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b2 = phi2 / c2 if c2 else 0.0
            b1 = phi1 - b2
            if not math.isfinite(b1) or not math.isfinite(b2):
                b1, b2 = (0.0 if not math.isfinite(b1) else b1), (0.0 if not math.isfinite(b2) else b2)
            if cfg_pp:
                x = x + (x0 - u)
            x = math.exp(-h) * x + h * (b1 * u + b2 * old_x0)
        if sn > 0:
            x = _add_noise(x, noise, sigmas, s, sn, s_noise * up)
        old_x0, old_down = u, down
    return x


def sample_res_multistep(denoise, x, sigmas, noise, callback, s_noise: float = 1.0, eta: float = 0.0):
    return _res_multistep(denoise, x, sigmas, noise, callback, eta, s_noise, cfg_pp=False)


def sample_res_multistep_cfg_pp(denoise, x, sigmas, noise, callback, s_noise: float = 1.0, eta: float = 0.0):
    return _res_multistep(denoise, x, sigmas, noise, callback, eta, s_noise, cfg_pp=True)


def sample_res_multistep_ancestral(denoise, x, sigmas, noise, callback, eta: float = 1.0, s_noise: float = 1.0):
    return _res_multistep(denoise, x, sigmas, noise, callback, eta, s_noise, cfg_pp=False)


def sample_res_multistep_ancestral_cfg_pp(denoise, x, sigmas, noise, callback, eta: float = 1.0, s_noise: float = 1.0):
    return _res_multistep(denoise, x, sigmas, noise, callback, eta, s_noise, cfg_pp=True)


def sample_gradient_estimation(denoise, x, sigmas, noise, callback, ge_gamma: float = 2.0, cfg_pp: bool = False):
    """Euler plus (ge_gamma - 1) times the change of slope since the last step (gradient estimation)."""
    sig = _floats(sigmas)
    old_d = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        d = (x - _uncond(denoise, x0)) / s if cfg_pp else (x - x0) / s
        callback(i, x0)
        dt = sn - s
        if sn == 0:
            x = x0
        else:
            x = x0 + d * sn if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def sample_gradient_estimation_cfg_pp(denoise, x, sigmas, noise, callback, ge_gamma: float = 2.0):
    return sample_gradient_estimation(denoise, x, sigmas, noise, callback, ge_gamma=ge_gamma, cfg_pp=True)


# -- ER-SDE ------------------------------------------------------------------------------------------------


def _er_noise_scale(v: Any) -> Any:
    return v * (np.exp(v**0.3) + 10.0)


def sample_er_sde(
    denoise,
    x,
    sigmas,
    noise,
    callback,
    s_noise: float = 1.0,
    noise_scaler: Callable[[Any], Any] | None = None,
    max_stage: int = 3,
):
    """Extended reverse-time SDE solver (ER-SDE-Solver-3, arXiv 2309.06169), up to ``max_stage`` stages; the
    stage integrals of the noise scale function are taken over 200 points."""
    scale = noise_scaler or _er_noise_scale
    sig = _floats(sigmas)
    points = 200
    old_x0: torch.Tensor | None = None
    old_dd: torch.Tensor | None = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        stage = min(max_stage, i + 1)
        if sn == 0:
            x = x0
        else:
            r = float(scale(sn)) / float(scale(s))
            x = r * x + (1 - r) * x0
            if stage >= 2 and old_x0 is not None:
                dt = sn - s
                step = -dt / points
                pos = sn + np.arange(points, dtype=np.float64) * step
                scaled = scale(pos)
                integral = float(np.sum(1 / scaled) * step)
                dd = (x0 - old_x0) / (s - sig[i - 1])
                x = x + (dt + integral * float(scale(sn))) * dd
                if stage >= 3 and old_dd is not None:
                    integral_u = float(np.sum((pos - s) / scaled) * step)
                    du = (dd - old_dd) / ((s - sig[i - 2]) / 2)
                    x = x + (dt**2 / 2 + integral_u * float(scale(sn))) * du
                old_dd = dd
            if s_noise > 0:
                amount = sn**2 - s**2 * r**2
                x = x + _draw(noise, sigmas, s, sn) * (s_noise * math.sqrt(max(amount, 0.0)))
        old_x0 = x0
    return x


# -- SEEDS -------------------------------------------------------------------------------------------------


def sample_seeds_2(
    denoise,
    x,
    sigmas,
    noise,
    callback,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
):
    """SEEDS-2 (arXiv 2305.14267): a two-stage stochastic exponential solver in data prediction; the noise of
    the second stage continues the first stage's."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    sig = _floats(sigmas)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if sn == 0:
            x = x0
            continue
        h = math.log(s / sn)
        he = h * (eta + 1)
        s1 = math.exp(math.log(s) - r * h)
        x2 = (s1 / s) * math.exp(-r * h * eta) * x - _phi1(-r * he) * x0
        z = None
        if inject:
            z = _draw(noise, sigmas, s, s1) * math.sqrt(-math.expm1(-2 * r * h * eta))
            x2 = x2 + z * (s1 * s_noise)
        x0_2 = denoise(x2, _scalar(sigmas, s1))
        if solver_type == "phi_1":
            x = (sn / s) * math.exp(-h * eta) * x - _phi1(-he) * torch.lerp(x0, x0_2, 1 / (2 * r))
        else:
            b2 = _phi2(-he) / r
            b1 = _phi1(-he) - b2
            x = (sn / s) * math.exp(-h * eta) * x - (b1 * x0 + b2 * x0_2)
        if z is not None:
            seg = (r - 1) * h * eta
            z = z * math.exp(seg) + _draw(noise, sigmas, s1, sn) * math.sqrt(-math.expm1(2 * seg))
            x = x + z * (sn * s_noise)
    return x


def sample_seeds_3(
    denoise,
    x,
    sigmas,
    noise,
    callback,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
):
    """SEEDS-3: three stages at fractions r_1, r_2 of each step in log sigma, with continued noise."""
    sig = _floats(sigmas)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if sn == 0:
            x = x0
            continue
        h = math.log(s / sn)
        he = h * (eta + 1)
        s1, s2 = math.exp(math.log(s) - r_1 * h), math.exp(math.log(s) - r_2 * h)
        x2 = (s1 / s) * math.exp(-r_1 * h * eta) * x - _phi1(-r_1 * he) * x0
        z = None
        if inject:
            z = _draw(noise, sigmas, s, s1) * math.sqrt(-math.expm1(-2 * r_1 * h * eta))
            x2 = x2 + z * (s1 * s_noise)
        x0_2 = denoise(x2, _scalar(sigmas, s1))
        a2 = r_2 / r_1 * _phi2(-r_2 * he)
        a1 = _phi1(-r_2 * he) - a2
        x3 = (s2 / s) * math.exp(-r_2 * h * eta) * x - (a1 * x0 + a2 * x0_2)
        if z is not None:
            seg = (r_1 - r_2) * h * eta
            z = z * math.exp(seg) + _draw(noise, sigmas, s1, s2) * math.sqrt(-math.expm1(2 * seg))
            x3 = x3 + z * (s2 * s_noise)
        x0_3 = denoise(x3, _scalar(sigmas, s2))
        b3 = _phi2(-he) / r_2
        b1 = _phi1(-he) - b3
        x = (sn / s) * math.exp(-h * eta) * x - (b1 * x0 + b3 * x0_3)
        if z is not None:
            seg = (r_2 - 1) * h * eta
            z = z * math.exp(seg) + _draw(noise, sigmas, s2, sn) * math.sqrt(-math.expm1(2 * seg))
            x = x + z * (sn * s_noise)
    return x


# -- SA-Solver (stochastic Adams, predictor-corrector) ----------------------------------------------------


def sa_coefficients(
    sigma_next: float,
    lambdas: list[float],
    lam_s: float,
    lam_t: float,
    tau: float,
    simple_order_2: bool = False,
    corrector: bool = False,
) -> list[float]:
    """Weights on the x0 history (oldest first, at half-log-SNRs ``lambdas``) for one SA-Solver step from lam_s
    to lam_t: alpha_t times the integral of (1 + tau^2) e^{(1 + tau^2)(lam - lam_t)} against each Lagrange
    basis polynomial."""
    k = len(lambdas)
    mul = 1 + tau * tau
    h = lam_t - lam_s
    alpha_t = sigma_next * math.exp(lam_t)
    if simple_order_2 and k == 2:
        if corrector:
            newest = alpha_t * 0.5 * mul * h
            return [alpha_t * -math.expm1(-h * mul) - newest, newest]
        older = alpha_t * 0.5 * mul * h * h / (lambdas[-2] - lam_s)
        return [older, alpha_t * -math.expm1(-h * mul) - older]
    # moments I_p = (1 + tau^2) * int lam^p e^{(1 + tau^2)(lam - lam_t)}, by parts:
    # I_p = lam_t^p - lam_s^p e^{-(1 + tau^2) h} - p / (1 + tau^2) * I_{p-1}
    moments: list[float] = []
    for p in range(k):
        edge = lam_t**p - lam_s**p * math.exp(-mul * h)
        moments.append(edge - (p / mul) * moments[-1] if p else edge)
    vander = np.vander(np.asarray(lambdas, dtype=np.float64), k, increasing=True).T
    weights = np.linalg.solve(vander, np.asarray(moments, dtype=np.float64))
    return (alpha_t * weights).tolist()


def sample_sa_solver(
    denoise,
    x,
    sigmas,
    noise,
    callback,
    tau_func: Callable[[float], float] | None = None,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
    eta: float = 1.0,
    sde_start_percent: float = 0.2,
    sde_end_percent: float = 0.8,
):
    """SA-Solver (NeurIPS 2023): a stochastic Adams predictor and corrector over the x0 history. Noise is
    injected (strength ``eta``) while sigma lies between the model's sigmas at sde_start_percent and
    sde_end_percent of the denoising, unless ``tau_func(sigma)`` is given. ``use_pece`` re-evaluates the
    model at each corrected point."""
    if len(sigmas) <= 1:
        return x
    if tau_func is None:
        ms = getattr(denoise, "model_sampling", None)
        if ms is None:
            from kiln.nodes.sd.samplers import ModelSampling

            ms = ModelSampling({})
        hi, lo = float(ms.percent_to_sigma(sde_start_percent)), float(ms.percent_to_sigma(sde_end_percent))

        def tau_func(v: float) -> float:
            return eta if eta > 0 and hi >= v >= lo else 0.0

    sig = _floats(sigmas)
    lam = [-math.log(v) if v > 0 else math.inf for v in sig]
    n = len(sig) - 1
    keep = max(predictor_order, corrector_order)
    x_pred = x
    h, tau = 0.0, 0.0
    z: torch.Tensor | None = None  # the noise added by the last predictor step (reused by the corrector)
    hist: list[torch.Tensor] = []
    to_end = sig[-1] == 0
    x0 = x
    for i in range(n):
        x0 = denoise(x_pred, sigmas[i])
        callback(i, x0)
        hist = (hist + [x0])[-keep:]
        p_used = min(predictor_order, len(hist))
        c_used = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else min(corrector_order, len(hist))
        if to_end:
            p_used = min(p_used, n - 1 - i)
            c_used = min(c_used, n - i)
        if c_used == 0:
            x = x_pred
        else:
            w = sa_coefficients(sig[i], lam[i - c_used + 1 : i + 1], lam[i - 1], lam[i], tau, simple_order_2, True)
            x = (sig[i] / sig[i - 1]) * math.exp(-tau * tau * h) * x
            for wk, xk in zip(w, hist[-c_used:]):
                x = x + wk * xk
            if tau > 0 and s_noise > 0 and z is not None:
                x = x + z
            if use_pece:
                x0 = denoise(x, sigmas[i])
                hist[-1] = x0
        if sig[i + 1] == 0:
            x_pred = x0
            continue
        tau = float(tau_func(sig[i + 1]))
        w = sa_coefficients(sig[i + 1], lam[i - p_used + 1 : i + 1], lam[i], lam[i + 1], tau, simple_order_2, False)
        h = lam[i + 1] - lam[i]
        x_pred = (sig[i + 1] / sig[i]) * math.exp(-tau * tau * h) * x
        for wk, xk in zip(w, hist[-p_used:]):
            x_pred = x_pred + wk * xk
        if tau > 0 and s_noise > 0:
            z = _draw(noise, sigmas, sig[i], sig[i + 1]) * (
                sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * s_noise
            )
            x_pred = x_pred + z
    return x_pred


def sample_sa_solver_pece(denoise, x, sigmas, noise, callback, **options):
    return sample_sa_solver(denoise, x, sigmas, noise, callback, use_pece=True, **options)


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heunpp2": sample_heunpp2,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde,  # the same steps; the caller builds its tree on the device
    "ddpm": sample_ddpm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
}

# Solvers with no randomness (given the model): the same inputs give the same output whatever ``noise`` does.
DETERMINISTIC = frozenset(
    {
        "euler_cfg_pp",
        "heunpp2",
        "dpm_fast",
        "dpm_adaptive",
        "dpmpp_2m_cfg_pp",
        "ipndm",
        "ipndm_v",
        "deis",
        "res_multistep",
        "res_multistep_cfg_pp",
        "gradient_estimation",
        "gradient_estimation_cfg_pp",
    }
)
