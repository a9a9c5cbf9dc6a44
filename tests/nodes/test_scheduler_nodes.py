"""Scheduler and sigma-tool nodes (nodes/schedulers.py): values against the published formulas and tables."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.engine import NodeError
from kiln.nodes import schedulers as S
from kiln.nodes.sd.samplers import ModelSampling, sched_beta, sched_karras

SD = ModelSampling({})  # SD1's scaled-linear table: sigma_min 0.0292, sigma_max 14.6146


class FakeModel:
    """What the scheduler nodes read from a MODEL: its sigma table and run-time patches."""

    def __init__(self, ms=SD):
        self.sampling = ms
        self.model_patches = ()


MODEL = FakeModel()


def karras(n, lo, hi, rho):
    return [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]


def close(a: torch.Tensor, b, tol=1e-5) -> bool:
    return (
        a.dtype == torch.float32 and a.ndim == 1 and torch.allclose(a, torch.tensor(b, dtype=torch.float32), rtol=tol)
    )


# -- parametric schedules -------------------------------------------------------------------------------


def test_karras_follows_the_formula():
    got = S.KarrasScheduler().run(steps=5, sigma_max=14.614642, sigma_min=0.0291675, rho=7.0)
    assert close(got, karras(5, 0.0291675, 14.614642, 7.0))


def test_karras_through_a_graph_then_split_and_flip(run_graph):
    g = {
        "1": {"class_type": "KarrasScheduler", "inputs": {"steps": 4, "sigma_max": 10.0, "sigma_min": 0.1, "rho": 7.0}},
        "2": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["1", 0], "step": 2}},
        "3": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["1", 0]}},
    }
    res = run_graph(g, targets=["2", "3"])
    assert res.ok, res.error
    full = karras(4, 0.1, 10.0, 7.0)
    high, low = res.values["2"]
    assert close(high, full[:3]) and close(low, full[2:])  # they share the split sigma
    flipped = res.values["3"][0]
    assert float(flipped[0]) == pytest.approx(0.0001) and close(flipped[1:], full[::-1][1:])


def test_exponential_has_even_log_spacing_and_polyexponential_rho_1_equals_it():
    ex = S.ExponentialScheduler().run(steps=6, sigma_max=14.614642, sigma_min=0.0291675)
    ratios = ex[1:-1] / ex[:-2]
    assert len(ex) == 7 and float(ex[-1]) == 0 and torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    assert float(ex[0]) == pytest.approx(14.614642, rel=1e-6) and float(ex[-2]) == pytest.approx(0.0291675, rel=1e-5)
    poly = S.PolyexponentialScheduler().run(steps=6, sigma_max=14.614642, sigma_min=0.0291675, rho=1.0)
    assert torch.allclose(poly, ex, rtol=1e-5)
    bent = S.PolyexponentialScheduler().run(steps=6, sigma_max=14.614642, sigma_min=0.0291675, rho=2.0)
    assert float(bent[0]) == pytest.approx(14.614642, rel=1e-5) and (bent[1:-2] < ex[1:-2]).all()  # falls faster


def test_vp_follows_the_sde():
    got = S.VPScheduler().run(steps=3, beta_d=19.9, beta_min=0.1, eps_s=0.001)
    want = [math.sqrt(math.expm1(19.9 * t * t / 2 + 0.1 * t)) for t in (1.0, 0.5005, 0.001)] + [0.0]
    assert close(got, want, tol=1e-4)


def test_laplace_is_clamped_centred_on_mu_and_has_no_final_zero():
    got = S.LaplaceScheduler().run(steps=5, sigma_max=14.614642, sigma_min=0.0291675, mu=0.5, beta=0.5)
    assert len(got) == 5  # as ComfyUI: no 0 appended
    assert float(got[0]) == pytest.approx(14.614642) and float(got[-1]) == pytest.approx(0.0291675)
    assert float(got[2]) == pytest.approx(math.exp(0.5), rel=1e-5)  # the median of log sigma is mu
    # a quantile a quarter from either end: log sigma = mu -/+ beta * log(0.5 + 1e-5)
    assert float(got[1]) == pytest.approx(math.exp(0.5 - 0.5 * math.log(0.5 + 1e-5)), rel=1e-5)


# -- model schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", S.BASIC_SCHEDULERS)
def test_basic_scheduler_gives_a_decreasing_schedule_to_zero(name):
    got = S.BasicScheduler().run(model=MODEL, scheduler=name, steps=8, denoise=1.0)
    assert got.dtype == torch.float32 and float(got[-1]) == 0 and (got[1:] < got[:-1]).all()
    assert float(got[0]) <= SD.sigma_max * 1.0001


def test_basic_scheduler_denoise_takes_the_tail_of_a_longer_schedule():
    got = S.BasicScheduler().run(model=MODEL, scheduler="karras", steps=10, denoise=0.5)
    assert torch.equal(got, sched_karras(SD, 20)[-11:])
    assert close(
        S.BasicScheduler().run(model=MODEL, scheduler="karras", steps=4, denoise=1.0),
        karras(4, SD.sigma_min, SD.sigma_max, 7.0),
    )
    assert len(S.BasicScheduler().run(model=MODEL, scheduler="normal", steps=10, denoise=0.0)) == 0  # ComfyUI's empty


def test_basic_scheduler_reads_the_patched_sigma_table():
    class Halve:
        def sampling(self, ms):
            return ModelSampling({"beta_end": 0.006})

    patched = FakeModel()
    patched.model_patches = (Halve(),)
    got = S.BasicScheduler().run(model=patched, scheduler="karras", steps=4, denoise=1.0)
    assert float(got[0]) < SD.sigma_max * 0.9


def test_beta_sampling_scheduler_is_the_beta_schedule():
    got = S.BetaSamplingScheduler().run(model=MODEL, steps=7, alpha=0.6, beta=0.6)
    assert torch.equal(got, sched_beta(SD, 7, alpha=0.6, beta=0.6).float())
    skewed = S.BetaSamplingScheduler().run(model=MODEL, steps=7, alpha=2.0, beta=0.5)
    assert not torch.equal(skewed, got)


def test_sd_turbo_uses_timesteps_999_899_and_skips_with_denoise():
    sig = SD.sigmas
    assert close(S.SDTurboScheduler().run(model=MODEL, steps=1, denoise=1.0), [float(sig[999]), 0.0])
    assert close(S.SDTurboScheduler().run(model=MODEL, steps=2, denoise=1.0), [float(sig[999]), float(sig[899]), 0.0])
    assert close(S.SDTurboScheduler().run(model=MODEL, steps=2, denoise=0.5), [float(sig[499]), float(sig[399]), 0.0])


def test_sampling_percent_to_sigma():
    node = S.SamplingPercentToSigma()
    assert node.run(model=MODEL, sampling_percent=0.0, return_actual_sigma=False) == 999999999.9
    assert node.run(model=MODEL, sampling_percent=0.0, return_actual_sigma=True) == pytest.approx(SD.sigma_max)
    assert node.run(model=MODEL, sampling_percent=1.0, return_actual_sigma=False) == 0.0
    assert node.run(model=MODEL, sampling_percent=1.0, return_actual_sigma=True) == pytest.approx(SD.sigma_min)
    # halfway: the sigma at timestep 999 * 0.5 (log-interpolated in the table)
    half = node.run(model=MODEL, sampling_percent=0.5, return_actual_sigma=False)
    lo, hi = math.log(float(SD.sigmas[499])), math.log(float(SD.sigmas[500]))
    assert half == pytest.approx(math.exp(lo + 0.5 * (hi - lo)), rel=1e-5)


# -- tables -----------------------------------------------------------------------------------------------

AYS_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
           0.6523686016, 0.3977456272, 0.1515232662, 0.0]  # fmt: skip


def test_align_your_steps_sd1_is_the_published_table():
    got = S.AlignYourStepsScheduler().run(model_type="SD1", steps=10, denoise=1.0)
    assert close(got, AYS_SD1)


def test_align_your_steps_stretches_log_linearly_and_denoise_keeps_the_tail():
    got = S.AlignYourStepsScheduler().run(model_type="SD1", steps=20, denoise=1.0)
    assert len(got) == 21 and float(got[-1]) == 0
    assert close(got[:-2:2], AYS_SD1[:-1])  # every other level is the 10-step table's
    mid = math.sqrt(AYS_SD1[0] * AYS_SD1[1])  # halfway in log sigma between the first two
    assert float(got[1]) == pytest.approx(mid, rel=1e-5)
    tail = S.AlignYourStepsScheduler().run(model_type="SD1", steps=10, denoise=0.4)
    assert close(tail, AYS_SD1[-5:])  # round(10 * 0.4) = 4 steps
    assert len(S.AlignYourStepsScheduler().run(model_type="SVD", steps=10, denoise=0.0)) == 0
    assert float(S.AlignYourStepsScheduler().run(model_type="SVD", steps=10, denoise=1.0)[0]) == 700.0


def test_gits_matches_the_published_table():
    got = S.GITSScheduler().run(coeff=1.2, steps=10, denoise=1.0)
    want = [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
            0.19894916, 0.09824532, 0.0]  # fmt: skip
    assert close(got, want, tol=1e-4)
    assert close(S.GITSScheduler().run(coeff=0.8, steps=2, denoise=1.0), [14.61464119, 7.49001646, 0.0], tol=1e-4)
    long = S.GITSScheduler().run(coeff=1.2, steps=25, denoise=1.0)
    assert len(long) == 26 and (long[1:] < long[:-1]).all() and float(long[0]) == pytest.approx(14.6146, rel=1e-4)
    assert close(S.GITSScheduler().run(coeff=1.2, steps=10, denoise=0.3), want[-4:], tol=1e-4)


# -- sigma tools -------------------------------------------------------------------------------------------


def test_split_sigmas_denoise():
    sig = sched_karras(SD, 10)
    high, low = S.SplitSigmasDenoise().run(sigmas=sig, denoise=0.3)
    assert torch.equal(low, sig[-4:]) and torch.equal(high, sig[:8])  # 3 low steps; both hold sig[7]
    high, low = S.SplitSigmasDenoise().run(sigmas=sig, denoise=1.0)
    assert torch.equal(low, sig) and torch.equal(high, sig[:1])
    high, low = S.SplitSigmasDenoise().run(sigmas=sig, denoise=0.0)
    assert torch.equal(high, sig) and torch.equal(low, sig[-1:])


def test_split_sigmas_past_the_end_and_of_empty():
    sig = sched_karras(SD, 3)
    high, low = S.SplitSigmas().run(sigmas=sig, step=10)
    assert torch.equal(high, sig) and len(low) == 0
    high, low = S.SplitSigmas().run(sigmas=torch.zeros(0), step=0)
    assert len(high) == 0 and len(low) == 0


def test_flip_sigmas_keeps_a_non_zero_start_and_empty():
    assert torch.equal(S.FlipSigmas().run(sigmas=torch.tensor([3.0, 2.0, 1.0])), torch.tensor([1.0, 2.0, 3.0]))
    assert len(S.FlipSigmas().run(sigmas=torch.zeros(0))) == 0


def test_set_first_sigma_does_not_touch_its_input():
    sig = torch.tensor([14.6, 5.0, 0.0])
    got = S.SetFirstSigma().run(sigmas=sig, sigma=136.0)
    assert got.tolist() == [136.0, 5.0, 0.0] and sig.tolist()[0] == pytest.approx(14.6)


def test_extend_intermediate_sigmas():
    sig = torch.tensor([14.0, 10.0, 5.0, 0.0])
    got = S.ExtendIntermediateSigmas().run(sigmas=sig, steps=2, start_at_sigma=-1.0, end_at_sigma=6.0, spacing="linear")
    assert got.tolist() == [14.0, 12.0, 10.0, 7.5, 5.0, 0.0]
    capped = S.ExtendIntermediateSigmas().run(
        sigmas=sig, steps=2, start_at_sigma=12.0, end_at_sigma=0.0, spacing="linear"
    )
    assert capped.tolist() == [14.0, 10.0, 7.5, 5.0, 2.5, 0.0]
    one = torch.tensor([8.0, 0.0])
    cos = S.ExtendIntermediateSigmas().run(sigmas=one, steps=3, start_at_sigma=-1.0, end_at_sigma=0.0, spacing="cosine")
    sin = S.ExtendIntermediateSigmas().run(sigmas=one, steps=3, start_at_sigma=-1.0, end_at_sigma=0.0, spacing="sine")
    assert close(cos, [8.0, 8 - 8 * math.sin(math.pi / 6), 8 - 8 * math.sin(math.pi / 3), 0.0])
    assert close(sin, [8.0, 8 - 8 * (1 - math.cos(math.pi / 6)), 8 - 8 * (1 - math.cos(math.pi / 3)), 0.0])


# -- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, input_name",
    [
        (lambda: S.SetFirstSigma().run(sigmas=torch.zeros(0), sigma=1.0), "sigmas"),
        (lambda: S.SplitSigmas().run(sigmas=[1.0, 0.0], step=0), "sigmas"),
        (lambda: S.FlipSigmas().run(sigmas=torch.zeros(2, 2)), "sigmas"),
        (lambda: S.KarrasScheduler().run(steps=0, sigma_max=14.6, sigma_min=0.03, rho=7.0), "steps"),
        (lambda: S.KarrasScheduler().run(steps=5, sigma_max=14.6, sigma_min=0.03, rho=0.0), "rho"),
        (lambda: S.ExponentialScheduler().run(steps=5, sigma_max=14.6, sigma_min=0.0), "sigma_min"),
        (lambda: S.BasicScheduler().run(model=MODEL, scheduler="karras", steps=0, denoise=1.0), "steps"),
        (lambda: S.BasicScheduler().run(model="not a model", scheduler="karras", steps=5, denoise=1.0), "model"),
        (lambda: S.GITSScheduler().run(coeff=1.23, steps=10, denoise=1.0), "coeff"),
        (lambda: S.BetaSamplingScheduler().run(model=MODEL, steps=5, alpha=0.0, beta=0.6), "alpha"),
    ],
)
def test_bad_input_names_the_input(call, input_name):
    with pytest.raises(NodeError) as err:
        call()
    assert err.value.input_name == input_name


def test_validation_rejects_zero_steps_before_running(run_graph):
    from kiln.engine.errors import ValidationFailed

    g = {
        "1": {"class_type": "KarrasScheduler", "inputs": {"steps": 0, "sigma_max": 14.6, "sigma_min": 0.03, "rho": 7.0}}
    }
    with pytest.raises(ValidationFailed, match="steps"):
        run_graph(g, targets=["1"])
