"""Noise schedules and ODE/SDE samplers over a denoiser, in the sigma parametrisation.

A discrete-time diffusion model (DDPM betas) is viewed as a denoiser ``D(x, sigma) -> x0`` on
``x = x0 + sigma * eps``. A *schedule* picks the decreasing sigmas to visit (ending at 0); a *sampler*
walks them. Any schedule works with any sampler, which is how every ComfyUI sampler/scheduler pair is
supported by one small table of each.

Samplers take ``(denoise, x, sigmas, noise, callback)``: ``denoise(x, sigma)`` returns the predicted
clean latent, ``noise()`` returns fresh unit noise (from a seeded CPU generator) for stochastic samplers,
``callback(i, x0)`` is called once per step with the current prediction (for progress previews).

One module, past the usual size, because the two tables (schedules and samplers) are read together and
every sampler shares the same few step helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- the discrete model's sigmas ------------------------------------------------------------------------


class ModelSampling:
    """The sigma table of a DDPM-trained model, from its scheduler config."""

    def __init__(self, config: dict):
        n = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float64)
        elif kind == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}; use scaled_linear, linear or squaredcos_cap_v2")
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)
        self.sigmas = torch.from_numpy(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.num_timesteps = n

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of a sigma (linear interpolation in log sigma)."""
        log_s = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        idx = torch.searchsorted(self.log_sigmas, log_s.reshape(-1)).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = (log_s.reshape(-1) - lo) / (hi - lo)
        return (idx - 1 + w).reshape(sigma.shape)

    def sigma_at(self, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma reached after ``percent`` of the denoising (0 -> sigma_max, 1 -> 0)."""
        if percent <= 0:
            return float("inf")
        if percent >= 1:
            return 0.0
        return float(self.sigma_at((1 - percent) * (self.num_timesteps - 1)))


# -- schedules: n steps -> n + 1 decreasing sigmas ending in 0 -------------------------------------------------


def _with_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s.float(), s.new_zeros(1)])


def sched_normal(ms: ModelSampling, n: int) -> torch.Tensor:
    t0, t1 = ms.timestep(torch.tensor(ms.sigma_max)), ms.timestep(torch.tensor(ms.sigma_min))
    return _with_zero(ms.sigma_at(torch.linspace(float(t0), float(t1), n)))


def sched_sgm_uniform(ms: ModelSampling, n: int) -> torch.Tensor:
    t0, t1 = ms.timestep(torch.tensor(ms.sigma_max)), ms.timestep(torch.tensor(ms.sigma_min))
    return _with_zero(ms.sigma_at(torch.linspace(float(t0), float(t1), n + 1)[:-1]))


def sched_karras(ms: ModelSampling, n: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def sched_exponential(ms: ModelSampling, n: int) -> torch.Tensor:
    return _with_zero(torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), n).exp())


def sched_simple(ms: ModelSampling, n: int) -> torch.Tensor:
    stride = len(ms.sigmas) / n
    return _with_zero(torch.stack([ms.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def sched_ddim_uniform(ms: ModelSampling, n: int) -> torch.Tensor:
    """n timesteps evenly strided from t=1 (DDIM's "uniform" spacing)."""
    stride = max(ms.num_timesteps // n, 1)
    idx = [min(1 + i * stride, ms.num_timesteps - 1) for i in range(n)][::-1]
    return _with_zero(ms.sigmas[idx])


def sched_beta(ms: ModelSampling, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    from scipy import stats

    q = 1 - np.linspace(0, 1, n, endpoint=False)
    ts = np.rint(stats.beta.ppf(q, alpha, beta) * (ms.num_timesteps - 1)).astype(int)
    out, last = [], None
    for t in ts:  # skip repeats so no step has zero length
        if t != last:
            out.append(ms.sigmas[t])
        last = t
    return _with_zero(torch.stack(out))


SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": sched_simple,
    "sgm_uniform": sched_sgm_uniform,
    "karras": sched_karras,
    "exponential": sched_exponential,
    "ddim_uniform": sched_ddim_uniform,
    "beta": sched_beta,
    "normal": sched_normal,
}


# -- samplers -----------------------------------------------------------------------------------------------


def _s(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).expand(x.shape[0])


def _first_order(x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """Exact step of the probability-flow ODE with x0 held fixed: DDIM / DPM-Solver++(1)."""
    r = s_next / s
    return r * x + (1 - r) * x0


def _ancestral(s: float, s_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to ``sigma_down`` plus fresh noise of size ``sigma_up``."""
    if s_next == 0 or eta == 0:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
    return math.sqrt(s_next**2 - up**2), up


def sample_euler(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        x = _first_order(x, x0, s, s_next)  # Euler on dx/dsigma = (x - x0) / sigma is this same step
    return x


def sample_euler_ancestral(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        down, up = _ancestral(s, s_next)
        x = _first_order(x, x0, s, down)
        if up > 0:
            x = x + noise() * up
    return x


def sample_heun(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        d = (x - x0) / s
        if s_next == 0:
            x = x0
            continue
        x2 = x + d * (s_next - s)
        d2 = (x2 - denoise(x2, sigmas[i + 1])) / s_next
        x = x + (d + d2) / 2 * (s_next - s)
    return x


def _dpm2_step(denoise, x, x0, s, target):
    """Midpoint (in log sigma) second-order step from s to target."""
    if target == 0:
        return x0
    s_mid = math.exp((math.log(s) + math.log(target)) / 2)
    d = (x - x0) / s
    x_mid = x + d * (s_mid - s)
    d_mid = (x_mid - denoise(x_mid, torch.tensor(s_mid))) / s_mid
    return x + d_mid * (target - s)


def sample_dpm_2(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        x = _dpm2_step(denoise, x, x0, s, s_next)
    return x


def sample_dpm_2_ancestral(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        down, up = _ancestral(s, s_next)
        x = _dpm2_step(denoise, x, x0, s, down)
        if up > 0:
            x = x + noise() * up
    return x


def _lms_coefficient(nodes: list[float], j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial of node j."""
    poly = np.poly1d([1.0])
    for m, t in enumerate(nodes):
        if m != j:
            poly = poly * np.poly1d([1.0, -t]) / (nodes[j] - t)
    integral = np.polyint(poly)
    return float(integral(b) - integral(a))


def sample_lms(denoise: Denoise, x, sigmas, noise, callback, order: int = 4):
    ds: list[torch.Tensor] = []
    sig = [float(v) for v in sigmas]
    for i in range(len(sig) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        ds.append((x - x0) / sig[i])
        ds = ds[-order:]
        k = len(ds)
        nodes = [sig[i - j] for j in range(k)]
        for j in range(k):
            x = x + _lms_coefficient(nodes, j, sig[i], sig[i + 1]) * ds[-1 - j]
    return x


def sample_dpmpp_2m(denoise: Denoise, x, sigmas, noise, callback):
    old_x0, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if s_next == 0:
            x = x0
            continue
        h = math.log(s / s_next)
        if old_x0 is None:
            x = _first_order(x, x0, s, s_next)
        else:
            r = h_last / h
            x = _first_order(x, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0, s, s_next)
        old_x0, h_last = x0, h
    return x


def sample_dpmpp_2m_sde(denoise: Denoise, x, sigmas, noise, callback, eta: float = 1.0):
    old_x0, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if s_next == 0:
            x = x0
            continue
        h = math.log(s / s_next)
        eh = eta * h
        coef = -math.expm1(-h - eh)
        x = (s_next / s) * math.exp(-eh) * x + coef * x0
        if old_x0 is not None:
            x = x + 0.5 * coef * (h / h_last) * (x0 - old_x0)
        if eta:
            x = x + noise() * s_next * math.sqrt(-math.expm1(-2 * eh))
        old_x0, h_last = x0, h
    return x


def sample_dpmpp_sde(denoise: Denoise, x, sigmas, noise, callback, eta: float = 1.0, r: float = 0.5):
    """Two-stage DPM-Solver++ SDE; the Brownian increments are fresh seeded Gaussian noise."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        if s_next == 0:
            x = x0
            continue
        s_mid = math.exp(math.log(s) + r * math.log(s_next / s))
        down, up = _ancestral(s, s_mid, eta)
        x2 = _first_order(x, x0, s, down)
        if up > 0:
            x2 = x2 + noise() * up
        x0_2 = denoise(x2, torch.tensor(down))
        down, up = _ancestral(s, s_next, eta)
        fac = 1 / (2 * r)
        x = _first_order(x, (1 - fac) * x0 + fac * x0_2, s, down)
        if up > 0:
            x = x + noise() * up
    return x


def sample_dpmpp_2s_ancestral(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        down, up = _ancestral(s, s_next)
        if down == 0:
            x = x0
        else:
            s_mid = math.sqrt(s * down)  # halfway in log sigma
            x2 = _first_order(x, x0, s, s_mid)
            x = _first_order(x, denoise(x2, torch.tensor(s_mid)), s, down)
        if up > 0:
            x = x + noise() * up
    return x


def sample_lcm(denoise: Denoise, x, sigmas, noise, callback):
    for i in range(len(sigmas) - 1):
        s_next = float(sigmas[i + 1])
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        x = x0 + noise() * s_next if s_next > 0 else x0
    return x


def sample_uni_pc(denoise: Denoise, x, sigmas, noise, callback, order: int = 3, variant: str = "bh1"):
    """UniPC in data-prediction form: a UniP-p predictor and a UniC corrector, up to ``order``.

    ``variant`` picks B(h): "bh1" is B(h) = h, "bh2" is B(h) = e^h - 1. The model is evaluated once per step:
    its output at the predicted point both corrects that point and serves as the next step's base. The order
    is lowered at the start (too few earlier points) and at the end; the last step (to sigma 0) returns the
    prediction.
    """
    sig = [float(v) for v in sigmas]
    n = len(sig) - 1
    lam = lambda v: -math.log(v)  # noqa: E731
    hist: list[tuple[float, torch.Tensor]] = []  # (lambda, x0) of earlier points, newest last
    m = denoise(x, sigmas[0])
    for i in range(n):
        callback(i, m)
        s, t = sig[i], sig[i + 1]
        if t == 0:
            return m
        h = lam(t) - lam(s)
        hh = -h
        b_h = hh if variant == "bh1" else math.expm1(hh)
        p = min(order, len(hist) + 1, n - i)
        rks, d1s = [], []
        for k in range(1, p):
            lam_k, m_k = hist[-k]
            rk = (lam_k - lam(s)) / h
            rks.append(rk)
            d1s.append((m_k - m) / rk)
        r_all = rks + [1.0]
        h_phi = math.expm1(hh) / hh - 1
        fact, rows, b = 1, [], []
        for j in range(1, p + 1):
            rows.append([r ** (j - 1) for r in r_all])
            b.append(h_phi * fact / b_h)
            fact *= j + 1
            h_phi = h_phi / hh - 1 / fact
        x_base = (t / s) * x - math.expm1(hh) * m
        if p == 1:
            x_pred = x_base
        else:
            rhos_p = [0.5] if p == 2 else np.linalg.solve(np.array(rows[:-1])[:, :-1], np.array(b[:-1])).tolist()
            x_pred = x_base - b_h * sum(r * d for r, d in zip(rhos_p, d1s))
        m_t = denoise(x_pred, sigmas[i + 1])
        d1_t = m_t - m
        rhos_c = [0.5] if p == 1 else np.linalg.solve(np.array(rows), np.array(b)).tolist()
        corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s)) + rhos_c[-1] * d1_t
        x = x_base - b_h * corr
        hist.append((lam(s), m))
        hist = hist[-order:]
        m = m_t
    return x


def sample_uni_pc_bh2(denoise: Denoise, x, sigmas, noise, callback):
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
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "lcm": sample_lcm,
    "ddim": sample_euler,  # DDIM (eta 0) is exactly the first-order step above in sigma space
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    # ComfyUI's *_gpu variants only move noise generation to the GPU; Kiln always draws noise on the CPU
    # from the seed, so they are the same samplers (and give the same image on every device).
    "dpmpp_sde_gpu": sample_dpmpp_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,
}
# ComfyUI's order, restricted to what is implemented, so the combo lists only working choices.
SAMPLER_NAMES = [
    n
    for n in (
        "euler",
        "euler_ancestral",
        "heun",
        "dpm_2",
        "dpm_2_ancestral",
        "lms",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu",
        "lcm",
        "ddim",
        "uni_pc",
        "uni_pc_bh2",
    )
    if n in SAMPLERS
]
SCHEDULER_NAMES = [
    n for n in ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal") if n in SCHEDULERS
]


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    return SCHEDULERS[scheduler](ms, steps)


def sigmas_for(ms: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """KSampler's schedule: for denoise < 1, the tail of a longer schedule (img2img)."""
    if denoise >= 0.9999:
        return calculate_sigmas(ms, scheduler, steps)
    if denoise <= 0:
        return torch.zeros(0)
    total = int(steps / denoise)
    return calculate_sigmas(ms, scheduler, total)[-(steps + 1) :]
