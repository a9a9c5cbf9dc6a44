"""Run-time model patches and attention multipliers on the tiny SD1.5-layout model.

Every patch is checked for what it is for: settings that mean "no change" give bit-identical samples, other
settings change the sample (in the expected way where the maths says so), the shared UNet's processors,
hooks and weights are the same objects before and after a run (also when the run fails), and the cached
base model samples bit-identically after patched runs.

The samples go through the guider (``GuiderValue.denoiser``, see ``patch_helpers.sample``), which consults
every patch's hooks; the last test runs the nodes in a graph through KSampler.
"""

from __future__ import annotations

import math

import pytest
import torch
from patch_helpers import conds, load_handles, sample, unet_state

from kiln.nodes.conditioning import encode_prompt
from kiln.nodes.model_guidance_patches import (
    DifferentialDiffusion,
    DifferentialDiffusionPatch,
    LcmSampling,
    ModelSamplingDiscrete,
    PerturbedAttentionGuidance,
    RescaleCFG,
    RescaleCfgPatch,
    SelfAttentionGuidance,
    X0Sampling,
    sag_degraded,
)
from kiln.nodes.model_merging import CLIPAttentionMultiply, UNetCrossAttentionMultiply, UNetSelfAttentionMultiply
from kiln.nodes.model_patches import FreeU, FreeU_V2, HyperTile, PatchModelAddDownscale, fourier_filter, tile_count
from kiln.nodes.sd.model_patch import CfgArgs, StepState, effective_sampling
from kiln.nodes.sd.samplers import ModelSampling


@pytest.fixture(scope="module")
def handles(world):
    return load_handles(world)


@pytest.fixture(scope="module")
def prompts(handles):
    return conds(handles[1])


@pytest.fixture(scope="module")
def plain(handles, prompts):
    return sample(handles[0], *prompts)


def _run(model, prompts, **kw):
    return sample(model, *prompts, **kw)


# -- FreeU ----------------------------------------------------------------------------------------------


def test_freeu_at_one_is_identity_and_other_settings_change_the_sample(handles, prompts, plain):
    model = handles[0]
    ident = FreeU().run(model=model, b1=1.0, b2=1.0, s1=1.0, s2=1.0)
    assert torch.equal(_run(ident, prompts), plain)
    v1 = _run(FreeU().run(model=model), prompts)
    v2 = _run(FreeU_V2().run(model=model), prompts)
    assert not torch.allclose(v1, plain, atol=1e-3)
    assert not torch.allclose(v2, plain, atol=1e-3)
    assert not torch.allclose(v1, v2, atol=1e-3)
    # only the skip filter: still a change (the tiny UNet has h of 2x its base channels: b2/s2)
    assert not torch.equal(_run(FreeU().run(model=model, b1=1.0, b2=1.0, s1=1.0, s2=0.5), prompts), plain)


def test_fourier_filter_scales_only_the_lowest_frequencies():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    assert torch.allclose(fourier_filter(x, 1, 1.0), x)
    y = fourier_filter(x, 1, 0.0)  # a 2x2 square around DC removed: the mean goes
    assert torch.allclose(y.mean(dim=(-2, -1)), torch.zeros(1, 2, dtype=torch.float64), atol=1e-6)
    high = x - x.mean(dim=(-2, -1), keepdim=True)
    assert (y - high).abs().max() < high.abs().max()  # the rest is mostly kept


# -- RescaleCFG -----------------------------------------------------------------------------------------


def test_rescale_cfg_zero_is_plain_cfg_and_one_matches_the_positive_spread(handles, prompts, plain):
    assert torch.equal(_run(RescaleCFG().run(model=handles[0], multiplier=0.0), prompts), plain)
    assert not torch.allclose(_run(RescaleCFG().run(model=handles[0], multiplier=0.7), prompts), plain, atol=1e-4)
    # the maths: at multiplier 1 the guided prediction, in v-space, has the positive prediction's std
    g = torch.Generator().manual_seed(3)
    x, cond, uncond = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    s = 2.5
    args = CfgArgs(x, torch.tensor(s), cond, uncond, 7.0, StepState(), lambda *a, **k: None)
    out = RescaleCfgPatch(1.0).cfg(args)
    root = math.sqrt(s * s + 1)

    def to_v(d):
        return (x / (s * s + 1) - d) * root / s

    assert torch.allclose(to_v(out).std(dim=(1, 2, 3)), to_v(cond).std(dim=(1, 2, 3)), rtol=1e-4)
    plain_cfg = uncond + 7.0 * (cond - uncond)
    assert torch.allclose(RescaleCfgPatch(1e-9).cfg(args), plain_cfg, atol=1e-4)
    assert RescaleCfgPatch(0.7).cfg(CfgArgs(x, torch.tensor(s), cond, None, 1.0, StepState(), None)) is None


# -- attention multipliers -------------------------------------------------------------------------------


def _weights_inside(model) -> dict[str, torch.Tensor]:
    with model.patched() as unet:
        return {n: p.detach().clone() for n, p in unet.named_parameters()}


def test_unet_attention_multipliers_identity_and_only_the_targeted_weights(handles, prompts, plain):
    model = handles[0]
    assert UNetSelfAttentionMultiply().run(model=model) is model  # all 1.0: the same MODEL
    assert torch.equal(_run(UNetCrossAttentionMultiply().run(model=model), prompts), plain)
    base = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    for node, attn in ((UNetSelfAttentionMultiply(), "attn1"), (UNetCrossAttentionMultiply(), "attn2")):
        patched = node.run(model=model, q=2.0, k=1.0, v=0.5, out=3.0)
        inside = _weights_inside(patched)
        changed = {n for n in base if not torch.equal(base[n], inside[n])}
        assert changed and all(f".{attn}." in n for n in changed)
        for n in changed:
            factor = 2.0 if ".to_q." in n else 0.5 if ".to_v." in n else 3.0
            assert ".to_k." not in n
            assert torch.equal(inside[n], base[n] * factor)
        assert any(".to_out.0.bias" in n for n in changed)
        assert not torch.allclose(_run(patched, prompts), plain, atol=1e-4)
    after = dict(model.unet.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())


def test_clip_attention_multiplier(handles):
    clip = handles[1]
    assert CLIPAttentionMultiply().run(clip=clip) is clip
    ref = encode_prompt(clip, "a red circle")[0][0]
    patched = CLIPAttentionMultiply().run(clip=clip, q=1.0, k=1.0, v=1.5, out=1.0)
    assert not torch.allclose(encode_prompt(patched, "a red circle")[0][0], ref, atol=1e-4)
    assert torch.equal(encode_prompt(clip, "a red circle")[0][0], ref)
    base = {n: p.detach().clone() for n, p in clip.text_encoders[0].named_parameters()}
    with patched.patched() as encoders:
        now = {n: p.detach().clone() for n, p in encoders[0].named_parameters()}
    changed = {n for n in base if not torch.equal(base[n], now[n])}
    assert changed and all("self_attn.v_proj." in n for n in changed)
    assert CLIPAttentionMultiply().run(clip=clip, v=2.0).__kiln_fingerprint__() != patched.__kiln_fingerprint__()


# -- SAG / PAG --------------------------------------------------------------------------------------------


def test_self_attention_guidance(handles, prompts, plain):
    model = handles[0]
    guided = _run(SelfAttentionGuidance().run(model=model, scale=0.5, blur_sigma=2.0), prompts)
    assert not torch.allclose(guided, plain, atol=1e-3)
    # scale 0 adds nothing (the recorded attention is computed explicitly, so equal up to rounding)
    assert torch.allclose(_run(SelfAttentionGuidance().run(model=model, scale=0.0), prompts), plain, atol=1e-3)
    # at cfg 1 the negative pass is skipped by the guider: SAG runs it itself
    assert not torch.allclose(
        _run(SelfAttentionGuidance().run(model=model), prompts, cfg=1.0), _run(model, prompts, cfg=1.0), atol=1e-3
    )


def test_sag_blurs_only_where_attention_is_high():
    x0 = torch.randn(1, 4, 8, 8)
    heads, hw = 2, 16  # a 4x4 map, upsampled x2
    attn = torch.zeros(heads, hw, hw)
    attn[:, :, 0] = 1.0  # every query looks at key 0 only: key 0 receives 16 > 1
    out = sag_degraded(x0, attn, 2.0)
    assert not torch.equal(out[..., :2, :2], x0[..., :2, :2])
    assert torch.equal(out[..., 2:, :], x0[..., 2:, :]) and torch.equal(out[..., :, 2:], x0[..., :, 2:])


def test_perturbed_attention_guidance(handles, prompts, plain):
    model = handles[0]
    assert torch.equal(_run(PerturbedAttentionGuidance().run(model=model, scale=0.0), prompts), plain)
    a = _run(PerturbedAttentionGuidance().run(model=model, scale=1.0), prompts)
    b = _run(PerturbedAttentionGuidance().run(model=model, scale=3.0), prompts)
    assert not torch.allclose(a, plain, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)


# -- HyperTile, Deep Shrink -------------------------------------------------------------------------------


def test_hypertile(handles, prompts, plain):
    model = handles[0]
    assert torch.equal(_run(HyperTile().run(model=model, tile_size=256), prompts), plain)  # one tile: as is
    tiled = HyperTile().run(model=model, tile_size=32, swap_size=1)
    a, b = _run(tiled, prompts), _run(tiled, prompts)
    assert not torch.allclose(a, plain, atol=1e-3)
    assert torch.equal(a, b)  # the tile choices restart with every run
    assert tile_count(8, 4, 1, 1) == 2 and tile_count(8, 8, 1, 1) == 1 and tile_count(8, 4, 2, 5) in (1, 2)


@pytest.mark.parametrize("after_skip", [True, False])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_deep_shrink(handles, prompts, plain, after_skip, block):
    model = handles[0]
    node = PatchModelAddDownscale()
    shrunk = node.run(model=model, block_number=block, end_percent=1.0, downscale_after_skip=after_skip)
    out = _run(shrunk, prompts)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, plain, atol=1e-3)
    never = node.run(model=model, block_number=block, start_percent=0.0, end_percent=0.0)  # empty range
    assert torch.equal(_run(never, prompts), plain)


def test_deep_shrink_rejects_a_block_past_the_encoder(handles):
    from kiln.engine import NodeError

    with pytest.raises(NodeError) as err:
        PatchModelAddDownscale().run(model=handles[0], block_number=30)
    assert err.value.input_name == "block_number"


# -- ModelSamplingDiscrete ---------------------------------------------------------------------------------


def test_model_sampling_discrete_v_prediction_changes_the_x0_conversion(handles, prompts):
    model = handles[0]
    v_model = ModelSamplingDiscrete().run(model=model, sampling="v_prediction", zsnr=False)
    assert effective_sampling(v_model).prediction_type == "v_prediction"
    assert effective_sampling(model).prediction_type == "epsilon"
    from kiln.nodes.sd.guidance import cfg_guider

    pos, neg = prompts
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    s = torch.tensor(3.0)
    with torch.inference_mode():
        with cfg_guider(model, pos, neg, 1.0).denoiser(x.shape) as d:
            eps_x0 = d(x, s)
        with cfg_guider(v_model, pos, neg, 1.0).denoiser(x.shape) as d:
            v_x0 = d(x, s)
    out = (x - eps_x0) / 3.0  # the UNet's raw output, recovered from the epsilon conversion
    assert torch.allclose(v_x0, x / 10.0 - out * (3.0 / math.sqrt(10.0)), atol=1e-4)
    zsnr = effective_sampling(ModelSamplingDiscrete().run(model=model, sampling="eps", zsnr=True))
    assert zsnr.sigma_max > 100 * effective_sampling(model).sigma_max
    assert ModelSamplingDiscrete().run(model=model, sampling="lcm").__kiln_fingerprint__() != (
        v_model.__kiln_fingerprint__()
    )


def test_x0_sampling_through_the_guider(handles, prompts):
    """x0 models return the UNet's output as the prediction; img_to_img ones also take x unscaled."""
    from kiln.nodes.sd.guidance import cfg_guider

    model = handles[0]
    pos, neg = prompts
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 2.0
    s = torch.tensor(2.0)
    got = {}
    with torch.inference_mode():
        for kind in ("eps", "x0", "img_to_img"):
            patched = ModelSamplingDiscrete().run(model=model, sampling=kind)
            with cfg_guider(patched, pos, neg, 1.0).denoiser(x.shape) as d:
                got[kind] = d(x, s)
    assert torch.allclose(got["x0"], (x - got["eps"]) / 2.0, atol=1e-4)
    assert not torch.allclose(got["img_to_img"], got["x0"], atol=1e-3)


def test_lcm_and_x0_parametrisations():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}
    lcm = LcmSampling(cfg)
    assert len(lcm.sigmas) == 50 and int(lcm.timestep(lcm.sigmas[-1])) == 999 and int(lcm.timestep(lcm.sigmas[0])) == 19
    full = ModelSampling(cfg)
    assert torch.allclose(lcm.sigmas[-1], full.sigmas[-1]) and torch.allclose(lcm.sigmas[0], full.sigmas[19])
    x, out = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    s = lcm.sigmas[10]
    t = float(lcm.timestep(s)) * 10
    x0 = x - out * s
    expect = t / math.sqrt(t * t + 0.25) * x0 + 0.25 / (t * t + 0.25) * x
    assert torch.allclose(lcm.calculate_denoised(s, out, x), expect, atol=1e-5)
    assert torch.equal(X0Sampling(cfg).calculate_denoised(s, out, x), out)


# -- Differential Diffusion ------------------------------------------------------------------------------


def test_differential_diffusion_thresholds_the_mask_by_step(handles):
    model = DifferentialDiffusion().run(model=handles[0], strength=1.0)
    patch = model.model_patches[-1]
    assert isinstance(patch, DifferentialDiffusionPatch)
    ms = effective_sampling(handles[0])
    sigmas = torch.tensor([float(ms.sigma(torch.tensor(999.0))), float(ms.sigma(torch.tensor(500.0))), 0.0])
    mask = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11)
    state = StepState(sigmas=sigmas)
    first = patch.denoise_mask(sigmas[0], mask, state)
    middle = patch.denoise_mask(sigmas[1], mask, state)
    assert torch.equal(first, (mask >= 1.0).float())  # at the start only fully masked pixels change
    assert 1 < int(middle.sum()) < 11 and set(middle.unique().tolist()) <= {0.0, 1.0}
    assert middle.sum() > first.sum()  # later steps let more pixels change
    half = DifferentialDiffusion().run(model=handles[0], strength=0.5).model_patches[-1]
    assert torch.allclose(half.denoise_mask(sigmas[1], mask, state), 0.5 * middle + 0.5 * mask)
    assert torch.equal(patch.denoise_mask(sigmas[1], mask, StepState()), mask)  # no schedule: unchanged


# -- the shared UNet is left as it was -------------------------------------------------------------------


def _all_hook_patches(model):
    model = FreeU().run(model=model)
    model = HyperTile().run(model=model, tile_size=32, swap_size=1)
    model = SelfAttentionGuidance().run(model=model)
    model = PerturbedAttentionGuidance().run(model=model)
    model = PatchModelAddDownscale().run(model=model, block_number=1, end_percent=1.0)
    return UNetSelfAttentionMultiply().run(model=model, q=1.5)


def test_hooks_and_weights_are_restored_after_a_run_even_when_it_fails(handles, prompts, plain):
    model = handles[0]
    before = unet_state(model.unet)
    patched = _all_hook_patches(model)
    out = _run(patched, prompts)
    assert unet_state(model.unet) == before
    with pytest.raises(RuntimeError, match="boom"):
        _run(patched, prompts, fail_at=1)
    assert unet_state(model.unet) == before
    assert torch.equal(_run(model, prompts), plain)  # the cached base model samples bit-identically
    assert torch.equal(_run(patched, prompts), out)


def test_fingerprints_follow_every_setting(handles):
    model = handles[0]
    fps = {
        FreeU().run(model=model).__kiln_fingerprint__(),
        FreeU().run(model=model, b1=1.2).__kiln_fingerprint__(),
        FreeU_V2().run(model=model).__kiln_fingerprint__(),
        HyperTile().run(model=model).__kiln_fingerprint__(),
        HyperTile().run(model=model, swap_size=3).__kiln_fingerprint__(),
        RescaleCFG().run(model=model).__kiln_fingerprint__(),
        RescaleCFG().run(model=model, multiplier=0.5).__kiln_fingerprint__(),
        SelfAttentionGuidance().run(model=model).__kiln_fingerprint__(),
        SelfAttentionGuidance().run(model=model, blur_sigma=1.0).__kiln_fingerprint__(),
        PerturbedAttentionGuidance().run(model=model).__kiln_fingerprint__(),
        PatchModelAddDownscale().run(model=model).__kiln_fingerprint__(),
        PatchModelAddDownscale().run(model=model, upscale_method="area").__kiln_fingerprint__(),
        DifferentialDiffusion().run(model=model).__kiln_fingerprint__(),
        ModelSamplingDiscrete().run(model=model, sampling="x0").__kiln_fingerprint__(),
        model.__kiln_fingerprint__(),
    }
    assert len(fps) == 15
    assert FreeU().run(model=model).__kiln_fingerprint__() == FreeU().run(model=model).__kiln_fingerprint__()


# -- in a graph ------------------------------------------------------------------------------------------


def test_patch_nodes_in_a_graph(world):
    """Every patch node chained in front of KSampler runs in a graph (needs KSampler to sample through the
    guider that consults model patches; with the old one the patches would be ignored, which the last
    assertion catches)."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "p1": {"class_type": "FreeU_V2", "inputs": {"model": ["1", 0]}},
        "p2": {"class_type": "RescaleCFG", "inputs": {"model": ["p1", 0], "multiplier": 0.5}},
        "p3": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["p2", 0], "scale": 1.0}},
        "p4": {"class_type": "UNetCrossAttentionMultiply", "inputs": {"model": ["p3", 0], "v": 1.2}},
        "c": {"class_type": "CLIPAttentionMultiply", "inputs": {"clip": ["1", 1], "q": 1.1}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["c", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["c", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 3,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["p4", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
            },
        },
    }
    ex = world.executor(cache="none")
    res = world.run(g, ["5"], ex)
    assert res.status == "success", res.error
    patched = res.values["5"][0]["samples"]
    g["5"]["inputs"]["model"] = ["1", 0]
    g["2"]["inputs"]["clip"] = g["3"]["inputs"]["clip"] = ["1", 1]
    res = world.run(g, ["5"], ex)
    assert res.status == "success", res.error
    assert not torch.allclose(patched, res.values["5"][0]["samples"], atol=1e-4)


def test_patches_and_merges_on_an_sdxl_layout(world, tmp_path_factory):
    """The structural patches, guidance patches and per-block merges find their places in an SDXL UNet
    (two text encoders, pooled conditioning) and leave it as it was."""
    import os

    import tiny_models

    from kiln import engine, nodes
    from kiln.nodes.model_merging import CLIPMergeSimple, ModelMergeSDXL

    base = tmp_path_factory.mktemp("xl")
    tiny_models.write_tiny_sdxl_folder(base / "models" / "checkpoints" / "xl")
    os.makedirs(base / "models" / "loras")
    reg = engine.Registry()
    nodes.register_builtin(reg)
    ex = engine.Executor(reg, folders=engine.Folders(base), services={"model_manager": world.manager})
    model, clip, _ = load_handles(world, "xl", ex)
    prompts = conds(clip)
    before = unet_state(model.unet)
    plain = _run(model, prompts)
    patched = _all_hook_patches(model)
    patched = RescaleCFG().run(model=patched, multiplier=0.5)
    out = _run(patched, prompts)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
    assert unet_state(model.unet) == before
    ratios = {name: 0.0 for name in ModelMergeSDXL.BLOCKS}
    (merged,) = ModelMergeSDXL().merge(model, patched, **ratios)  # all model2: the patched model's weights
    with merged.patched() as unet:
        w = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with patched.patched() as unet:
        assert all(torch.equal(w[n], p) for n, p in unet.named_parameters())
    both = CLIPMergeSimple().run(clip1=clip, clip2=clip, ratio=0.5)
    assert torch.allclose(
        encode_prompt(both, "a red circle")[0][0], encode_prompt(clip, "a red circle")[0][0], atol=1e-5
    )
    assert torch.equal(_run(model, prompts), plain)


def test_differential_diffusion_in_a_graph(world):
    """A soft (0.5) mask: with Differential Diffusion the area is kept for the early steps and changed for
    the late ones, unlike plain blending; a full mask (1.0) is the same with or without it."""

    def graph(value: float, dd: bool) -> dict:
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "d": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["1", 0], "strength": 1.0}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "m": {"class_type": "SolidMask", "inputs": {"value": value, "width": 64, "height": 64}},
            "n": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["m", 0]}},
            "5": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": 2,
                    "steps": 4,
                    "cfg": 3.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                    "model": ["d", 0] if dd else ["1", 0],
                    "positive": ["2", 0],
                    "negative": ["3", 0],
                    "latent_image": ["n", 0],
                },
            },
        }

    ex = world.executor(cache="none")
    out = {}
    for value in (0.5, 1.0):
        for dd in (False, True):
            res = world.run(graph(value, dd), ["5"], ex)
            assert res.status == "success", res.error
            out[value, dd] = res.values["5"][0]["samples"]
    assert torch.equal(out[1.0, True], out[1.0, False])
    assert not torch.allclose(out[0.5, True], out[0.5, False], atol=1e-3)
