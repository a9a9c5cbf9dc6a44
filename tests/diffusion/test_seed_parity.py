"""Seed parity with ComfyUI: every random draw and every number that decides the picture.

Each reference below is written here, from ComfyUI's documented algorithm (comfy/sample.py prepare_noise,
k-diffusion's default_noise_sampler and BrownianTreeNoiseSampler, ModelSamplingDiscrete, the schedulers,
UniPC's sigma-0 replacement), and Kiln must reproduce it: bit for bit where the arithmetic is the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchsde
from tiny_models import SCHEDULER_CONFIG

from kiln.nodes.conditioning import encode_prompt
from kiln.nodes.loaders import load_checkpoint_handles
from kiln.nodes.sampling import KSampler, KSamplerAdvanced
from kiln.nodes.sd import samplers
from kiln.nodes.sd.noise import BrownianNoise, StepNoise, make_noise
from kiln.nodes.sd.samplers import ModelSampling, calculate_sigmas, run_sampler

REFERENCE = Path(__file__).resolve().parents[1] / "nodes" / "reference" / "comfyui-core-interface.json"

# torchsde notes float32 queries a rounding error outside the tree's float ends (the reference tree here)
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


@pytest.fixture(scope="module")
def loaded(world):
    h = load_checkpoint_handles(world.ckpt, "tiny")
    return h, encode_prompt(h.clip, "a red circle on a blue background"), encode_prompt(h.clip, "")


def _toy_denoiser():
    """A fixed nonlinear x0 predictor, so samplers can be compared without a UNet."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.5

    def denoise(x, sigma):
        z = x / (1 + sigma**2) ** 0.5
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, z) * 2 + 0.3)

    return denoise


def _sigmas(n=6, scheduler="karras"):
    return calculate_sigmas(ModelSampling(SCHEDULER_CONFIG), scheduler, n)


# -- references from ComfyUI's documented algorithms ----------------------------------------------------------


def ref_prepare_noise(seed, shape, batch_index=None):
    """comfy.sample.prepare_noise: the global CPU generator seeded with the seed; with batch indices, one
    [1, ...] draw per index from 0 to the largest, each item taking the draw of its index."""
    with torch.random.fork_rng(devices=[]):
        gen = torch.manual_seed(seed)
        if batch_index is None:
            return torch.randn(shape, generator=gen)
        wanted = set(batch_index)
        draws = {}
        for i in range(max(batch_index) + 1):
            d = torch.randn((1, *shape[1:]), generator=gen)
            if i in wanted:
                draws[i] = d
        return torch.cat([draws[i] for i in batch_index])


def ref_table(config):
    """ModelSamplingDiscrete: betas linear in sqrt (float64), cumulative alphas, sigma table in float32, its
    log taken in float64 before rounding."""
    n = config["num_train_timesteps"]
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, dim=0)
    s = ((1 - ac) / ac) ** 0.5
    return s, s.float(), s.log().float()


def ref_ancestral(denoise, x, sigmas, seed, eta=1.0, s_noise=1.0):
    """k-diffusion's Euler ancestral with default_noise_sampler(x, seed): a generator on x's device seeded
    with the seed, randn of x's size per call."""
    gen = torch.Generator(x.device).manual_seed(seed)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s)
        up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        if down == 0:
            x = d0
        else:
            x = x + (x - d0) / s * (down - s) + torch.randn(x.shape, generator=gen) * s_noise * up
    return x


def ref_brownian(x, sigmas, seed):
    """BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=True): a torchsde tree on [smallest
    positive sigma, largest sigma] with the seed as entropy; noise(s, s_next) = (W(s_next) - W(s)) /
    sqrt(|s_next - s|)."""
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    tree = torchsde.BrownianTree(lo, torch.zeros_like(x), hi, entropy=seed)

    def noise(s, s_next):
        a, b = (s, s_next) if s < s_next else (s_next, s)
        w = tree(a.float(), b.float())  # W(b) - W(a)
        return (w if s < s_next else -w) / (s_next - s).abs().sqrt()

    return noise


def ref_dpmpp_2m_sde(denoise, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint correction, in -log(sigma) time."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        d0 = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = d0
        else:
            ls, lt = -sigmas[i].log(), -sigmas[i + 1].log()
            h = lt - ls
            he = h * (eta + 1)
            at = sigmas[i + 1] * lt.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + at * (-he).expm1().neg() * d0
            if old is not None:
                x = x + 0.5 * at * (-he).expm1().neg() * (h / h_last) * (d0 - old)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
            h_last = h
        old = d0
    return x


# -- initial noise --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,batch_index",
    [((1, 4, 8, 8), None), ((2, 4, 5, 7), None), ((3, 4, 5, 7), [3, 1, 3]), ((1, 4, 6, 6), [2])],
)
@pytest.mark.parametrize("seed", [0, 42, 2**64 - 1])
def test_initial_noise_is_prepare_noise(seed, shape, batch_index):
    assert torch.equal(make_noise(seed, shape, batch_index), ref_prepare_noise(seed, shape, batch_index))


def test_batch_index_draws_one_item_at_a_time():
    """A 5x7 latent is 140 values per item: drawing items one by one differs from one big draw, and ComfyUI
    draws them one by one."""
    shape = (3, 4, 5, 7)
    whole = torch.randn((3, 4, 5, 7), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(make_noise(1, shape, [0, 1, 2]), whole)


def _capture_start(monkeypatch):
    seen = {}

    def fake(name, denoise, x, sigmas, seed, callback, options=None):
        seen.update(x=x.clone(), sigmas=sigmas.clone(), seed=seed)
        return x

    monkeypatch.setattr("kiln.nodes.sampling.run_sampler", fake)
    return seen


def test_start_is_noise_scaled_as_comfyui(loaded, monkeypatch):
    """From the top of the schedule: latent + noise * sqrt(1 + sigma0^2); img2img: latent + noise * sigma0."""
    h, pos, neg = loaded
    seen = _capture_start(monkeypatch)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    KSampler().run(model=h.model, seed=7, steps=4, cfg=3.0, sampler_name="euler", scheduler="karras",
                   positive=pos, negative=neg, latent_image={"samples": lat})  # fmt: skip
    s0 = seen["sigmas"][0]
    noise = ref_prepare_noise(7, (1, 4, 8, 8))
    assert torch.equal(seen["x"], noise * torch.sqrt(1.0 + s0**2.0) + lat)
    KSampler().run(model=h.model, seed=7, steps=4, cfg=3.0, sampler_name="euler", scheduler="karras",
                   positive=pos, negative=neg, latent_image={"samples": lat}, denoise=0.5)  # fmt: skip
    s0 = seen["sigmas"][0]
    assert s0 < h.model.sampling.sigma_max * 0.9
    assert torch.equal(seen["x"], noise * s0 + lat)


# -- step noise -----------------------------------------------------------------------------------------------


def test_step_noise_is_a_device_generator_seeded_with_the_seed():
    x = torch.zeros(2, 4, 5, 7)
    src = StepNoise(x, 123)
    gen = torch.Generator("cpu").manual_seed(123)
    for _ in range(3):
        assert torch.equal(src(torch.tensor(2.0), torch.tensor(1.0)), torch.randn(x.shape, generator=gen))


@pytest.mark.parametrize("seed", [5, 2**64 - 1])
def test_euler_ancestral_matches_comfyui_step_for_step(seed):
    denoise, sig = _toy_denoiser(), _sigmas(7)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * sig[0]
    ours = run_sampler("euler_ancestral", denoise, x.clone(), sig, seed, lambda i, m: None)
    assert torch.equal(ours, ref_ancestral(denoise, x.clone(), sig, seed))
    # the previous scheme (seed + 0x9E3779B9) gives another picture
    assert not torch.allclose(ours, ref_ancestral(denoise, x.clone(), sig, (seed + 0x9E3779B9) % 2**64))


def test_ksampler_euler_ancestral_end_to_end(loaded):
    """KSampler = prepare_noise, noise_scaling at sigma_max, then the reference ancestral loop on the same
    guided denoiser."""
    h, pos, neg = loaded
    from kiln.nodes.sd.guidance import cfg_guider

    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    out = KSampler().run(model=h.model, seed=11, steps=4, cfg=4.0, sampler_name="euler_ancestral",
                         scheduler="normal", positive=pos, negative=neg, latent_image=lat)  # fmt: skip
    sig = calculate_sigmas(h.model.sampling, "normal", 4)
    x = ref_prepare_noise(11, (1, 4, 8, 8)) * torch.sqrt(1.0 + sig[0] ** 2.0) + lat["samples"]
    with cfg_guider(h.model, pos, neg, 4.0).denoiser((1, 4, 8, 8), sig) as d, torch.inference_mode():
        ref = ref_ancestral(d, x, sig, 11)
    assert torch.equal(out["samples"], ref)


# -- Brownian-tree noise --------------------------------------------------------------------------------------


def test_brownian_noise_is_the_torchsde_tree_increment():
    x = torch.zeros(1, 4, 6, 6)
    sig = _sigmas(6)
    ours, ref = BrownianNoise(x, sig[sig > 0].min(), sig.max(), 77), ref_brownian(x, sig, 77)
    for i in range(len(sig) - 2):
        a = ours(sig[i], sig[i + 1])
        assert torch.equal(a, ref(sig[i], sig[i + 1]))
        assert 0.5 < float(a.std()) < 1.5  # unit variance


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_gpu"])
def test_dpmpp_2m_sde_matches_comfyui_with_the_brownian_tree(name):
    """On the CPU the *_gpu twin builds the same tree there, so both give ComfyUI's CPU picture."""
    denoise, sig = _toy_denoiser(), _sigmas(8)
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * sig[0]
    ours = run_sampler(name, denoise, x.clone(), sig, 1234, lambda i, m: None)
    ref = ref_dpmpp_2m_sde(denoise, x.clone(), sig, ref_brownian(x, sig, 1234))
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()
    other = ref_dpmpp_2m_sde(denoise, x.clone(), sig, ref_brownian(x, sig, 1235))
    assert not torch.allclose(ours, other, atol=1e-2)


@pytest.mark.parametrize(
    "name,kind",
    [("euler_ancestral", "default"), ("dpm_2_ancestral", "default"), ("dpmpp_2s_ancestral", "default"),
     ("lcm", "default"), ("dpmpp_sde", "brownian"), ("dpmpp_sde_gpu", "brownian_gpu"),
     ("dpmpp_2m_sde", "brownian"), ("dpmpp_2m_sde_heun", "brownian"), ("dpmpp_2m_sde_heun_gpu", "brownian_gpu"),
     ("dpmpp_3m_sde", "brownian"), ("dpmpp_3m_sde_gpu", "brownian_gpu")],
)  # fmt: skip
def test_each_sampler_draws_from_comfyuis_noise_source(name, kind, monkeypatch):
    kinds = []
    real = samplers.step_noise

    def spy(k, like, sigmas, seed):
        kinds.append(k)
        return real(k, like, sigmas, seed)

    monkeypatch.setattr(samplers, "step_noise", spy)
    sig = _sigmas(4)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sig[0]
    out = run_sampler(name, _toy_denoiser(), x, sig, 3, lambda i, m: None)
    assert kinds == [kind] and torch.isfinite(out).all()


# -- the model's timestep and sigma table ---------------------------------------------------------------------


def test_sigma_table_is_comfyuis():
    ms = ModelSampling(SCHEDULER_CONFIG)
    _, sigmas, log_sigmas = ref_table(SCHEDULER_CONFIG)
    assert torch.equal(ms.sigmas, sigmas) and torch.equal(ms.log_sigmas, log_sigmas)
    assert ms.percent_to_sigma(0.0) == 999999999.9 and ms.percent_to_sigma(1.0) == 0.0
    # percent p -> the table interpolated at timestep (1 - p) * 999
    t = 0.3 * 999.0
    lo, hi = math.floor(t), math.ceil(t)
    want = math.exp((1 - (t - lo)) * float(log_sigmas[lo]) + (t - lo) * float(log_sigmas[hi]))
    assert math.isclose(ms.percent_to_sigma(0.7), want, rel_tol=1e-6)


def test_zero_terminal_snr_and_v_prediction():
    ms = ModelSampling({**SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    s64, _, _ = ref_table(SCHEDULER_CONFIG)
    ab = (1 / (s64 * s64 + 1)).sqrt()
    ab = (ab - ab[-1]) * (ab[0] / (ab[0] - ab[-1]))
    a2 = ab**2
    a2[-1] = 4.8973451890853435e-08
    assert torch.equal(ms.sigmas, (((1 - a2) / a2) ** 0.5).float())
    assert 4000 < ms.sigma_max < 5000 and math.isclose(ms.sigma_min, float(s64[0]), rel_tol=1e-5)
    x, out, s = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor(2.0)
    assert torch.allclose(ms.calculate_denoised(s, out, x), x / 5 - out * 2 / math.sqrt(5))
    assert torch.allclose(ModelSampling(SCHEDULER_CONFIG).calculate_denoised(s, out, x), x - 2 * out)


def test_unet_sees_whole_timesteps(loaded):
    """ComfyUI feeds the UNet the index of the nearest table entry (in log sigma), never a fraction."""
    h, pos, neg = loaded
    _, _, log_sigmas = ref_table(SCHEDULER_CONFIG)
    seen = []
    hook = h.model.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(float((args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])),
        with_kwargs=True,
    )
    try:
        KSampler().run(model=h.model, seed=1, steps=5, cfg=1.0, sampler_name="euler", scheduler="karras",
                       positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)})  # fmt: skip
    finally:
        hook.remove()
    sig = calculate_sigmas(h.model.sampling, "karras", 5)[:-1]
    want = [float((s.log() - log_sigmas).abs().argmin()) for s in sig]
    assert seen == want and all(t == int(t) for t in seen)
    assert any(not math.isclose(float(h.model.sampling.sigmas[int(t)]), float(s)) for t, s in zip(seen, sig))


# -- schedules -----------------------------------------------------------------------------------------------


def test_names_are_comfyuis_in_order():
    ref = json.loads(REFERENCE.read_text())["KSampler"]["input"]["required"]
    assert samplers.SAMPLER_NAMES == ref["sampler_name"][0]
    assert samplers.SCHEDULER_NAMES == ref["scheduler"][0]
    from kiln.engine.node import spec_from_native

    for node in (KSampler, KSamplerAdvanced):
        spec = spec_from_native(node)
        assert list(spec.inputs["sampler_name"].choices) == samplers.SAMPLER_NAMES
        assert list(spec.inputs["scheduler"].choices) == samplers.SCHEDULER_NAMES


def test_new_schedules_follow_their_formulas():
    ms = ModelSampling(SCHEDULER_CONFIG)
    smin, smax = ms.sigma_min, ms.sigma_max
    n = 9
    kl = calculate_sigmas(ms, "kl_optimal", n)
    w = torch.arange(n, dtype=torch.float32) / (n - 1)
    assert torch.allclose(kl[:-1], (w * math.atan(smin) + (1 - w) * math.atan(smax)).tan()) and kl[-1] == 0
    lq = calculate_sigmas(ms, "linear_quadratic", n)
    # noise level 1 - x: linear up to 0.025 over the first n//2 steps, then a quadratic reaching 1 at the end
    lin = n // 2
    head = [i * 0.025 / lin for i in range(lin)]
    assert torch.allclose(lq[:lin], (1 - torch.tensor(head)) * smax)
    assert lq[-1] == 0 and (lq[:-1] > lq[1:]).all() and len(lq) == n + 1


def test_ddim_uniform_and_normal_as_comfyui():
    ms = ModelSampling(SCHEDULER_CONFIG)
    # ddim_uniform walks the table from timestep 1 in strides of len // steps: 7 steps visit 8 entries
    dd = calculate_sigmas(ms, "ddim_uniform", 7)
    stride = 1000 // 7
    assert torch.equal(dd, torch.tensor([float(ms.sigmas[t]) for t in range(1, 1000, stride)][::-1] + [0.0]))
    # normal: timesteps evenly from 999 to 0, the table interpolated in log sigma, then 0
    nm = calculate_sigmas(ms, "normal", 5)
    ts = np.linspace(999, 0, 5)
    want = [math.exp(np.interp(t, np.arange(1000), ms.log_sigmas.double().numpy())) for t in ts]
    assert np.allclose(nm[:-1].numpy(), want, rtol=1e-5) and nm[-1] == 0


# -- UniPC ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"])
def test_ksampler_drops_the_penultimate_sigma_for_four_samplers(loaded, sampler, monkeypatch):
    """ComfyUI's KSampler (and KSamplerAdvanced) computes one step more for these samplers and removes the
    second-to-last sigma; denoise < 1 takes the tail of that schedule. Other samplers get the plain one."""
    ms = ModelSampling(SCHEDULER_CONFIG)

    def ref(scheduler, steps, denoise=1.0):
        total = steps if denoise > 0.9999 else int(steps / denoise)
        longer = calculate_sigmas(ms, scheduler, total + 1)
        dropped = torch.cat([longer[:-2], longer[-1:]])
        return dropped if denoise > 0.9999 else dropped[-(steps + 1) :]

    for scheduler in ("karras", "normal", "ddim_uniform"):
        assert torch.equal(samplers.sigmas_for(ms, scheduler, 6, 1.0, sampler), ref(scheduler, 6))
        assert torch.equal(samplers.sigmas_for(ms, scheduler, 6, 0.5, sampler), ref(scheduler, 6, 0.5))
        assert torch.equal(samplers.sigmas_for(ms, scheduler, 6, 1.0, "euler"), calculate_sigmas(ms, scheduler, 6))
    # the nodes use it: the sigmas the sampler receives
    h, pos, neg = loaded
    seen = []
    real = samplers.run_sampler

    def spy(name, denoise, x, sigmas, *a, **k):
        seen.append(sigmas.clone())
        return real(name, denoise, x, sigmas, *a, **k)

    monkeypatch.setattr("kiln.nodes.sampling.run_sampler", spy)
    common = dict(model=h.model, cfg=2.0, sampler_name=sampler, scheduler="karras", positive=pos, negative=neg,
                  latent_image={"samples": torch.zeros(1, 4, 8, 8)})  # fmt: skip
    KSampler().run(seed=1, steps=3, denoise=1.0, **common)
    KSamplerAdvanced().run(noise_seed=1, steps=3, **common)
    hms = h.model.sampling
    longer = calculate_sigmas(hms, "karras", 4)
    want = torch.cat([longer[:-2], longer[-1:]])
    assert len(seen) == 2 and all(torch.equal(s.cpu(), want) for s in seen)


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_stops_at_a_thousandth(name):
    """ComfyUI's UniPC replaces a final sigma of 0 by 0.001. With a constant prediction c every step is exact,
    so the result is the probability-flow solution at sigma 0.001: c + 0.001 * (x_T - c) / sigma_T. It calls
    the model once per step (the last step is predictor-only). (In float64 the match is 1e-13.)"""
    c = torch.full((1, 4, 4, 4), 0.25)
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma))
        return c.clone()

    sig = _sigmas(8)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)) * sig[0]
    out = run_sampler(name, denoise, x.clone(), sig, 0, lambda i, m: None)
    want = c + 0.001 * (x - c) / sig[0]
    assert torch.allclose(out, want, atol=1e-4), (out - want).abs().max()  # float32, as in ComfyUI
    assert (out - c).abs().max() > 1e-3  # a solver ending at sigma 0 would return c
    assert len(calls) == 8 and calls == pytest.approx([float(s) for s in sig[:-1]])


@pytest.mark.parametrize("sampler,offset", [("euler", 0), ("ddim", 1)])
def test_inpainting_keeps_comfyuis_noise(loaded, monkeypatch, sampler, offset):
    """Outside the mask the latent is re-noised every step with the run's initial noise; ComfyUI's ddim draws
    its own from seed + 1 (CPU generator, randn of the latent's shape)."""
    from kiln.nodes.sd import guidance

    h, pos, neg = loaded
    seen = []
    real = guidance.masked_denoiser

    def spy(denoise, latent, noise, mask):
        seen.append(noise.clone())
        return real(denoise, latent, noise, mask)

    monkeypatch.setattr(guidance, "masked_denoiser", spy)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), "noise_mask": mask}
    KSampler().run(model=h.model, seed=40, steps=3, cfg=2.0, sampler_name=sampler, scheduler="karras",
                   positive=pos, negative=neg, latent_image=lat)  # fmt: skip
    assert len(seen) == 1 and torch.equal(seen[0], ref_prepare_noise(40 + offset, (1, 4, 8, 8)))
