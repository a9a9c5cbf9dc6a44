"""The extra solvers (nodes/sd/solvers.py) on a denoiser with a known exact answer, and on the tiny UNet.

Data ~ N(mu, s^2) per element: the ideal denoiser is D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), the
probability-flow ODE maps x(sigma_a) to mu + sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2) (x - mu), and a
correct stochastic sampler ends with samples of mean mu and standard deviation s.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import SCHEDULER_CONFIG

from kiln.nodes.sd.samplers import ModelSampling, sched_karras
from kiln.nodes.sd.solvers import DETERMINISTIC, SOLVERS

MU, S = 0.3, 0.5
MS = ModelSampling(SCHEDULER_CONFIG)
STOCHASTIC = sorted(set(SOLVERS) - DETERMINISTIC)


class Gaussian:
    """The ideal denoiser for N(mu, s^2) data. With ``guided_mu`` set it plays a CFG guider: the returned x0 is
    for the data mean ``guided_mu`` and ``last_uncond_denoised`` the one for ``mu``."""

    def __init__(self, guided_mu: float | None = None, model_sampling=MS):
        self.guided_mu = guided_mu
        self.model_sampling = model_sampling
        self.last_uncond_denoised: torch.Tensor | None = None
        self.calls = 0

    @staticmethod
    def x0(x: torch.Tensor, sigma: float, mu: float) -> torch.Tensor:
        return mu + (S * S / (S * S + sigma * sigma)) * (x - mu)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert isinstance(sigma, torch.Tensor) and sigma.ndim == 0
        self.calls += 1
        sg = float(sigma)
        if self.guided_mu is None:
            return self.x0(x, sg, MU)
        self.last_uncond_denoised = self.x0(x, sg, MU)
        return self.x0(x, sg, self.guided_mu)


def exact(x: torch.Tensor, sigma_a: float, sigma_b: float) -> torch.Tensor:
    return MU + math.sqrt(S * S + sigma_b**2) / math.sqrt(S * S + sigma_a**2) * (x - MU)


def seeded_noise(seed: int, shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(seed)
    calls: list[tuple[float, float]] = []

    def noise(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        calls.append((float(sigma), float(sigma_next)))
        return torch.randn(shape, generator=g)

    noise.calls = calls  # type: ignore[attr-defined]
    return noise


def no_callback(i: int, x0: torch.Tensor) -> None:
    pass


def start(shape=(1, 1, 4, 4), seed=0, sigma=None) -> torch.Tensor:
    top = MS.sigma_max if sigma is None else sigma
    return MU + math.sqrt(S * S + top * top) * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(name: str, steps: int, x: torch.Tensor, denoise=None, noise=None, **options) -> torch.Tensor:
    sig = sched_karras(MS, steps)
    denoise = denoise or Gaussian()
    noise = noise or seeded_noise(1, tuple(x.shape))
    return SOLVERS[name](denoise, x, sig, noise, no_callback, **options)


def target(steps: int, x: torch.Tensor, name: str) -> torch.Tensor:
    sig = sched_karras(MS, steps)
    end = float(sig[-2]) if name in ("dpm_fast", "dpm_adaptive") else 0.0  # these stop at sigma_min
    return exact(x, float(sig[0]), end)


def test_the_table_is_comfyui_s_missing_samplers():
    assert set(SOLVERS) == {
        "euler_cfg_pp", "euler_ancestral_cfg_pp", "heunpp2", "dpm_fast", "dpm_adaptive",
        "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "ipndm",
        "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
        "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
        "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    }  # fmt: skip


# -- deterministic solvers: the ODE's answer, closer with more steps ----------------------------------------


# Second order or more; heunpp2 (its extra stages fade out as sigma falls), gradient_estimation and the
# Euler CFG++ step converge at first order, as in ComfyUI.
HIGHER_ORDER = {"deis", "dpm_fast", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "res_multistep", "res_multistep_cfg_pp"}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC - {"dpm_adaptive"}))
def test_deterministic_solvers_converge_to_the_exact_answer(name):
    x = start()  # |x| is about 15 at sigma_max
    errors = [float((run(name, n, x) - target(n, x, name)).abs().max()) for n in (6, 24)]
    assert errors[1] < errors[0], errors
    assert errors[1] < (2e-2 if name in HIGHER_ORDER else 0.1), errors


def test_higher_order_solvers_are_more_accurate_than_first_order():
    x = start()
    err = {n: float((run(n, 10, x) - target(10, x, n)).abs().max()) for n in ("euler_cfg_pp", "ipndm", "deis")}
    assert err["ipndm"] < err["euler_cfg_pp"] / 3 and err["deis"] < err["euler_cfg_pp"] / 3, err


def test_dpm_adaptive_meets_its_tolerance_and_tighter_costs_more_steps():
    x = start()
    sig = sched_karras(MS, 10)
    results = {}
    for rtol in (0.05, 0.005):
        d = Gaussian()
        out = SOLVERS["dpm_adaptive"](d, x, sig, seeded_noise(1, tuple(x.shape)), no_callback, rtol=rtol, atol=1e-4)
        results[rtol] = (float((out - exact(x, float(sig[0]), float(sig[-2]))).abs().max()), d.calls)
    (loose, loose_calls), (tight, tight_calls) = results[0.05], results[0.005]
    assert tight < loose and tight < 0.05 and tight_calls > loose_calls, results


def test_dpm_fast_spends_exactly_the_step_budget():
    x = start()
    for steps in (4, 6, 7):
        d = Gaussian()
        run("dpm_fast", steps, x, denoise=d)
        assert d.calls == steps


# -- one step against the textbook formula ------------------------------------------------------------------

FIRST_STEP_IS_EULER = [
    "euler_cfg_pp",
    "heunpp2",
    "dpmpp_2m_cfg_pp",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
]


@pytest.mark.parametrize("name", FIRST_STEP_IS_EULER)
def test_a_single_step_is_the_euler_ddim_step(name):
    x = start(sigma=5.0)
    s, sn = 5.0, 2.0
    x0 = Gaussian.x0(x, s, MU)
    want = x + (sn - s) * (x - x0) / s
    got = SOLVERS[name](Gaussian(), x, torch.tensor([s, sn]), seeded_noise(0, tuple(x.shape)), no_callback)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_last_step_to_zero_returns_the_prediction(name):
    if name in ("dpm_fast", "dpm_adaptive"):
        pytest.skip("these stop at the last sigma above 0")
    x = start(sigma=0.5)
    got = SOLVERS[name](Gaussian(), x, torch.tensor([0.5, 0.0]), seeded_noise(0, tuple(x.shape)), no_callback)
    assert torch.allclose(got, Gaussian.x0(x, 0.5, MU), atol=1e-5)


def test_dpm_fast_second_order_step_matches_dpm_solver_2():
    """Two evaluations: one DPM-Solver-2 step (midpoint in log sigma, noise-prediction form)."""
    x = start(sigma=4.0)
    s, sn = 4.0, 1.0
    eps = lambda v, sg: (v - Gaussian.x0(v, sg, MU)) / sg  # noqa: E731
    h = math.log(s / sn)
    s_mid = math.sqrt(s * sn)
    e0 = eps(x, s)
    u = x - s_mid * math.expm1(h / 2) * e0
    want = x - sn * math.expm1(h) * e0 - sn / (2 * 0.5) * math.expm1(h) * (eps(u, s_mid) - e0)
    got = SOLVERS["dpm_fast"](Gaussian(), x, torch.tensor([s, sn, 0.0]), seeded_noise(0, (1,)), no_callback)
    assert torch.allclose(got, want, atol=1e-5)


def test_cfg_pp_steps_along_the_unconditional_prediction():
    x = start(sigma=5.0)
    s, sn = 5.0, 2.0
    d = Gaussian(guided_mu=-0.4)
    got = SOLVERS["euler_cfg_pp"](d, x, torch.tensor([s, sn]), seeded_noise(0, tuple(x.shape)), no_callback)
    guided, uncond = Gaussian.x0(x, s, -0.4), Gaussian.x0(x, s, MU)
    assert torch.allclose(got, guided + (x - uncond) * (sn / s), atol=1e-5)
    plain = Gaussian.x0(x, s, -0.4)
    assert not torch.allclose(got, x + (sn - s) * (x - plain) / s, atol=1e-3)


@pytest.mark.parametrize(
    "cfg_pp, plain",
    [
        ("euler_cfg_pp", "euler_ancestral_cfg_pp"),
        ("dpmpp_2m_cfg_pp", None),
        ("res_multistep_cfg_pp", "res_multistep"),
        ("gradient_estimation_cfg_pp", "gradient_estimation"),
    ],
)
def test_cfg_pp_without_a_separate_uncond_is_the_plain_solver(cfg_pp, plain):
    x = start()
    got = run(cfg_pp, 12, x)  # Gaussian() leaves last_uncond_denoised None: the guided x0 stands in
    if plain == "euler_ancestral_cfg_pp":
        want = run(plain, 12, x, eta=0.0)
    elif plain is None:
        from kiln.nodes.sd.samplers import sample_dpmpp_2m

        want = sample_dpmpp_2m(Gaussian(), x, sched_karras(MS, 12), lambda: None, no_callback)
    else:
        want = run(plain, 12, x)
    assert torch.allclose(got, want, atol=1e-5)


# -- stochastic solvers: reproducible, noise-dependent, right distribution ----------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_solvers_repeat_with_the_same_noise_and_differ_with_other(name):
    x = start()
    a = run(name, 8, x, noise=seeded_noise(5, tuple(x.shape)))
    b = run(name, 8, x, noise=seeded_noise(5, tuple(x.shape)))
    c = run(name, 8, x, noise=seeded_noise(6, tuple(x.shape)))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_solvers_sample_the_data_distribution(name):
    shape = (1, 1, 100, 100)
    x = start(shape=shape, seed=3)
    steps = 100 if name in ("ddpm", "euler_ancestral_cfg_pp") else 30  # first order in the spread
    out = run(name, steps, x, noise=seeded_noise(4, shape))
    assert abs(float(out.mean()) - MU) < 0.03, float(out.mean())
    assert abs(float(out.std()) - S) < 0.06 * S, float(out.std())


def test_noise_is_asked_for_where_comfyui_asks_even_when_unused():
    x = start()
    sig = sched_karras(MS, 5)
    noise = seeded_noise(0, tuple(x.shape))
    SOLVERS["res_multistep"](Gaussian(), x, sig, noise, no_callback)  # eta 0: drawn, scaled by 0
    assert len(noise.calls) == 4
    assert torch.equal(run("res_multistep", 5, x), SOLVERS["res_multistep"](Gaussian(), x, sig, None, no_callback))
    noise = seeded_noise(0, tuple(x.shape))
    SOLVERS["dpm_fast"](Gaussian(), x, sig, noise, no_callback)
    assert len(noise.calls) == 2  # one per DPM-Solver step (3rd + 2nd order for 5 evaluations)


def test_noise_is_asked_for_the_step_it_serves():
    x = start()
    sig = sched_karras(MS, 4)
    noise = seeded_noise(0, tuple(x.shape))
    SOLVERS["dpmpp_3m_sde"](Gaussian(), x, sig, noise, no_callback)
    steps = [(float(sig[i]), float(sig[i + 1])) for i in range(3)]  # the last step (to 0) draws none
    assert noise.calls == [pytest.approx(p) for p in steps]


def test_seeds_stage_noise_covers_each_sub_interval():
    x = start()
    noise = seeded_noise(0, tuple(x.shape))
    SOLVERS["seeds_3"](Gaussian(), x, torch.tensor([4.0, 1.0, 0.0]), noise, no_callback)
    (a0, a1), (b0, b1), (c0, c1) = noise.calls
    assert a0 == pytest.approx(4.0) and c1 == pytest.approx(1.0) and a1 == pytest.approx(b0) and b1 == pytest.approx(c0)
    assert a1 == pytest.approx(4.0 * (1 / 4) ** (1 / 3), rel=1e-5)


def test_sa_solver_injects_noise_only_inside_its_interval():
    x = start()
    quiet = run("sa_solver", 24, x, eta=0.0, noise=seeded_noise(1, tuple(x.shape)))
    other = run("sa_solver", 24, x, eta=0.0, noise=seeded_noise(2, tuple(x.shape)))
    assert torch.equal(quiet, other)  # eta 0: an ODE solver
    err = float((quiet - exact(x, float(sched_karras(MS, 24)[0]), 0.0)).abs().max())
    assert err < 1e-2
    noisy = run("sa_solver", 24, x, noise=seeded_noise(1, tuple(x.shape)))
    assert not torch.equal(noisy, quiet)
    # above sigma(20%) of the model (about 5 for SD) no step is stochastic: the noise source is never used
    high = torch.tensor([14.6, 12.0, 10.0, 8.0, 6.0])
    assert float(MS.percent_to_sigma(0.2)) < 6.0
    noise = seeded_noise(1, tuple(x.shape))
    out = SOLVERS["sa_solver"](Gaussian(), x, high, noise, no_callback)
    assert noise.calls == [] and torch.isfinite(out).all()


def test_sa_solver_pece_evaluates_the_corrected_points():
    x = start()
    plain, pece = Gaussian(), Gaussian()
    run("sa_solver", 6, x, denoise=plain)
    run("sa_solver_pece", 6, x, denoise=pece)
    assert pece.calls > plain.calls


def test_callback_once_per_step():
    x = start()
    for name in sorted(SOLVERS):
        seen: list[int] = []
        sig = sched_karras(MS, 7)
        SOLVERS[name](Gaussian(), x, sig, seeded_noise(0, tuple(x.shape)), lambda i, x0, s=seen: s.append(i))
        if name == "dpm_adaptive":
            assert seen == sorted(seen) and seen[-1] == 6, name
        elif name == "dpm_fast":
            assert seen == [2, 5, 6], name  # after each 3rd-, 3rd- and 1st-order step: evaluations so far
        else:
            assert seen == list(range(7)), name


def test_bad_options_are_refused():
    x = start()
    with pytest.raises(ValueError, match="solver_type"):
        run("seeds_2", 3, x, solver_type="phi_3")
    with pytest.raises(ValueError, match="order"):
        run("dpm_adaptive", 3, x, order=4)
    with pytest.raises(ValueError, match="above 0"):
        SOLVERS["dpm_fast"](Gaussian(), x, torch.tensor([0.0, 0.0]), seeded_noise(0, (1,)), no_callback)


# -- the tiny UNet ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_denoiser(world):
    from kiln.nodes.conditioning import encode_prompt
    from kiln.nodes.loaders import load_checkpoint_handles

    h = load_checkpoint_handles(world.ckpt, "tiny")
    ctx = encode_prompt(h.clip, "a red circle")[0][0]
    ms = h.model.sampling

    def make(unet):
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            sg = float(sigma)
            t = ms.timestep(sigma.reshape(1).float())
            eps = unet(x / math.sqrt(1 + sg * sg), t, encoder_hidden_states=ctx).sample
            return x - sg * eps

        denoise.model_sampling = ms  # type: ignore[attr-defined]
        return denoise

    return h, make


def test_every_solver_runs_on_the_tiny_unet(unet_denoiser):
    h, make = unet_denoiser
    sig = sched_karras(h.model.sampling, 3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sig[0])
    with torch.inference_mode(), h.model.patched() as unet:
        denoise = make(unet)
        for name in sorted(SOLVERS):
            out = SOLVERS[name](denoise, x, sig, seeded_noise(0, tuple(x.shape)), no_callback)
            assert out.shape == x.shape and torch.isfinite(out).all(), name
            assert float((out - x).abs().mean()) > 1e-3, name


def test_every_solver_runs_through_the_ksampler_with_guidance(unet_denoiser, world):
    from kiln.nodes.conditioning import encode_prompt
    from kiln.nodes.sampling import sample

    h, _ = unet_denoiser
    pos, neg = encode_prompt(h.clip, "a red circle"), encode_prompt(h.clip, "")
    sig = sched_karras(h.model.sampling, 3)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    outs = {}
    for name in sorted(SOLVERS):
        out = sample(h.model, 7, 4.0, name, sig, pos, neg, latent)["samples"]
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all(), name
        assert torch.equal(out, sample(h.model, 7, 4.0, name, sig, pos, neg, latent)["samples"]), name
        outs[name] = out
    # CFG++ differs from its plain twin once the negative prompt's prediction differs from the guided one
    assert not torch.allclose(outs["res_multistep_cfg_pp"], outs["res_multistep"], atol=1e-4)
