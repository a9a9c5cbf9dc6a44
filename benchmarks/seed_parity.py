"""Seed parity of Kiln's sampling pipeline against ComfyUI's own sampling code, sampler by scheduler.

What it compares
----------------
Both sides start from the same seed and use the same denoiser: the shipped model's UNet
(``models/checkpoints/kiln-shapes.safetensors``, loaded by Kiln's loaders) with a positive and a negative
prompt encoded by Kiln's CLIP. Everything that turns a seed into a latent is the side's own:

- **Kiln**: the ``KSampler`` node as a graph runs it (schedule, initial noise, ``noise_scaling``, the
  sampler, step noise, Brownian trees, Kiln's guider and UNet call).
- **ComfyUI**: ``comfy.samplers.KSampler`` computes the sigmas (with its own schedulers and its
  "discard the penultimate sigma" rule), ``comfy.sample.prepare_noise`` draws the initial noise,
  ``comfy.samplers.sampler_object(name).sample(...)`` runs ComfyUI's sampler function from
  ``comfy.k_diffusion.sampling`` / ``comfy.extra_samplers.uni_pc`` (ComfyUI's noise samplers and
  torchsde trees included). The model it calls stands in for ComfyUI's ``CFGGuider`` + ``BaseModel``: for
  each conditioning, ``model_sampling.calculate_input``, ``model_sampling.timestep`` and
  ``calculate_denoised`` of ComfyUI's own ``ModelSamplingDiscrete`` (with the checkpoint's
  parametrisation, here V_PREDICTION) around the same UNet, then ComfyUI's ``cfg_function``.

So the comparison isolates everything except the UNet/conditioning path (the same denoiser on both
sides): the sigma tables and schedules, noise, samplers and the CFG combination, which is what Kiln
rewrote for seed parity. It cannot tell whether ComfyUI's own model loading, text encoding, conditioning
batching or UNet implementation would give the same predictions as Kiln's; those need a real ComfyUI
run on a real checkpoint.

ComfyUI's files are not part of Kiln (GPL-3.0): point ``--comfy-src`` at a folder that holds ComfyUI's
``comfy`` package (a checkout). Only ``comfy.k_diffusion``, ``comfy.extra_samplers.uni_pc``,
``comfy.samplers``, ``comfy.sample`` and ``comfy.model_sampling`` are imported from it; ComfyUI's runtime
modules that these import (model management, model patcher, hooks, wrappers, LDM utilities) are replaced
by light stubs written here (:func:`install_comfy_stubs`), which is enough for the code paths used.

The latents are compared in the model's (scaled) space, and both are decoded by Kiln's VAE to 8-bit
images. PSNR is ``10 log10(peak^2 / MSE)``: peak 255 for images, the peak-to-peak range of ComfyUI's
latent for latents. ``inf``: identical.

It also checks KSampler's sigmas for every sampler and scheduler at 1-30 steps and three denoise values
(no model call), and the custom-sampling noise nodes: RandomNoise through SamplerCustomAdvanced, and AddNoise
(RandomNoise) then DisableNoise on the second half of a schedule, against ComfyUI's equivalents.

    python benchmarks/seed_parity.py --comfy-src /path/to/ComfyUI [--steps 10] [--size 64] [--seed 1]
        [--grid full|cross] [--samplers euler,dpmpp_2m] [--schedulers karras] [--json out.json]

``--grid cross`` runs every sampler with karras and every scheduler with a few samplers (the schedules
themselves are compared exhaustively by the sigma check): the whole grid is 42 x 9 UNet-driven pairs.
Exit status 1 when a pair is below ``--threshold`` dB or a schedule differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln.nodes.conditioning import encode_prompt  # noqa: E402
from kiln.nodes.custom_sampling import (  # noqa: E402
    AddNoise,
    DisableNoise,
    KSamplerSelect,
    RandomNoise,
    SamplerCustomAdvanced,
)
from kiln.nodes.guiders import CFGGuider  # noqa: E402
from kiln.nodes.latent import decode  # noqa: E402
from kiln.nodes.loaders import load_checkpoint_handles  # noqa: E402
from kiln.nodes.sampling import KSampler  # noqa: E402
from kiln.nodes.sd.samplers import SAMPLER_NAMES, SCHEDULER_NAMES, sigmas_for  # noqa: E402

CKPT = ROOT / "models" / "checkpoints" / "kiln-shapes.safetensors"
POSITIVE = "a large red circle at the top left on a blue background"
NEGATIVE = "a small green square"
# --grid cross: every sampler with this scheduler, and every scheduler with these samplers
CROSS_SCHEDULER = "karras"
CROSS_SAMPLERS = ("euler", "dpm_2", "dpmpp_2m_sde", "uni_pc")

# ComfyUI's names for a diffusers beta_schedule (ComfyUI's "linear" is LDM's, the square-root spaced one)
_BETA_NAMES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}


# -- stubs for ComfyUI's runtime modules --------------------------------------------------------------------


def _beta_schedule(schedule: str, n: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s=8e-3):
    """DDPM betas by LDM's schedule names (float64), for ComfyUI's ModelSamplingDiscrete."""
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"the stub knows no beta schedule {schedule!r}")


def _post_cfg(model_options: dict, fn: Any, disable_cfg1_optimization: bool = False) -> dict:
    out = dict(model_options)
    out["sampler_post_cfg_function"] = list(out.get("sampler_post_cfg_function", [])) + [fn]
    if disable_cfg1_optimization:
        out["disable_cfg1_optimization"] = True
    return out


def _options_clone(model_options: dict) -> dict:
    out = dict(model_options)
    if "transformer_options" in out:
        out["transformer_options"] = dict(out["transformer_options"])
    return out


def install_comfy_stubs() -> None:
    """Light stand-ins for the ComfyUI modules the sampling code imports but the paths used here never need
    (or need one helper of). Installed in ``sys.modules`` before ComfyUI's files are imported."""

    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("comfy.model_management", intermediate_device=lambda: torch.device("cpu"))
    module(
        "comfy.model_patcher",
        set_model_options_post_cfg_function=_post_cfg,
        create_model_options_clone=_options_clone,
    )
    for name in ("sampler_helpers", "patcher_extension", "hooks", "context_windows", "utils", "nested_tensor"):
        module("comfy." + name)
    module("comfy.ldm")
    module("comfy.ldm.modules")
    module("comfy.ldm.modules.diffusionmodules")
    module("comfy.ldm.modules.diffusionmodules.util", make_beta_schedule=_beta_schedule)


def load_comfy(src: Path) -> types.SimpleNamespace:
    if not (src / "comfy" / "samplers.py").is_file():
        raise SystemExit(f"{src} holds no comfy/samplers.py; pass the folder of a ComfyUI checkout")
    sys.path.insert(0, str(src))
    install_comfy_stubs()
    import comfy

    for name, mod in list(sys.modules.items()):  # a stub is reached as an attribute of its package too
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and name.startswith("comfy."):
            setattr(sys.modules[parent], child, mod)
    assert comfy.model_patcher is sys.modules["comfy.model_patcher"]
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling as model_sampling
    import comfy.sample as sample
    import comfy.samplers as samplers

    return types.SimpleNamespace(k=k_sampling, ms=model_sampling, sample=sample, samplers=samplers)


# -- ComfyUI's side --------------------------------------------------------------------------------------------


def comfy_model_sampling(comfy: Any, config: dict) -> Any:
    """ComfyUI's ModelSamplingDiscrete with the checkpoint's parametrisation, from its scheduler config."""
    kinds = {"epsilon": comfy.ms.EPS, "v_prediction": comfy.ms.V_PREDICTION}
    pred = config.get("prediction_type", "epsilon")
    if pred not in kinds:
        raise SystemExit(f"prediction type {pred!r} is not compared here")

    class Sampling(comfy.ms.ModelSamplingDiscrete, kinds[pred]):
        pass

    settings = {
        "beta_schedule": _BETA_NAMES[config.get("beta_schedule", "scaled_linear")],
        "linear_start": float(config.get("beta_start", 0.00085)),
        "linear_end": float(config.get("beta_end", 0.012)),
        "timesteps": int(config.get("num_train_timesteps", 1000)),
        "zsnr": bool(config.get("rescale_betas_zero_snr", False)),
    }
    return Sampling(types.SimpleNamespace(sampling_settings=settings))


class ComfyGuide:
    """What ComfyUI's samplers call as the model (the CFGGuider), with a BaseModel stand-in inside it.

    ``inner_model.model_sampling`` and ``model_patcher.get_model_object("model_sampling")`` are ComfyUI's
    ModelSamplingDiscrete; a call evaluates the UNet on the positive and the negative embedding in one
    batch (as ComfyUI's calc_cond_batch does when both fit) and combines them with ComfyUI's cfg_function.
    """

    def __init__(self, comfy: Any, ms: Any, unet: torch.nn.Module, pos: torch.Tensor, neg: torch.Tensor, cfg: float):
        self.comfy, self.unet, self.cfg = comfy, unet, float(cfg)
        self.pos, self.neg = pos, neg
        self.inner_model = types.SimpleNamespace(model_sampling=ms)
        self.model_patcher = types.SimpleNamespace(
            get_model_object=lambda name: ms if name == "model_sampling" else None
        )
        self.model_options: dict = {}

    def _x0(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        ms = self.inner_model.model_sampling
        xc = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma).float()
        out = self.unet(xc, t, encoder_hidden_states=emb, return_dict=False)[0].float()
        return ms.calculate_denoised(sigma, out, x)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict | None = None, seed=None):
        model_options = model_options or {}
        b = x.shape[0]
        skip = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        if skip:
            cond, uncond = self._x0(x, sigma, self.pos.expand(b, -1, -1)), None
        else:
            n = max(self.pos.shape[1], self.neg.shape[1])
            assert self.pos.shape[1] == n and self.neg.shape[1] == n, "prompts of different lengths"
            emb = torch.cat([self.pos.expand(b, -1, -1), self.neg.expand(b, -1, -1)])
            both = self._x0(torch.cat([x, x]), torch.cat([sigma, sigma]), emb)
            cond, uncond = both[:b], both[b:]
        return self.comfy.samplers.cfg_function(
            self.inner_model, cond, uncond, self.cfg, x, sigma, model_options=model_options
        )


def comfy_sample(
    comfy: Any,
    guide: ComfyGuide,
    sampler_name: str,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    latent: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """ComfyUI's CFGGuider.inner_sample in model space: the sampler object run over ``sigmas``."""
    options = {"transformer_options": {"sample_sigmas": sigmas}}
    extra_args = {"model_options": options, "seed": seed}
    sampler = comfy.samplers.sampler_object(sampler_name)
    with torch.inference_mode():
        out = sampler.sample(guide, sigmas, extra_args, None, noise, latent, None, True)
    return out.float()


# -- comparison ---------------------------------------------------------------------------------------------------


def psnr(ours: torch.Tensor, ref: torch.Tensor, peak: float | None = None) -> float:
    a, b = ours.double(), ref.double()
    mse = float(((a - b) ** 2).mean())
    if not math.isfinite(mse):
        return float("nan")
    if mse == 0:
        return float("inf")
    if peak is None:
        peak = float(b.max() - b.min()) or 1.0
    return 10 * math.log10(peak * peak / mse)


def to_8bit(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        img = decode(vae, latent)
    return (img.clamp(0, 1) * 255).round()


class Bench:
    def __init__(self, comfy: Any, steps: int, seed: int, cfg: float, size: int):
        self.comfy, self.steps, self.seed, self.cfg = comfy, steps, seed, cfg
        torch.manual_seed(0)
        h = load_checkpoint_handles(CKPT, CKPT.name)
        self.model, self.clip, self.vae = h.model, h.clip, h.vae
        self.positive = encode_prompt(self.clip, POSITIVE)
        self.negative = encode_prompt(self.clip, NEGATIVE)
        ch = self.model.unet.config.in_channels
        f = self.vae.downscale if hasattr(self.vae, "downscale") else 8
        self.latent = {"samples": torch.zeros(1, ch, size // f, size // f)}
        self.ms = comfy_model_sampling(comfy, dict(self.model.sampling.config))
        self.ms_kiln = self.model.sampling

    @contextlib.contextmanager
    def guide(self, cfg: float | None = None):
        with self.model.patched() as unet:
            pos = self.positive[0][0].to(self.model.device, self.model.dtype)
            neg = self.negative[0][0].to(self.model.device, self.model.dtype)
            yield ComfyGuide(self.comfy, self.ms, unet, pos, neg, self.cfg if cfg is None else cfg)

    def kiln_ksampler(self, sampler: str, scheduler: str) -> torch.Tensor:
        out = KSampler().run(
            model=self.model,
            seed=self.seed,
            steps=self.steps,
            cfg=self.cfg,
            sampler_name=sampler,
            scheduler=scheduler,
            positive=self.positive,
            negative=self.negative,
            latent_image=self.latent,
            denoise=1.0,
        )
        return out["samples"].float()

    def comfy_ksampler(self, sampler: str, scheduler: str) -> torch.Tensor:
        c = self.comfy
        model = types.SimpleNamespace(get_model_object=lambda name: self.ms)
        ks = c.samplers.KSampler(
            model, steps=self.steps, device="cpu", sampler=sampler, scheduler=scheduler, denoise=1.0
        )
        x = self.latent["samples"]
        noise = c.sample.prepare_noise(x, self.seed, None)
        with self.guide() as g:
            return comfy_sample(c, g, sampler, ks.sigmas, noise, x, self.seed)

    def compare(self, ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        return psnr(to_8bit(self.vae, ours), to_8bit(self.vae, ref), 255.0), psnr(ours, ref)

    # -- the custom-sampling noise nodes ---------------------------------------------------------------------

    def noise_paths(self, sampler: str, scheduler: str) -> dict[str, tuple[float, float]]:
        """RandomNoise through SamplerCustomAdvanced, and AddNoise + DisableNoise on a half-denoised schedule,
        each against ComfyUI's equivalent (its sigmas, prepare_noise, noise_scaling and sampler)."""
        c = self.comfy
        results = {}
        full = c.samplers.calculate_sigmas(self.ms, scheduler, self.steps).float()
        # RandomNoise + CFGGuider + KSamplerSelect + SamplerCustomAdvanced
        (guider,) = _tuple(
            CFGGuider().run(model=self.model, positive=self.positive, negative=self.negative, cfg=self.cfg)
        )
        (smp,) = _tuple(KSamplerSelect().run(sampler_name=sampler))
        (rn,) = _tuple(RandomNoise().run(noise_seed=self.seed))
        ours = _tuple(
            SamplerCustomAdvanced().run(noise=rn, guider=guider, sampler=smp, sigmas=full, latent_image=self.latent)
        )[0]["samples"]
        x = self.latent["samples"]
        with self.guide() as g:
            ref = comfy_sample(c, g, sampler, full, c.sample.prepare_noise(x, self.seed, None), x, self.seed)
        results["RandomNoise"] = self.compare(ours.float(), ref)
        # a start latent with content: ComfyUI's KSampler result at another seed (from the comparison above)
        start = {"samples": ref.clone()}
        tail = full[len(full) // 2 :]
        (noisy,) = _tuple(AddNoise().run(model=self.model, noise=rn, sigmas=tail, latent_image=start))
        (dn,) = _tuple(DisableNoise().run())
        ours = _tuple(
            SamplerCustomAdvanced().run(noise=dn, guider=guider, sampler=smp, sigmas=tail, latent_image=noisy)
        )[0]["samples"]
        drawn = c.sample.prepare_noise(start["samples"], self.seed, None)
        scale = torch.abs(tail[0] - tail[-1])
        ref_noisy = self.ms.noise_scaling(scale, drawn, start["samples"])
        with self.guide() as g:
            ref = comfy_sample(c, g, sampler, tail, torch.zeros_like(ref_noisy), ref_noisy, 0)
        results["AddNoise+DisableNoise"] = self.compare(ours.float(), ref)
        results["AddNoise latent"] = (float("nan"), psnr(noisy["samples"].float(), ref_noisy.float()))
        return results


def _tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _fmt(v: float) -> str:
    return "  inf" if v == float("inf") else f"{v:5.1f}"


def schedule_check(comfy: Any, ms_kiln: Any, ms_comfy: Any, samplers: list[str], schedulers: list[str]) -> int:
    """KSampler's sigmas on both sides (no model call): every sampler, scheduler, step count 1-30 and a few
    denoise values. Returns the number of mismatches (printed)."""
    bad = nan_refs = 0
    model = types.SimpleNamespace(get_model_object=lambda name: ms_comfy)
    for sampler in samplers:
        for scheduler in schedulers:
            for steps in range(1, 31):
                for denoise in (1.0, 0.75, 0.3):
                    ref = comfy.samplers.KSampler(model, steps, "cpu", sampler, scheduler, denoise).sigmas.float()
                    ours = sigmas_for(ms_kiln, scheduler, steps, denoise, sampler)
                    if torch.isnan(ref).any():  # ComfyUI's kl_optimal at one step; Kiln steps from the top
                        nan_refs += 1
                        continue
                    same = ours.shape == ref.shape and torch.allclose(ours, ref, rtol=1e-6, atol=0)
                    if not same:
                        bad += 1
                        if bad <= 10:
                            print(
                                f"  sigmas differ: {sampler}/{scheduler} steps {steps} denoise {denoise}: "
                                f"{ours.tolist()[:6]} vs {ref.tolist()[:6]}"
                            )
    if nan_refs:
        print(f"  {nan_refs} schedules where ComfyUI's sigmas hold NaN (kl_optimal, 1 step) were not compared")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy-src", type=Path, required=True, help="folder holding ComfyUI's comfy package")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--samplers", default="", help="comma-separated (default: KSampler's whole list)")
    ap.add_argument("--schedulers", default="", help="comma-separated (default: every scheduler)")
    ap.add_argument(
        "--grid",
        choices=["full", "cross"],
        default="full",
        help="full: every pair; cross: every sampler with karras and every scheduler with a few samplers",
    )
    ap.add_argument("--threshold", type=float, default=40.0, help="dB below which a pair is flagged")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    comfy = load_comfy(args.comfy_src.resolve())
    samplers = args.samplers.split(",") if args.samplers else list(SAMPLER_NAMES)
    schedulers = args.schedulers.split(",") if args.schedulers else list(SCHEDULER_NAMES)
    bench = Bench(comfy, args.steps, args.seed, args.cfg, args.size)
    bad = schedule_check(comfy, bench.ms_kiln, bench.ms, samplers, schedulers)
    print(
        f"KSampler sigmas, {len(samplers)} samplers x {len(schedulers)} schedulers x 30 step counts x 3 denoise: "
        f"{bad} differ (relative tolerance 1e-6)"
    )
    sys.stdout.flush()
    print(f"kiln-shapes UNet, {args.steps} steps, cfg {args.cfg}, seed {args.seed}, {args.size}px")
    print("PSNR dB (decoded 8-bit image / latent)")
    print(f"{'sampler':28s}" + "".join(f"{s[:13]:>14s}" for s in schedulers))
    table: dict[str, dict[str, tuple[float, float]]] = {}
    t0 = time.time()
    for sampler in samplers:
        row = {}
        for scheduler in schedulers:
            if args.grid == "cross" and scheduler != CROSS_SCHEDULER and sampler not in CROSS_SAMPLERS:
                continue
            try:
                ours = bench.kiln_ksampler(sampler, scheduler)
                ref = bench.comfy_ksampler(sampler, scheduler)
                row[scheduler] = bench.compare(ours, ref)
            except Exception as exc:  # a failure on one side is a result of the comparison too
                print(f"  {sampler}/{scheduler}: {type(exc).__name__}: {str(exc)[:200]}")
                row[scheduler] = (float("nan"), float("nan"))
        table[sampler] = row
        cells = [row.get(k) for k in schedulers]
        print(
            f"{sampler:28s}" + "".join("      -      " if c is None else f"  {_fmt(c[0])}/{_fmt(c[1])}" for c in cells)
        )
        sys.stdout.flush()
    pairs = [(v[0], v[1], s, k) for s, row in table.items() for k, v in row.items()]
    worst = min(pairs, key=lambda p: (-1e9 if math.isnan(p[0]) else p[0], p[1]))
    below = [p for p in pairs if not p[0] >= args.threshold]
    print(f"\n{len(pairs)} pairs in {time.time() - t0:.0f}s; worst: {worst[2]}/{worst[3]} {worst[0]:.1f} dB image, ")
    print(f"{worst[1]:.1f} dB latent; below {args.threshold:g} dB (image): {len(below)}")
    for p in sorted(below, key=lambda p: p[0] if not math.isnan(p[0]) else -1e9):
        print(f"  {p[2]}/{p[3]}: {p[0]:.1f} dB image, {p[1]:.1f} dB latent")

    noise_rows = {}
    print("\nnoise nodes (SamplerCustomAdvanced), PSNR dB image/latent:")
    for sampler, scheduler in (("euler_ancestral", "karras"), ("dpmpp_2m_sde", "karras"), ("euler", "normal")):
        if sampler not in samplers:
            continue
        r = bench.noise_paths(sampler, scheduler)
        noise_rows[f"{sampler}/{scheduler}"] = r
        print(f"  {sampler}/{scheduler}: " + ", ".join(f"{k} {_fmt(a)}/{_fmt(b)}" for k, (a, b) in r.items()))
    if args.json:
        doc = {
            "steps": args.steps,
            "seed": args.seed,
            "cfg": args.cfg,
            "size": args.size,
            "table": {s: {k: list(v) for k, v in row.items()} for s, row in table.items()},
            "noise_nodes": {k: {n: list(v) for n, v in r.items()} for k, r in noise_rows.items()},
        }
        args.json.write_text(json.dumps(doc, indent=1, default=float))
    return 0 if not below and not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
