"""The guider's conditioning semantics (areas, masks, strengths, timestep ranges, inpainting inputs), the
guidance modes, the model-patch contract, and the conditioning/guider nodes, on tiny random models.

One file past the usual size: the nodes and the guider are tested together, each node by what the guider
does with the options it sets.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from tiny_models import SCHEDULER_CONFIG, UNET_CONFIG, write_tiny_sdxl_folder

from kiln.engine import NodeError
from kiln.nodes.conditioning import (
    CLIPTextEncodeSDXL,
    CLIPTextEncodeSDXLRefiner,
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetTimestepRange,
    ConditioningZeroOut,
    ControlNetApplyAdvanced,
    encode_prompt,
)
from kiln.nodes.conditioning_areas import (
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    InpaintModelConditioning,
)
from kiln.nodes.guiders import BasicGuider, CFGGuider, DualCFGGuider, PerpNeg, PerpNegGuider
from kiln.nodes.latent import encode
from kiln.nodes.loaders import load_checkpoint_handles
from kiln.nodes.sd.conds import batch_to, repeat_to
from kiln.nodes.sd.guidance import GuiderValue, cfg_guider, masked_denoiser, perp_neg
from kiln.nodes.sd.handles import ControlNetHandle, ModelHandle
from kiln.nodes.sd.model_patch import ModelPatch
from kiln.nodes.sd.samplers import calculate_sigmas

SHAPE = (1, 4, 16, 16)  # a 128x128 "pixel" latent in EmptyLatentImage's units


@pytest.fixture(scope="module")
def tiny(world):
    h = load_checkpoint_handles(world.ckpt, "tiny")
    a = encode_prompt(h.clip, "a red circle")
    b = encode_prompt(h.clip, "a green square in the top left corner")
    n = encode_prompt(h.clip, "")
    return h, a, b, n


def _x(shape=SHAPE, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _once(guider: GuiderValue, sigma: float = 2.0, x: torch.Tensor | None = None) -> torch.Tensor:
    x = _x() if x is None else x
    with guider.denoiser(tuple(x.shape)) as denoise:
        return denoise(x, torch.tensor(sigma))


def _basic(model, cond) -> GuiderValue:
    return BasicGuider().run(model=model, conditioning=cond)


def _euler(guider: GuiderValue, shape=SHAPE, steps: int = 6, seed: int = 0) -> torch.Tensor:
    """A plain Euler run (independent of the sampler module, so these tests see only the guider)."""
    sig = calculate_sigmas(guider.model.sampling, "normal", steps)
    x = _x(shape, seed) * float(sig[0])
    with guider.denoiser(shape, sig) as denoise:
        for i in range(steps):
            x0 = denoise(x, sig[i])
            x = x + (x - x0) / sig[i] * (sig[i + 1] - sig[i])
    return x


def _combine(c1, c2):
    return ConditioningCombine().run(conditioning_1=c1, conditioning_2=c2)


# -- KSampler's guidance is unchanged ------------------------------------------------------------------------


def _earlier_guidance(model, positive, negative, cfg: float, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """KSampler's guidance before the GUIDER, kept as the reference: every entry of both conditionings in one
    UNet batch, entries of one side averaged, then plain CFG (the negative skipped at cfg 1)."""
    ms, b, s = model.sampling, x.shape[0], torch.tensor(sigma)
    skip = math.isclose(cfg, 1.0)
    embs = [e for e, _ in positive] + ([] if skip else [e for e, _ in negative])
    length = math.lcm(*[e.shape[1] for e in embs])
    context = torch.cat([batch_to(repeat_to(e, length), b) for e in embs])
    xin = x.repeat(len(embs), 1, 1, 1)
    t = ms.timestep(s).expand(xin.shape[0])
    out = model.unet(ms.calculate_input(s, xin), t.float(), encoder_hidden_states=context, return_dict=False)[0]
    parts = ms.calculate_denoised(s, out.float(), xin).split(b)
    cond = torch.stack(parts[: len(positive)]).mean(0)
    if skip:
        return cond
    uncond = torch.stack(parts[len(positive) :]).mean(0)
    return uncond + cfg * (cond - uncond)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_cfg_guider_equals_the_earlier_guidance_bit_for_bit(tiny, cfg):
    h, a, b, n = tiny
    x = _x((2, 4, 8, 8))
    for pos in (a, _combine(a, b)):
        node = CFGGuider().run(model=h.model, positive=pos, negative=n, cfg=cfg)
        for sigma in (14.0, 2.0, 0.1):
            with torch.inference_mode():
                old = _earlier_guidance(h.model, pos, n, cfg, x, sigma)
            for guider in (cfg_guider(h.model, pos, n, cfg), node):
                with guider.denoiser(tuple(x.shape)) as denoise:
                    assert torch.equal(denoise(x, torch.tensor(sigma)), old)
                    assert (denoise.last_uncond_denoised is None) == (cfg == 1.0)
                    assert denoise.model_sampling is not None


def test_guider_fingerprint_follows_its_inputs(tiny):
    h, a, b, n = tiny
    fp = cfg_guider(h.model, a, n, 5.0).__kiln_fingerprint__()
    assert fp == cfg_guider(h.model, [[a[0][0].clone(), dict(a[0][1])]], n, 5.0).__kiln_fingerprint__()
    assert fp != cfg_guider(h.model, b, n, 5.0).__kiln_fingerprint__()
    assert fp != cfg_guider(h.model, a, n, 6.0).__kiln_fingerprint__()
    assert fp != cfg_guider(h.model, ConditioningSetAreaStrength().run(conditioning=a, strength=0.5), n, 5.0)
    assert fp != _basic(h.model, a).__kiln_fingerprint__()


# -- combining conditionings -----------------------------------------------------------------------------


def test_combine_averages_the_predictions(tiny):
    h, a, b, _ = tiny
    pa, pb = _once(_basic(h.model, a)), _once(_basic(h.model, b))
    both = _once(_basic(h.model, _combine(a, b)))
    assert torch.allclose(both, (pa + pb) / 2, atol=1e-4)
    weighted = _combine(a, ConditioningSetAreaStrength().run(conditioning=b, strength=3.0))
    assert torch.allclose(_once(_basic(h.model, weighted)), (pa + 3 * pb) / 4, atol=1e-4)


def test_concat_and_average_math(tiny):
    h, a, b, _ = tiny
    (ea, oa), (eb, ob) = a[0], b[0]
    cat = ConditioningConcat().run(conditioning_to=a, conditioning_from=b)
    assert torch.equal(cat[0][0], torch.cat([ea, eb], dim=1)) and cat[0][1] is not oa
    avg = ConditioningAverage()
    assert torch.equal(avg.run(conditioning_to=a, conditioning_from=b, conditioning_to_strength=1.0)[0][0], ea)
    mid = avg.run(conditioning_to=a, conditioning_from=b, conditioning_to_strength=0.25)[0]
    assert torch.allclose(mid[0], ea * 0.25 + eb * 0.75)
    assert torch.allclose(mid[1]["pooled_output"], oa["pooled_output"] * 0.25 + ob["pooled_output"] * 0.75)
    # a longer "from" is cut to the target's length, a shorter one padded with zeros
    long = [[torch.cat([eb, eb], dim=1), ob]]
    assert avg.run(conditioning_to=a, conditioning_from=long, conditioning_to_strength=0.5)[0][0].shape == ea.shape
    short = avg.run(conditioning_to=cat, conditioning_from=b, conditioning_to_strength=0.0)[0][0]
    assert torch.equal(short[:, : eb.shape[1]], eb) and short[:, eb.shape[1] :].abs().max() == 0
    with pytest.raises(NodeError) as e:
        ConditioningConcat().run(conditioning_to=a, conditioning_from=[[torch.zeros(1, 77, 64), {}]])
    assert e.value.input_name == "conditioning_from"


def test_zero_out_zeroes_embedding_and_pooled_output_only(tiny):
    _, a, _, _ = tiny
    ranged = ConditioningSetTimestepRange().run(conditioning=a, start=0.2, end=0.8)
    (z, opts) = ConditioningZeroOut().run(conditioning=ranged)[0]
    assert z.shape == a[0][0].shape and z.abs().max() == 0
    assert opts["pooled_output"].shape == a[0][1]["pooled_output"].shape and opts["pooled_output"].abs().max() == 0
    assert (opts["start_percent"], opts["end_percent"]) == (0.2, 0.8)
    assert a[0][0].abs().max() > 0  # the input is not changed


# -- timestep ranges -------------------------------------------------------------------------------------


def test_timestep_range_switches_the_prompt_mid_sampling(tiny):
    h, a, b, _ = tiny
    rng = ConditioningSetTimestepRange()
    switch = _combine(rng.run(conditioning=a, start=0.0, end=0.5), rng.run(conditioning=b, start=0.5, end=1.0))
    g = _basic(h.model, switch)
    border = h.model.sampling.percent_to_sigma(0.5)
    early, late = border * 4, border / 4
    assert torch.equal(_once(g, early), _once(_basic(h.model, a), early))
    assert torch.equal(_once(g, late), _once(_basic(h.model, b), late))
    out, pure_a, pure_b = _euler(g), _euler(_basic(h.model, a)), _euler(_basic(h.model, b))
    assert (out - pure_a).abs().max() > 1e-3 and (out - pure_b).abs().max() > 1e-3
    whole = rng.run(conditioning=a, start=0.0, end=1.0)
    assert torch.equal(_euler(_basic(h.model, whole)), pure_a)


def test_a_conditioning_out_of_its_range_predicts_zero_as_comfyui(tiny):
    h, a, _, _ = tiny
    late = ConditioningSetTimestepRange().run(conditioning=a, start=0.5, end=1.0)
    assert _once(_basic(h.model, late), sigma=14.0).abs().max() == 0


# -- areas and masks -------------------------------------------------------------------------------------


def _units(guider: GuiderValue, shape=SHAPE):
    with guider.denoiser(shape) as denoise:
        return denoise.units


def test_area_in_latent_units_with_feathered_inner_edges(tiny):
    h, a, _, n = tiny
    right = ConditioningSetArea().run(conditioning=a, width=64, height=128, x=64, y=0, strength=2.0)
    assert right[0][1]["area"] == (16, 8, 0, 8) and right[0][1]["strength"] == 2.0
    units = _units(cfg_guider(h.model, right, n, 5.0))
    (unit,) = units["positive"]
    assert unit.area == (16, 8, 0, 8)
    w = unit.weight[0, 0]
    # a window 8 wide ramps over 8 // 4 = 2 columns on its inner (left) edge; the latent's borders do not ramp
    assert torch.allclose(w[:, 0], torch.full((16,), 1.0)) and torch.allclose(w[:, 1:], torch.full((16, 7), 2.0))
    # the negative gets a unit over the same area, so guidance stays balanced there
    assert sorted(str(u.area) for u in units["negative"]) == ["(16, 8, 0, 8)", "None"]


def test_area_percentage_resolves_against_the_latent(tiny):
    h, a, _, _ = tiny
    c = ConditioningSetAreaPercentage().run(conditioning=a, width=0.25, height=0.5, x=0.25, y=0.5, strength=1.0)
    (unit,) = _units(_basic(h.model, c))["positive"]
    assert unit.area == (8, 4, 8, 4)
    (unit,) = _units(_basic(h.model, c), (1, 4, 8, 8))["positive"]
    assert unit.area == (4, 2, 4, 2)


def test_an_area_predicts_its_window_and_nothing_elsewhere(tiny):
    h, a, _, _ = tiny
    x = _x()
    corner = ConditioningSetArea().run(conditioning=a, width=64, height=64, x=0, y=0, strength=1.0)
    out = _once(_basic(h.model, corner), x=x)
    window = _once(_basic(h.model, a), x=x[:, :, :8, :8].contiguous())
    assert torch.allclose(out[:, :, :8, :8], window, atol=1e-4)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[:8, :8] = False
    assert out[:, :, outside].abs().max() == 0  # nothing covers it: ComfyUI predicts 0 there


def test_areas_outside_the_latent_are_clamped_or_refused(tiny):
    h, a, _, n = tiny
    wide = ConditioningSetArea().run(conditioning=a, width=512, height=64, x=64, y=0, strength=1.0)
    (unit,) = _units(_basic(h.model, wide))["positive"]
    assert unit.area == (8, 8, 0, 8)  # cut at the latent's edge
    beyond = ConditioningSetArea().run(conditioning=a, width=64, height=64, x=256, y=0, strength=1.0)
    with pytest.raises(NodeError) as e:
        _once(cfg_guider(h.model, beyond, n, 5.0))
    assert e.value.input_name == "positive" and "outside" in str(e.value)


def test_mask_weights_the_prediction(tiny):
    h, a, b, _ = tiny
    x = _x()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # the left half, at another resolution than the latent
    masked = ConditioningSetMask().run(conditioning=a, mask=mask, strength=1.0, set_cond_area="default")
    out = _once(_basic(h.model, _combine(masked, b)), x=x)
    pa, pb = _once(_basic(h.model, a), x=x), _once(_basic(h.model, b), x=x)
    assert torch.allclose(out[..., :, :7], (pa[..., :, :7] + pb[..., :, :7]) / 2, atol=1e-4)
    assert torch.allclose(out[..., :, 9:], pb[..., :, 9:], atol=1e-4)


def test_mask_bounds_sets_the_area(tiny):
    h, a, _, n = tiny
    mask = torch.zeros(128, 128)
    mask[64:96, 16:112] = 1.0
    c = ConditioningSetMask().run(conditioning=a, mask=mask, strength=0.5, set_cond_area="mask bounds")
    assert c[0][1]["set_area_to_bounds"] and c[0][1]["mask_strength"] == 0.5 and c[0][1]["mask"].ndim == 3
    (unit,) = _units(cfg_guider(h.model, c, n, 3.0))["positive"]
    assert unit.area == (8, 12, 8, 2)  # rows 8..11 grown to the 8-row minimum, columns 2..13
    assert unit.weight.shape == (1, 1, 8, 12) and float(unit.weight.max()) == 0.5


def test_bad_masks_are_refused_with_the_input_named(tiny):
    h, a, _, n = tiny
    with pytest.raises(NodeError) as e:
        ConditioningSetMask().run(conditioning=a, mask=torch.zeros(1, 1, 8, 8), strength=1.0, set_cond_area="default")
    assert e.value.input_name == "mask"
    two = ConditioningSetMask().run(conditioning=a, mask=torch.ones(2, 16, 16), strength=1.0, set_cond_area="default")
    with pytest.raises(NodeError) as e:
        with cfg_guider(h.model, two, n, 5.0).denoiser((3, 4, 16, 16)):
            pass
    assert e.value.input_name == "positive" and "batch" in str(e.value)
    (unit,) = _units(_basic(h.model, two), (1, 4, 16, 16))["positive"]  # extra masks are ignored, as ComfyUI
    assert unit.weight.shape == (1, 1, 16, 16)


def test_conditioning_of_another_model_family_is_refused(tiny):
    h, a, _, n = tiny
    xl = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(NodeError) as e:
        CFGGuider().run(model=h.model, positive=a, negative=xl, cfg=5.0)
    assert e.value.input_name == "negative" and "2048" in str(e.value) and e.value.hint
    with pytest.raises(NodeError) as e:
        DualCFGGuider().run(model=h.model, cond1=a, cond2=xl, negative=n, cfg_conds=1.0, cfg_cond2_negative=1.0)
    assert e.value.input_name == "cond2"
    with pytest.raises(NodeError) as e:
        BasicGuider().run(model=h.model, conditioning="a prompt")
    assert e.value.input_name == "conditioning"
    # a mix inside one conditioning (KSampler checks only the first entry) is caught when sampling starts
    with pytest.raises(NodeError) as e:
        _once(cfg_guider(h.model, a, n + xl, 5.0))
    assert e.value.input_name == "negative" and "2048" in str(e.value)


# -- guidance modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_dual_cfg(tiny, style):
    h, a, b, n = tiny
    g = DualCFGGuider().run(
        model=h.model, cond1=a, cond2=b, negative=n, cfg_conds=3.0, cfg_cond2_negative=2.0, style=style
    )
    pa, pb, pn = (_once(_basic(h.model, c)) for c in (a, b, n))
    if style == "regular":
        want = pn + (pb - pn) * 2.0 + (pa - pb) * 3.0
    else:
        want = pn + ((pb + (pa - pb) * 3.0) - pn) * 2.0
    assert torch.allclose(_once(g), want, atol=1e-3)  # batch of 3 vs one by one, scaled by the cfgs


def test_dual_cfg_skips_what_a_scale_of_one_does_not_need(tiny):
    h, a, b, n = tiny
    seen = _Recorder()
    model = h.model.with_model_patch(seen)
    g = DualCFGGuider().run(model=model, cond1=a, cond2=b, negative=n, cfg_conds=1.0, cfg_cond2_negative=1.0)
    assert torch.allclose(_once(g), _once(_basic(h.model, a)), atol=1e-5)
    assert seen.units == [["positive"]]
    g = DualCFGGuider().run(model=model, cond1=a, cond2=b, negative=n, cfg_conds=2.0, cfg_cond2_negative=1.0)
    seen.units.clear()
    _once(g)
    assert sorted(seen.units[0]) == ["middle", "positive"]


def test_perp_neg_guider_and_the_deprecated_patch(tiny):
    h, a, b, n = tiny
    g = PerpNegGuider().run(model=h.model, positive=a, negative=b, empty_conditioning=n, cfg=4.0, neg_scale=1.5)
    pa, pb, pn = (_once(_basic(h.model, c)) for c in (a, b, n))
    out = _once(g)
    assert torch.allclose(out, perp_neg(pa, pb, pn, 1.5, 4.0), atol=1e-3)  # batch of 3 vs one by one
    # the negative's component along the positive direction is removed: scaling it along pos changes nothing
    pos, neg = pa - pn, pb - pn
    perp = neg - (neg * pos).sum() / (pos * pos).sum() * pos
    assert torch.allclose(perp_neg(pa, pn + perp + 0.7 * pos, pn, 1.5, 4.0), perp_neg(pa, pb, pn, 1.5, 4.0), atol=1e-4)
    patched = PerpNeg().run(model=h.model, empty_conditioning=n, neg_scale=1.5)
    assert patched.__kiln_fingerprint__() != h.model.__kiln_fingerprint__()
    assert torch.allclose(_once(CFGGuider().run(model=patched, positive=a, negative=b, cfg=4.0)), out, atol=1e-3)


# -- the model-patch contract ----------------------------------------------------------------------------


class _Recorder(ModelPatch):
    """Records what the guider tells a patch; optionally replaces cfg and changes the masks."""

    def __init__(self, replace_cfg: bool = False, mask_scale: float | None = None):
        self.replace_cfg, self.mask_scale = replace_cfg, mask_scale
        self.events: list[str] = []
        self.units: list[list[str]] = []
        self.percents: list[float] = []
        self.masks: list[float] = []

    def token(self) -> str:
        return f"recorder:{id(self)}"

    def unet_hooks(self, unet, state):
        recorder = self

        @contextlib.contextmanager
        def hooks():
            def pre(module, args):
                recorder.units.append(list(state.units))
                recorder.percents.append(state.percent)

            handle = unet.register_forward_pre_hook(pre)
            recorder.events.append("enter")
            try:
                yield
            finally:
                handle.remove()
                recorder.events.append("exit")

        return hooks()

    def cfg(self, args):
        if not self.replace_cfg:
            return None
        again = args.predict(args.x, args.sigma, "positive")
        assert torch.allclose(again, args.cond_denoised, atol=1e-4)
        return args.cond_denoised * 0 + 7.0

    def post_cfg(self, args, denoised):
        self.events.append("post_cfg")
        return denoised + 1.0 if self.replace_cfg else denoised

    def denoise_mask(self, sigma, mask, state):
        self.masks.append(float(sigma))
        return mask if self.mask_scale is None else mask * self.mask_scale


def test_patch_hooks_state_cfg_and_post_cfg(tiny):
    h, a, _, n = tiny
    rec = _Recorder()
    g = cfg_guider(h.model.with_model_patch(rec), a, n, 5.0)
    sig = calculate_sigmas(h.model.sampling, "normal", 3)
    with g.denoiser(SHAPE, sig) as denoise:
        assert rec.events == ["enter"] and denoise.state.sigmas is sig
        plain = denoise(_x(), sig[0])
        denoise(_x(), sig[2])
    assert rec.events == ["enter", "post_cfg", "post_cfg", "exit"]
    assert rec.units == [["positive", "negative"], ["positive", "negative"]]
    assert rec.percents[0] < 0.05 and rec.percents[1] > rec.percents[0]
    assert torch.equal(plain, _once(cfg_guider(h.model, a, n, 5.0), float(sig[0])))
    swap = _Recorder(replace_cfg=True)
    out = _once(cfg_guider(h.model.with_model_patch(swap), a, n, 5.0))
    assert torch.equal(out, torch.full_like(out, 8.0))  # cfg replaced (7), then post_cfg (+1)


def test_masked_denoiser_asks_every_patch_for_the_mask(tiny):
    h, a, _, n = tiny
    rec = _Recorder(mask_scale=0.0)
    g = cfg_guider(h.model.with_model_patch(rec), a, n, 5.0)
    latent = _x(seed=3)
    mask = torch.ones(SHAPE)
    with g.denoiser(SHAPE) as denoise:
        masked = masked_denoiser(denoise, latent, torch.zeros(SHAPE), mask)
        out = masked(_x(), torch.tensor(2.0))
        assert masked.model_sampling is denoise.model_sampling and masked.last_uncond_denoised is not None
    assert rec.masks == [2.0]
    assert torch.equal(out, latent)  # the patch emptied the mask: everything is kept


def test_controlnet_on_both_sides_runs_in_one_batch(tiny, world):
    h, a, _, n = tiny
    net = ControlNetHandle(world.controlnet, "test:tiny_cn")
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = ControlNetApplyAdvanced().run(
        positive=a, negative=n, control_net=net, image=hint, strength=0.8, start_percent=0.0, end_percent=1.0
    )
    rec = _Recorder()
    x = _x()
    out = _once(cfg_guider(h.model.with_model_patch(rec), pos, neg, 5.0), x=x)
    assert rec.units == [["positive", "negative"]]
    cond, uncond = _once(_basic(h.model, pos), x=x), _once(_basic(h.model, neg), x=x)  # one side at a time
    assert torch.allclose(out, uncond + 5.0 * (cond - uncond), atol=1e-3)
    assert not torch.allclose(out, _once(cfg_guider(h.model, a, n, 5.0), x=x), atol=1e-3)


# -- SDXL ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl(world):
    path = write_tiny_sdxl_folder(world.models / "checkpoints" / "tiny_xl_cond")
    return load_checkpoint_handles(path, "tiny_xl_cond")


def test_clip_text_encode_sdxl_uses_each_encoder_for_its_text(xl):
    node = CLIPTextEncodeSDXL()
    kw = dict(width=512, height=768, crop_w=8, crop_h=16, target_width=1024, target_height=1536)
    (cond, opts) = node.run(clip=xl.clip, text_g="a green square", text_l="a red circle", **kw)[0]
    l_only, g_only = encode_prompt(xl.clip, "a red circle"), encode_prompt(xl.clip, "a green square")
    assert cond.shape == (1, 77, 64)
    assert torch.equal(cond[..., :32], l_only[0][0][..., :32]) and torch.equal(cond[..., 32:], g_only[0][0][..., 32:])
    assert torch.equal(opts["pooled_output"], g_only[0][1]["pooled_output"])
    assert {k: opts[k] for k in kw} == kw
    # a text_g of two chunks: text_l's side is padded with the empty prompt's chunk
    long = " ".join(["a green square"] * 30)
    (cond, _) = node.run(clip=xl.clip, text_g=long, text_l="a red circle", **kw)[0]
    empty = encode_prompt(xl.clip, "")[0][0]
    assert cond.shape == (1, 154, 64) and torch.equal(cond[:, 77:, :32], empty[..., :32])
    refined = CLIPTextEncodeSDXLRefiner().run(ascore=2.5, width=640, height=320, text="a red circle", clip=xl.clip)
    assert refined[0][1]["aesthetic_score"] == 2.5 and (refined[0][1]["width"], refined[0][1]["height"]) == (640, 320)


def test_sdxl_size_options_reach_the_model_and_sampling_runs(xl, tiny):
    node = CLIPTextEncodeSDXL()
    kw = dict(crop_w=0, crop_h=0, target_width=1024, target_height=1024, text_g="a red circle", text_l="a red circle")
    small = node.run(clip=xl.clip, width=256, height=256, **kw)
    big = node.run(clip=xl.clip, width=2048, height=2048, **kw)
    neg = node.run(clip=xl.clip, width=256, height=256, **{**kw, "text_g": "", "text_l": ""})
    shape = (1, 4, 8, 8)
    x = _x(shape)
    assert not torch.allclose(_once(_basic(xl.model, small), x=x), _once(_basic(xl.model, big), x=x))
    out = _euler(CFGGuider().run(model=xl.model, positive=small, negative=neg, cfg=5.0), shape, steps=3)
    assert torch.isfinite(out).all()
    with pytest.raises(NodeError) as e:
        node.run(clip=tiny[0].clip, width=64, height=64, **kw)  # one text encoder: not an SDXL CLIP
    assert e.value.input_name == "clip"


# -- inpainting models -----------------------------------------------------------------------------------


def _inpaint_model(base: ModelHandle) -> ModelHandle:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": 9}).eval()
    return ModelHandle(unet, SCHEDULER_CONFIG, "sd15", "test:inpaint9", preview_vae=base.preview_vae)


def test_inpaint_model_conditioning_feeds_nine_channel_unets(tiny):
    h, a, _, n = tiny
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    pos, neg, latent = InpaintModelConditioning().run(
        positive=a, negative=n, vae=h.vae, pixels=pixels, mask=mask, noise_mask=True
    )
    assert latent["samples"].shape == (1, 4, 8, 8) and latent["noise_mask"].shape == (1, 1, 64, 64)
    greyed = pixels.clone()
    greyed[:, 16:48, 16:48] = 0.5
    assert torch.allclose(pos[0][1]["concat_latent_image"], encode(h.vae, greyed), atol=1e-5)
    assert torch.equal(neg[0][1]["concat_mask"], pos[0][1]["concat_mask"])
    nine = _inpaint_model(h.model)
    shape = tuple(latent["samples"].shape)
    with_image = _once(cfg_guider(nine, pos, neg, 5.0), x=_x(shape))
    other = [[pos[0][0], {**pos[0][1], "concat_latent_image": torch.zeros(shape)}]]
    assert not torch.allclose(with_image, _once(cfg_guider(nine, other, neg, 5.0), x=_x(shape)))
    # without the inputs the UNet sees an all-ones mask and a blank image (ComfyUI's default), not an error
    assert torch.isfinite(_once(cfg_guider(nine, a, n, 5.0), x=_x(shape))).all()
    # a 4-channel model ignores them: the same prediction as without
    assert torch.equal(
        _once(cfg_guider(h.model, pos, neg, 5.0), x=_x(shape)), _once(cfg_guider(h.model, a, n, 5.0), x=_x(shape))
    )
    latent_off = InpaintModelConditioning().run(
        positive=a, negative=n, vae=h.vae, pixels=pixels, mask=mask, noise_mask=False
    )[2]
    assert "noise_mask" not in latent_off
