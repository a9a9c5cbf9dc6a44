"""The shipped model (v2) on what a newcomer types: short prompts draw what they state, vary what they leave
open, and the outpaint graph extends a scene. Sampled through Kiln's nodes, read back by the pixel checker.

The bars sit below what ``benchmarks/fidelity.py`` measures on 100 prompts (its table is in the README) and
far above what the v1 weights gave on the same prompts (brown backgrounds and a second object for "a red
circle"), so a regression to drawing a full caption's defaults, or to ignoring the prompt, fails here.
"""

from __future__ import annotations

import json

import numpy as np
from shipped_harness import REPO, Job

from kiln import engine
from kiln.training import captions as cp, evaluate as ev, scenes as sc

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
    # measured here: count 88%, colour 95%, shape 75%, size 88%, position 83%, background 100%, all 75%
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
