"""The validation figures the training stages were chosen on, for one UNet checkpoint folder of a run.

    python -m kiln.training.validate --phase unet-v12                 # runs/shapes, all four parts (~6 min)
    python -m kiln.training.validate --phase unet-v8 --parts probes   # only the short prompts
    python -m kiln.training.validate --phase unet-v12 --unguided 8    # another split for the varied graph

Four parts, all at the shipped graphs' 20 Euler steps:

- ``probes``: eight short prompts a newcomer types ("a red circle", "a blue square", ...), 32 seeds each at
  CFG 3: how often the shape and the object count are right;
- ``partial``: 50 partial prompts x 8 seeds (drawn like the benchmark's held-out ones, from training-stream
  seeds from ``captions.VALIDATION_START``), with ``txt2img.json``'s CFG 3 and with ``txt2img_varied.json``'s
  split (its unguided steps, then its CFG; ``--unguided`` and ``--varied-cfg`` try others): the partial table
  and the diversity line, as ``benchmarks/fidelity.py`` prints them;
- ``full``: 100 full prompts from the same seeds, CFG 3: the full-prompt row;
- ``two``: the two-object prompts among the first 600 of that set (112 of them), 8 seeds each at CFG 3: how
  often both objects' shapes, the count and everything stated are right (the binding of words to objects,
  the weakest point of the shipped model).

``benchmarks/fidelity.py`` measures the shipped file on held-out prompts that no choice was made on; this
is the set the choices were made on (training/README.md's validation tables).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kiln.training import captions as cp, evaluate as ev, sample, scenes as sc

PROBES = [
    "a red circle",
    "a circle",
    "a square",
    "a small red circle",
    "a large red circle",
    "a red circle on black",
    "a blue square",
    "a small yellow square",
]
PARTS = ("probes", "partial", "full", "two")
TWO_FROM = 600
VARIED_GRAPH = Path(__file__).resolve().parents[1] / "graphs" / "txt2img_varied.json"


def probes(pipe: sample.Pipeline, seeds: int, steps: int) -> list[str]:
    """One line per short prompt: shape and count right over ``seeds`` seeds, then the means."""
    lines, shape, count = [], 0, 0
    for text in PROBES:
        prompt = cp.parse(text)
        reads = [ev.check_prompt(im, prompt) for im in pipe.generate([text] * seeds, seed=0, steps=steps, cfg=3.0)]
        s, c = sum(bool(r["shape"]) for r in reads), sum(bool(r["count"]) for r in reads)
        shape, count = shape + s, count + c
        lines.append(f"{text!r:<26} shape {s}/{seeds}, count {c}/{seeds}")
    n = seeds * len(PROBES)
    lines.append(f"{'short prompts':<26} shape {shape / n * 100:.0f}%, count {count / n * 100:.0f}%")
    return lines


def validation_prompts(n: int) -> tuple[list[cp.Prompt], list[str]]:
    """The first ``n`` validation prompts and their wordings (drawn as the benchmark's, from other seeds)."""
    prompts = cp.eval_prompts(n, stream=sc.TRAIN_STREAM, start=cp.VALIDATION_START)
    return prompts, cp.eval_wordings(prompts, stream=sc.TRAIN_STREAM, start=cp.VALIDATION_START)


def partial(pipe: sample.Pipeline, n: int, seeds: int, steps: int, splits: list[tuple[str, int, float]]) -> list[str]:
    """The partial table and diversity lines for each (label, unguided steps, CFG)."""
    prompts, words = validation_prompts(n)
    lines = [ev.partial_header()]
    for label, unguided, cfg in splits:
        imgs = pipe.generate(
            [w for w in words for _ in range(seeds)], seed=0, steps=steps, cfg=cfg, unguided_steps=unguided
        )
        groups = [imgs[i * seeds : (i + 1) * seeds] for i in range(n)]
        lines += ev.partial_report(groups, prompts, label)[2]
    return lines


def full(pipe: sample.Pipeline, n: int, steps: int) -> list[str]:
    scenes = [sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, cp.VALIDATION_START + i), 1) for i in range(n)]
    imgs = pipe.generate([sc.caption(s) for s in scenes], seed=0, steps=steps, cfg=3.0)
    return [ev.header(), ev.format_row("full prompts, CFG 3", ev.accuracy(imgs, scenes))]


def two_objects(pipe: sample.Pipeline, seeds: int, steps: int, among: int = TWO_FROM) -> list[str]:
    """The partial row for the two-object prompts among the first ``among`` validation prompts."""
    pairs = [(p, w) for p, w in zip(*validation_prompts(among)) if p.count == 2]
    imgs = pipe.generate([w for _, w in pairs for _ in range(seeds)], seed=0, steps=steps, cfg=3.0)
    acc = ev.partial_accuracy(imgs, [p for p, _ in pairs for _ in range(seeds)])
    return [ev.partial_header(), ev.format_partial_row(f"{len(pairs)} two-object x {seeds}", acc)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/shapes"))
    p.add_argument("--phase", required=True, help="the UNet checkpoint folder: unet-v2 to unet-v12, ...")
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--probe-seeds", type=int, default=32)
    p.add_argument("--partial-n", type=int, default=50)
    p.add_argument("--seeds", type=int, default=ev.DIVERSITY_SEEDS, help="seeds per partial prompt")
    p.add_argument("--full-n", type=int, default=100)
    p.add_argument("--two-among", type=int, default=TWO_FROM, help="two-object prompts among this many")
    p.add_argument("--unguided", type=int, default=None, help="default: txt2img_varied.json's")
    p.add_argument("--varied-cfg", type=float, default=None, help="default: txt2img_varied.json's")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        p.error(f"--parts: unknown {sorted(parts - set(PARTS))}; use {', '.join(PARTS)}")
    if not (args.run / args.phase / "latest.pt").exists():
        p.error(f"{args.run / args.phase / 'latest.pt'} not found: --phase names a UNet checkpoint folder of --run")
    unguided, varied_cfg = sample.guidance_split(json.loads(VARIED_GRAPH.read_text()))
    unguided = unguided if args.unguided is None else args.unguided
    varied_cfg = varied_cfg if args.varied_cfg is None else args.varied_cfg
    torch.set_num_threads(args.threads)
    pipe = sample.Pipeline.from_run(args.run, phase=args.phase)
    print(f"{args.run / args.phase}: validation set (training-stream seeds from {cp.VALIDATION_START:,})")
    if "probes" in parts:
        print("\n".join(probes(pipe, args.probe_seeds, args.steps)), flush=True)
    if "partial" in parts:
        splits = [
            ("txt2img.json (CFG 3)", 0, 3.0),
            (f"varied ({unguided} unguided, CFG {varied_cfg:g})", unguided, varied_cfg),
        ]
        print("\n".join(partial(pipe, args.partial_n, args.seeds, args.steps, splits)), flush=True)
    if "full" in parts:
        print("\n".join(full(pipe, args.full_n, args.steps)), flush=True)
    if "two" in parts:
        print("\n".join(two_objects(pipe, args.seeds, args.steps, args.two_among)), flush=True)


if __name__ == "__main__":
    main()
