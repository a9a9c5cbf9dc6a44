"""txt2img through a Kiln graph vs diffusers' StableDiffusionPipeline on the same components.

An SD1.5-layout UNet (block_out_channels 64/128/256/256, 37.5M parameters, random weights) with a
768-wide CLIP text encoder and a small VAE is written as an LDM single-file checkpoint and loaded by
Kiln's CheckpointLoaderSimple; the diffusers pipeline is built from the same modules. Both run 256x256,
20 Euler steps, CFG 7, the same seed and the same sigmas, one after the other, several times.

Prints: seconds per image for each side and the ratio, the same with Kiln previews on, the largest
pixel difference between the two images, checkpoint load time (with Kiln metadata and without: the
architecture read from tensor shapes), the load alone in a fresh process (wall, CPU, peak RSS growth),
models loaded by a second prompt, and peak RSS.

    python benchmarks/sampling.py [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from kiln import (
    engine,  # noqa: E402
    nodes,  # noqa: E402
)
from kiln.nodes.sd.checkpoint import export_ldm_checkpoint, ldm_state_dict  # noqa: E402
from kiln.nodes.sd.manager import ModelManager  # noqa: E402
from kiln.nodes.sd.samplers import ModelSampling, calculate_sigmas  # noqa: E402
from kiln.nodes.sd.tokenizer import make_tokenizer  # noqa: E402

SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)
PROMPT, NEGATIVE = "a red circle on a blue background, high quality", "blurry"
SIZE, STEPS, CFG, SEED = 256, 20, 7.0, 1234


def build():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=32,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    ).eval()
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    return unet, vae, te, make_tokenizer()


def graph(ckpt: str) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": SEED,
                "steps": STEPS,
                "cfg": CFG,
                "sampler_name": "euler",
                "scheduler": "karras",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }


_FRESH_LOAD = """
import sys, time, torch
torch.set_num_threads(1)
from diffusers import AutoencoderKL, UNet2DConditionModel  # imports are not the loader's time
from transformers import CLIPTextModel
from kiln.nodes.sd.checkpoint import load_checkpoint
def hwm():  # this process's peak RSS in MiB (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = hwm()
t, c = time.perf_counter(), time.process_time()
load_checkpoint(sys.argv[1], torch.float32, torch.device("cpu"))
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(wall, cpu, hwm() - base)
"""


def fresh_load(path: Path, runs: int = 3) -> tuple[float, float, float]:
    """(best wall s, best CPU s, peak RSS growth MiB) of loading ``path`` in a new process, each time."""
    import subprocess

    res = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(path)], capture_output=True, text=True, check=True)
        res.append(tuple(float(x) for x in out.stdout.split()[-3:]))
    return min(r[0] for r in res), min(r[1] for r in res), max(r[2] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    unet, vae, te, tok = build()
    base = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    ckpt = export_ldm_checkpoint(
        base / "models" / "checkpoints" / "bench.safetensors",
        unet,
        vae,
        te,
        tok,
        scheduler_config=SCHED,
        model_family="bench",
    )
    print(
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params; {SIZE}x{SIZE}, {STEPS} euler steps, "
        f"cfg {CFG}, {args.threads} thread(s), {args.reps} reps"
    )

    manager = ModelManager(device="cpu", dtype=torch.float32)
    reg = engine.Registry()
    nodes.register_builtin(reg)
    ex = engine.Executor(reg, cache="none", folders=engine.Folders(base), services={"model_manager": manager})
    g = engine.Graph.from_json(graph("bench.safetensors"))

    t = time.perf_counter()
    first = ex.run(g, targets=["8"])
    first.raise_for_status()
    first_s = time.perf_counter() - t
    loads_first = manager.loads
    t = time.perf_counter()
    from kiln.nodes.sd.checkpoint import load_checkpoint

    load_checkpoint(ckpt, torch.float32, torch.device("cpu"))
    load_s = time.perf_counter() - t
    # the same weights with no Kiln metadata (as SD1.5 files ship): the architecture is read from the shapes
    plain = base / "models" / "checkpoints" / "bench_plain.safetensors"
    save_file(ldm_state_dict(unet, vae, te), str(plain))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    load_checkpoint(plain, torch.float32, torch.device("cpu"))
    load_plain_s = time.perf_counter() - t

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHED),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sigmas = calculate_sigmas(ModelSampling(SCHED), "karras", STEPS)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    # both start from noise * sqrt(1 + sigma_max^2): Kiln at the top of a schedule, diffusers for "leading" spacing

    def run_diffusers() -> torch.Tensor:
        with torch.inference_mode():
            out = pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                height=SIZE,
                width=SIZE,
                guidance_scale=CFG,
                sigmas=sigmas.tolist(),
                latents=noise.clone(),
                output_type="pt",
            )
        return out.images.permute(0, 2, 3, 1)

    def run_kiln(previews: bool) -> torch.Tensor:
        res = ex.run(g, targets=["8"], extra_data={"preview_method": "latent2rgb" if previews else "none"})
        res.raise_for_status()
        return res.values["8"][0]

    # This machine is shared: wall time swings by 50% between identical runs. CPU time of this process
    # (one thread) is what contention disturbs least, so it is the primary figure; wall time is shown too.
    names = ("diffusers", "kiln", "kiln+previews")
    fns = {"diffusers": run_diffusers, "kiln": lambda: run_kiln(False), "kiln+previews": lambda: run_kiln(True)}
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    images = {}
    loads_before = manager.loads
    run_kiln(True)  # warm-up (fits the preview projection once per VAE)
    run_diffusers()
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            images[name] = fns[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    bc, bw = {k: med(v) for k, v in cpu.items()}, {k: min(v) for k, v in wall.items()}
    diff = (images["kiln"] - images["diffusers"]).abs().max().item()
    diff8 = (
        ((images["kiln"] * 255).to(torch.uint8).int() - (images["diffusers"] * 255).to(torch.uint8).int()).abs().max()
    )
    print(f"{'':16}{'CPU s (median)':>15}{'wall s (best)':>15}   all CPU runs")
    for k in names:
        print(f"{k:16}{bc[k]:15.3f}{bw[k]:15.3f}   {'  '.join(f'{x:.2f}' for x in cpu[k])}")
    print(
        f"kiln / diffusers           : {bc['kiln'] / bc['diffusers']:.3f} CPU, {bw['kiln'] / bw['diffusers']:.3f} wall"
        f"   (target <= 1.02)"
    )
    print(
        f"previews overhead          : {100 * (bc['kiln+previews'] / bc['kiln'] - 1):+.1f}% CPU, "
        f"{100 * (bw['kiln+previews'] / bw['kiln'] - 1):+.1f}% wall   (target <= 2%)"
    )
    print(f"images max abs difference  : {diff:.2e} (0..1 scale), {int(diff8)} in 8-bit levels")
    print(
        f"checkpoint load            : {load_s:.2f} s   (first prompt incl. load: {first_s:.2f} s, "
        f"{loads_first} file load(s))"
    )
    print(
        f"checkpoint load, no metadata: {load_plain_s:.2f} s   (config read from tensor shapes; "
        f"peak RSS before it {rss_before:.0f} MiB)"
    )
    for label, path in (("kiln metadata", ckpt), ("no metadata", plain)):
        w, c, m = fresh_load(path)
        print(f"load in a fresh process, {label:13}: {w:.2f} s wall, {c:.2f} s CPU, peak RSS +{m:.0f} MiB")
    print(f"models loaded by later prompts: {manager.loads - loads_before}")
    print(f"peak RSS                   : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
