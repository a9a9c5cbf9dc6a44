"""Custom sampling: the split-up KSampler (noise, guider, sampler, sigmas) gives KSampler's latent, the noise
nodes do what they say, the sampler nodes pass their options, and bad inputs are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln import engine, nodes
from kiln.nodes.conditioning import encode_prompt
from kiln.nodes.custom_sampling import (
    AddNoise,
    DisableNoise,
    KSamplerSelect,
    RandomNoise,
    SamplerCustom,
    SamplerCustomAdvanced,
    SamplerDPMPP_2M_SDE,
    SamplerEulerAncestral,
    SamplerLCMUpscale,
    SamplerLMS,
)
from kiln.nodes.loaders import load_checkpoint_handles
from kiln.nodes.sampling import KSampler, KSamplerAdvanced
from kiln.nodes.sd.samplers import DISCARD_PENULTIMATE, SamplerChoice, sigmas_for

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


@pytest.fixture(scope="module")
def loaded(world):
    h = load_checkpoint_handles(world.ckpt, "tiny")
    return h, encode_prompt(h.clip, "a red circle on a blue background"), encode_prompt(h.clip, "a square")


def _sigmas(model, scheduler, steps, denoise=1.0):
    try:
        from kiln.nodes.schedulers import BasicScheduler
    except ImportError:  # the scheduler nodes ship separately; the KSampler's own schedule is the same
        return sigmas_for(model.sampling, scheduler, steps, denoise)
    return BasicScheduler().run(model=model, scheduler=scheduler, steps=steps, denoise=denoise)


def _guider(model, pos, neg, cfg):
    from kiln.nodes.guiders import CFGGuider

    return CFGGuider().run(model=model, positive=pos, negative=neg, cfg=cfg)


def _latent(seed=None):
    if seed is None:
        return {"samples": torch.zeros(1, 4, 8, 8)}
    return {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}


def _ks(loaded, sampler, scheduler="karras", steps=4, cfg=4.0, seed=3, latent=None, denoise=1.0):
    h, pos, neg = loaded
    return KSampler().run(model=h.model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                          positive=pos, negative=neg, latent_image=latent or _latent(), denoise=denoise)  # fmt: skip


@pytest.mark.parametrize(
    "sampler,scheduler",
    [("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m_sde", "exponential"), ("uni_pc", "simple"),
     ("dpm_2", "karras")],
)  # fmt: skip
def test_custom_advanced_equals_ksampler_bit_for_bit(loaded, sampler, scheduler):
    """SamplerCustomAdvanced on KSampler's schedule gives KSampler's latent. For dpm_2(_ancestral) and
    uni_pc(_bh2) that schedule is, as in ComfyUI, one step longer with its second-to-last sigma dropped."""
    h, pos, neg = loaded
    want = _ks(loaded, sampler, scheduler)["samples"]
    sig = _sigmas(h.model, scheduler, 4)
    if sampler in DISCARD_PENULTIMATE:
        longer = _sigmas(h.model, scheduler, 5)
        sig = torch.cat([longer[:-2], longer[-1:]])
    out, denoised = SamplerCustomAdvanced().run(
        noise=RandomNoise().run(noise_seed=3),
        guider=_guider(h.model, pos, neg, 4.0),
        sampler=KSamplerSelect().run(sampler_name=sampler),
        sigmas=sig,
        latent_image=_latent(),
    )
    assert torch.equal(out["samples"], want)
    assert denoised["samples"].shape == want.shape and torch.isfinite(denoised["samples"]).all()


def test_sampler_custom_equals_ksampler_and_ksampler_advanced(loaded):
    h, pos, neg = loaded
    common = dict(model=h.model, cfg=4.0, positive=pos, negative=neg)
    sig = _sigmas(h.model, "karras", 4)
    out, _ = SamplerCustom().run(**common, add_noise=True, noise_seed=9, sampler=SamplerChoice("euler_ancestral"),
                                 sigmas=sig, latent_image=_latent())  # fmt: skip
    assert torch.equal(out["samples"], _ks(loaded, "euler_ancestral", seed=9)["samples"])
    # without noise, from a latent that has content: KSamplerAdvanced with add_noise disabled
    src = _latent(seed=4)
    out, _ = SamplerCustom().run(**common, add_noise=False, noise_seed=9, sampler=SamplerChoice("euler"), sigmas=sig,
                                 latent_image=src)  # fmt: skip
    adv = KSamplerAdvanced().run(**common, add_noise="disable", noise_seed=9, steps=4, sampler_name="euler",
                                 scheduler="karras", latent_image=src)  # fmt: skip
    assert torch.equal(out["samples"], adv["samples"])


def test_denoised_output_is_the_last_prediction(loaded):
    """One Euler step from s0 to s1: output = x + (x - x0) / s0 * (s1 - s0), where x0 is denoised_output."""
    h, pos, neg = loaded
    sig = _sigmas(h.model, "karras", 4)[:2]
    out, den = SamplerCustom().run(model=h.model, add_noise=True, noise_seed=5, cfg=4.0, positive=pos, negative=neg,
                                   sampler=SamplerChoice("euler"), sigmas=sig, latent_image=_latent())  # fmt: skip
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * torch.sqrt(1 + sig[0] ** 2)
    expect = x + (x - den["samples"]) / sig[0] * (sig[1] - sig[0])
    assert torch.allclose(out["samples"], expect, atol=1e-5)
    assert not torch.allclose(out["samples"], den["samples"], atol=1e-2)


def test_add_noise_then_disable_noise_equals_random_noise(loaded):
    """img2img split in two: AddNoise (latent + noise * sigma0 for a schedule ending at 0) then sampling with
    DisableNoise is the same as sampling with RandomNoise from the clean latent."""
    h, pos, neg = loaded
    sig = _sigmas(h.model, "normal", 6, denoise=0.5)
    src = _latent(seed=6)
    guider, sampler = _guider(h.model, pos, neg, 3.0), SamplerChoice("euler")
    noisy = AddNoise().run(model=h.model, noise=RandomNoise().run(noise_seed=21), sigmas=sig, latent_image=src)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    assert torch.equal(noisy["samples"], noise * sig[0] + src["samples"])
    split, _ = SamplerCustomAdvanced().run(noise=DisableNoise().run(), guider=guider, sampler=sampler, sigmas=sig,
                                           latent_image=noisy)  # fmt: skip
    one, _ = SamplerCustomAdvanced().run(noise=RandomNoise().run(noise_seed=21), guider=guider, sampler=sampler,
                                         sigmas=sig, latent_image=src)  # fmt: skip
    assert torch.equal(split["samples"], one["samples"])
    assert (
        AddNoise()
        .run(model=h.model, noise=DisableNoise().run(), sigmas=sig, latent_image=src)["samples"]
        .equal(src["samples"])
    )


def test_short_sigmas_return_the_latent_unchanged(loaded):
    h, pos, neg = loaded
    src = _latent(seed=1)
    for sig in (torch.zeros(0), torch.tensor([5.0])):
        out, den = SamplerCustomAdvanced().run(noise=RandomNoise().run(noise_seed=1),
                                               guider=_guider(h.model, pos, neg, 2.0),
                                               sampler=SamplerChoice("euler"), sigmas=sig,
                                               latent_image=src)  # fmt: skip
        assert torch.equal(out["samples"], src["samples"]) and torch.equal(den["samples"], src["samples"])
    assert AddNoise().run(model=h.model, noise=RandomNoise().run(noise_seed=1), sigmas=torch.zeros(0),
                          latent_image=src)["samples"].equal(src["samples"])  # fmt: skip


def test_bad_inputs_name_the_input(loaded):
    h, pos, neg = loaded
    guider = _guider(h.model, pos, neg, 2.0)
    sig = _sigmas(h.model, "karras", 3)
    run = SamplerCustomAdvanced().run
    cases = [
        (dict(noise=DisableNoise().run(), latent_image=_latent()), "noise", "nothing to denoise"),
        (dict(sigmas=torch.ones(2, 2)), "sigmas", "1-D"),
        (dict(sigmas=torch.tensor([1.0, float("nan")])), "sigmas", "finite"),
        (dict(sampler="euler"), "sampler", "not a SAMPLER"),
        (dict(sampler=SamplerChoice("euler_magic")), "sampler", "unknown"),
        (dict(noise=3), "noise", "not a NOISE"),
        (dict(guider=h.model), "guider", "not a GUIDER"),
        (dict(latent_image={"samples": torch.zeros(1, 3, 8, 8)}), "latent_image", "shape"),
    ]
    for change, input_name, words in cases:
        kw = dict(noise=RandomNoise().run(noise_seed=0), guider=guider, sampler=SamplerChoice("euler"), sigmas=sig,
                  latent_image=_latent()) | change  # fmt: skip
        with pytest.raises(engine.NodeError) as e:
            run(**kw)
        assert e.value.input_name == input_name and words in str(e.value), (change, str(e.value))
    with pytest.raises(engine.NodeError) as e:
        KSamplerSelect().run(sampler_name="euler_magic")
    assert e.value.input_name == "sampler_name"
    with pytest.raises(engine.NodeError) as e:
        SamplerCustom().run(model=h.model, add_noise=False, noise_seed=0, cfg=2.0, positive=pos, negative=neg,
                            sampler=SamplerChoice("euler"), sigmas=sig, latent_image=_latent())  # fmt: skip
    assert e.value.input_name == "add_noise"


def test_sampler_nodes_pass_their_options(loaded):
    h, pos, neg = loaded
    guider = _guider(h.model, pos, neg, 3.0)
    sig = _sigmas(h.model, "karras", 5)

    def run(sampler, seed=2):
        return SamplerCustomAdvanced().run(noise=RandomNoise().run(noise_seed=seed), guider=guider, sampler=sampler,
                                           sigmas=sig, latent_image=_latent())[0]["samples"]  # fmt: skip

    euler = run(SamplerChoice("euler"))
    # eta 0 takes away the ancestral noise: Euler's path (the last step returns the prediction directly)
    assert torch.allclose(run(SamplerEulerAncestral().run(eta=0.0, s_noise=1.0)), euler, atol=1e-4)
    assert not torch.allclose(run(SamplerEulerAncestral().run(eta=1.0, s_noise=1.0)), euler, atol=1e-2)
    # LMS of order 1 is Euler
    assert torch.allclose(run(SamplerLMS().run(order=1)), euler, atol=1e-5)
    assert not torch.allclose(run(SamplerLMS().run(order=4)), euler, atol=1e-3)
    # the Brownian tree on the "gpu" is the CPU one here; the solver type changes the correction
    mid_cpu = run(SamplerDPMPP_2M_SDE().run(solver_type="midpoint", eta=1.0, s_noise=1.0, noise_device="cpu"))
    mid_gpu = run(SamplerDPMPP_2M_SDE().run(solver_type="midpoint", eta=1.0, s_noise=1.0, noise_device="gpu"))
    heun = run(SamplerDPMPP_2M_SDE().run(solver_type="heun", eta=1.0, s_noise=1.0, noise_device="cpu"))
    assert torch.equal(mid_cpu, mid_gpu) and not torch.allclose(mid_cpu, heun, atol=1e-4)
    assert torch.equal(mid_cpu, run(SamplerChoice.of("dpmpp_2m_sde", eta=1.0, s_noise=1.0)))
    # LCM upscale doubles the latent over the steps
    big = run(SamplerLCMUpscale().run(scale_ratio=2.0, scale_steps=-1, upscale_method="bislerp"))
    assert big.shape == (1, 4, 16, 16) and torch.isfinite(big).all()
    assert torch.equal(big, run(SamplerLCMUpscale().run(scale_ratio=2.0, scale_steps=-1, upscale_method="bislerp")))


def test_every_sampler_node_runs_with_its_defaults(loaded):
    from kiln.engine.node import spec_from_native
    from kiln.nodes import custom_sampling as cs

    h, pos, neg = loaded
    guider = _guider(h.model, pos, neg, 3.0)
    sig = _sigmas(h.model, "karras", 4)
    names = ["SamplerEulerAncestral", "SamplerEulerAncestralCFGPP", "SamplerEulerCFGpp", "SamplerDPMPP_2M_SDE",
             "SamplerDPMPP_3M_SDE", "SamplerDPMPP_SDE", "SamplerDPMPP_2S_Ancestral", "SamplerLMS",
             "SamplerDPMAdaptative", "SamplerLCMUpscale"]  # fmt: skip
    for name in names:
        cls = getattr(cs, name)
        defaults = {k: v.default for k, v in spec_from_native(cls).inputs.items()}
        sampler = cls().run(**defaults)
        assert isinstance(sampler, SamplerChoice), name
        out = SamplerCustomAdvanced().run(noise=RandomNoise().run(noise_seed=1), guider=guider, sampler=sampler,
                                          sigmas=sig, latent_image=_latent())[0]["samples"]  # fmt: skip
        assert torch.isfinite(out).all() and out.abs().mean() > 0.01, name


def test_euler_cfg_pp_alternative_steps_along_the_negative(loaded):
    """At cfg 1 there is no negative pass and the alternative CFG++ step is Euler's; with guidance it uses
    the negative prediction and walks another path."""
    from kiln.nodes.custom_sampling import SamplerEulerCFGpp

    h, pos, neg = loaded
    sig = _sigmas(h.model, "karras", 4)
    alt = SamplerEulerCFGpp().run(version="alternative")
    assert alt == SamplerChoice("euler_cfg_pp_alt")
    assert SamplerEulerCFGpp().run(version="regular") == SamplerChoice("euler_cfg_pp")

    def run(sampler, cfg):
        guider = _guider(h.model, pos, neg, cfg)
        noise = RandomNoise().run(noise_seed=4)
        out = SamplerCustomAdvanced().run(
            noise=noise, guider=guider, sampler=sampler, sigmas=sig, latent_image=_latent()
        )
        return out[0]["samples"]

    assert torch.allclose(run(alt, 1.0), run(SamplerChoice("euler"), 1.0), atol=1e-4)
    assert not torch.allclose(run(alt, 4.0), run(SamplerChoice("euler"), 4.0), atol=1e-2)


def test_sampler_values_fingerprint_by_name_and_options():
    from kiln.engine.fingerprint import fingerprint

    a = SamplerEulerAncestral().run(eta=0.5, s_noise=1.0)
    assert fingerprint(a) == fingerprint(SamplerChoice.of("euler_ancestral", s_noise=1.0, eta=0.5))
    assert fingerprint(a) != fingerprint(SamplerEulerAncestral().run(eta=0.6, s_noise=1.0))
    assert fingerprint(RandomNoise().run(noise_seed=1)) != fingerprint(RandomNoise().run(noise_seed=2))


def test_custom_sampling_graph_matches_txt2img(tmp_path):
    """graphs/custom_sampling.json (RandomNoise + CFGGuider + KSamplerSelect + BasicScheduler +
    SamplerCustomAdvanced) on the shipped model gives txt2img.json's latent exactly and saves its picture."""
    import json

    reg = engine.Registry()
    nodes.register_builtin(reg)
    folders = engine.Folders(REPO, input_dir=tmp_path / "in", output_dir=tmp_path / "out", temp_dir=tmp_path / "t")
    ex = engine.Executor(reg, cache="lru:32", folders=folders)
    custom = json.loads((REPO / "graphs" / "custom_sampling.json").read_text())
    plain = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    custom["13"]["inputs"]["steps"] = plain["3"]["inputs"]["steps"] = 6  # fewer steps: same comparison, faster
    res = ex.run(engine.Graph.from_json(custom), targets=["14", "9"])
    assert res.status == "success", res.error
    saved = res.outputs["9"]["images"][0]
    assert (tmp_path / "out" / saved["subfolder"] / saved["filename"]).is_file()
    ref = ex.run(engine.Graph.from_json(plain), targets=["3"])
    assert ref.status == "success", ref.error
    assert torch.equal(res.values["14"][0]["samples"], ref.values["3"][0]["samples"])
