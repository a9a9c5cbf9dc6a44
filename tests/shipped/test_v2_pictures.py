"""The shipped model (v2) on what a newcomer types: short prompts draw what they state, vary what they leave
open, and the outpaint graph extends a scene. Sampled through Kiln's nodes, read back by the pixel checker.

The bars sit below what ``benchmarks/fidelity.py`` measures on 100 prompts (its table is in the README) and
far above what the v1 weights gave on the same prompts (brown backgrounds and a second object for "a red
circle"), so a regression to drawing a full caption's defaults, or to ignoring the prompt, fails here.
"""

from __future__ import annotations

import json

import numpy as np
from shipped_harness import CKPT, REPO, Job

from kiln import engine
from kiln.training import captions as cp, evaluate as ev, sample, scenes as sc

# What a newcomer types: one to three attributes stated, the rest left open.
SHORT = [
    "a red circle",
    "a blue square on black",
    "a small triangle at the top",
    "a large yellow circle at the left",
    "green square on a gray",
    "a purple triangle in the center",
]
SEEDS = 4


def test_short_prompts_draw_what_they_state(shapes):
    prompts = [cp.parse(t) for t in SHORT]
    outs = shapes.images([Job(t, seed=11, batch=SEEDS, cfg=3.0) for t in SHORT])
    images = [im for ims in outs for im in ims]
    acc = ev.partial_accuracy(images, [p for p in prompts for _ in range(SEEDS)])
    # exactly one object where one is named (v1 drew a second object for "a red circle" in 3 of 6 seeds)
    # measured here: count 92%, colour 90%, shape 92%, size 100%, position 100%, background 100%, all 92%
    # (the v7 file: shape 88%, all 88%; v5: count 96%, shape 83%, all 83%; before v5: count 88%, shape 75%)
    assert acc["count"] >= 0.75, acc
    bars = {"color": 0.8, "shape": 0.6, "size": 0.7, "position": 0.7, "background": 0.8}
    assert all(acc[c] >= bar for c, bar in bars.items()), acc
    assert acc["all"] >= 0.5, acc


def test_what_a_prompt_leaves_open_varies_across_seeds(shapes):
    """ "a red circle" over 8 seeds: the circle stays red, its place and the background change."""
    p = cp.parse("a red circle")
    (images,) = shapes.images([Job("a red circle", seed=3, batch=8, cfg=3.0)])
    seen = ev.open_values(images, p)
    assert len(seen["0.position"]) >= 3 and len(seen["background"]) >= 2, seen
    reads = [ev.check_prompt(im, p) for im in images]
    assert sum(bool(r["color"]) for r in reads) >= 6, reads
    # ...while a full caption pins all of it down: the same place and background on every seed
    full = "a large red circle at the top left on a black background"
    (pinned,) = shapes.images([Job(full, seed=3, batch=8, cfg=3.0)])
    q = cp.parse(full)
    assert sum(bool(ev.check_prompt(im, q)["all"]) for im in pinned) >= 6


def _run_graph(shapes, name: str, **inputs) -> np.ndarray:
    g = json.loads((REPO / "graphs" / name).read_text())
    for key, value in inputs.items():
        node, field = key.split(".")
        g[node]["inputs"][field] = value
    dec = next(k for k, v in g.items() if v["class_type"] == "VAEDecode")
    res = shapes.ex.run(engine.Graph.from_json(g), targets=[dec])
    assert res.status == "success", res.error
    return (res.values[dec][0][0].numpy() * 255).round().clip(0, 255).astype(np.uint8)


def test_outpaint_graph_extends_the_scene(shapes):
    """graphs/outpaint.json widens a 48 px picture of a red circle on gray to 64 px: the circle is kept as
    it was, and the new strip continues the gray background with nothing drawn in it."""
    from PIL import Image

    src = np.asarray(Image.open(REPO / "input" / "outpaint_source.png").convert("RGB"))
    assert src.shape == (64, 48, 3)
    shapes.save_input("outpaint_source.png", src)
    for seed in (12, 13, 14):
        out = _run_graph(shapes, "outpaint.json", **{"3.seed": seed})
        assert out.shape == (64, 64, 3)
        # the kept part (left of the 8 px feathered seam) is the source up to the VAE's round trip
        kept = np.abs(out[:, :40].astype(int) - src[:, :40]).mean()
        assert kept < 8, kept
        r = ev.analyse(out)
        assert (r.color, r.shape, r.size, r.position, r.background) == ("red", "circle", "large", "left", "gray"), r
        bg_rgb, fg = ev._foreground(out)
        assert fg[:, 48:].mean() < 0.02, fg[:, 48:].mean()  # the new strip holds no object...
        new = out[:, 48:].reshape(-1, 3).astype(float).mean(0)
        assert np.abs(new - sc.BACKGROUNDS["gray"]).max() < 20, new  # ...only the scene's background


# short prompts that leave the colour open: what guidance at every step draws in the fewest colours
COLOUR_OPEN = ["a circle", "a square on black", "a small triangle", "a large circle at the top", "a square on white"]


def test_varied_graph_varies_what_a_prompt_leaves_open(shapes):
    """graphs/txt2img_varied.json samples its first steps unguided (two KSamplerAdvanced): over 8 seeds
    the attributes a short prompt leaves open take at least as many values as with txt2img.json's single
    KSampler at CFG 3, and what the prompt states is drawn about as often. (The shipped model varies four of
    these five prompts fully under both graphs; over benchmarks/fidelity.py's 100 prompts the split varies every
    open attribute in 81% of them, the single sampler in 70%.)"""
    g = json.loads((REPO / "graphs" / "txt2img_varied.json").read_text())
    assert sample.guidance_split(g)[0] > 0  # an unguided first sampler that the second one continues
    prompts = [cp.parse(t) for t in COLOUR_OPEN]
    varied = []
    for text in COLOUR_OPEN:
        g["6"]["inputs"]["text"], g["5"]["inputs"]["batch_size"] = text, 8
        for k in ("3", "10"):
            g[k]["inputs"]["noise_seed"] = 21
        res = shapes.ex.run(engine.Graph.from_json(g), targets=["8"])
        assert res.status == "success", res.error
        varied.append([(im.numpy() * 255).round().clip(0, 255).astype(np.uint8) for im in res.values["8"][0]])
    plain = shapes.images([Job(t, seed=21, batch=8, cfg=3.0) for t in COLOUR_OPEN])
    div_v, div_p = ev.diversity(varied, prompts), ev.diversity(plain, prompts)
    acc_v = ev.partial_accuracy([im for ims in varied for im in ims], [p for p in prompts for _ in range(8)])
    acc_p = ev.partial_accuracy([im for ims in plain for im in ims], [p for p in prompts for _ in range(8)])
    # measured here: every open attribute varied in 4 of 5 prompts (plain 4 of 5; one prompt's background takes
    # 2 values under both), all stated 95% (plain 92%): on the bar, with 1 and 2 threads alike; the v7 file:
    # 5 of 5 (plain 5 of 5), all stated 75% (78%); before v7: 5 of 5 against 3 of 5
    assert div_v["all"] >= 0.8 and div_v["all"] >= div_p["all"], (div_v, div_p)
    assert acc_v["all"] >= acc_p["all"] - 0.1 and acc_v["count"] >= 0.75, (acc_v, acc_p)


def test_benchmark_pipeline_splits_guidance_like_the_graph():
    """benchmarks/fidelity.py's 'varied' rows come from ``Pipeline.generate(unguided_steps=)``: all steps
    unguided is guidance 1; some unguided steps is neither guidance 1 nor guidance from the first step."""
    pipe = sample.Pipeline.from_single_file(REPO / "models" / "checkpoints" / CKPT)

    def run(cfg: float, k: int) -> np.ndarray:
        return pipe.generate(["a red circle"], seed=3, steps=4, cfg=cfg, unguided_steps=k)[0]

    all_unguided, plain_one, split, plain = run(3.0, 4), run(1.0, 0), run(3.0, 2), run(3.0, 0)
    assert np.array_equal(all_unguided, plain_one)
    assert not np.array_equal(split, plain) and not np.array_equal(split, plain_one)
