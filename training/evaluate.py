"""The pixel evaluator: does an image show what its caption says?

:func:`analyse` reads an RGB image with no knowledge of the prompt: background colour from the border,
foreground as the pixels far from it, the largest connected foreground region as "the" object, its
dominant colour (nearest palette entry to the median), its shape from which corners of its bounding box it
fills (:func:`corner_occupancy`) and how much of the box it fills (square ~1.0, circle ~0.8, triangle
~0.56), its size from the bounding box, its position from the bounding-box centre on the 3x3 grid.
:func:`score` compares that with the prompted :class:`~training.scenes.Obj`.

Partial prompts (:mod:`training.captions`, issue 16): :func:`read_objects` reads every object the same way,
:func:`check_prompt` checks only what a prompt states plus the object count, :func:`diversity` measures how
much what it leaves open varies across seeds. One file, as the full and partial checks share the readers
and the table formatting.

``python -m kiln.training.evaluate --weights runs/shapes/unet/latest.pt`` (or ``--real`` / ``--noise``)
prints per-attribute accuracies; the real scenes score ~100% and noise images ~chance, which is what
shows that the numbers measure prompt-following.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from kiln.training import captions, scenes as sc
from kiln.training.captions import ObjSpec, Prompt

ATTRIBUTES = ("color", "shape", "size", "position", "background")
_PAL = np.array(list(sc.COLORS.values()), np.float32)
_BG = np.array(list(sc.BACKGROUNDS.values()), np.float32)


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    fill: float = 0.0
    area: int = 0
    shape_by_extent: str | None = None  # what the earlier, extent-only rule reads


def _nearest(rgb: np.ndarray, table: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def grid_position(cx: float, cy: float) -> str:
    """The position word for a bounding-box centre: the 3x3 grid with cuts at 24 and 40 px."""
    col = 0 if cx < 24 else (1 if cx < 40 else 2)
    row = 0 if cy < 24 else (1 if cy < 40 else 2)
    return sc.POSITIONS[row * 3 + col]


def corner_occupancy(mask: np.ndarray) -> tuple[float, float, float, float]:
    """How much of each bounding-box corner (top left, top right, bottom left, bottom right) the object
    fills: the triangle with legs a quarter of the box's side. A circle leaves all four empty (its edge is
    0.29 sides from a corner along the diagonal), a square fills them (also with rounded corners), the
    upward triangle fills the bottom two only."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    leg = max(2, int(round(0.25 * min(x1 - x0 + 1, y1 - y0 + 1))))
    dy, dx = np.nonzero(np.add.outer(np.arange(leg), np.arange(leg)) < leg)  # the corner triangle
    out = []
    for cy, cx, sy, sx in ((y0, x0, 1, 1), (y0, x1, 1, -1), (y1, x0, -1, 1), (y1, x1, -1, -1)):
        out.append(float(mask[cy + sy * dy, cx + sx * dx].mean()))
    return tuple(out)


def _triangle_or_circle(mask: np.ndarray) -> str:
    """A polygon fit, for the extents small pixelated triangles and circles share (0.68-0.75)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    approx = cv2.approxPolyDP(c, 0.08 * cv2.arcLength(c, True), True)
    return "triangle" if len(approx) == 3 else "circle"


def shape_by_extent(mask: np.ndarray, fill: float) -> str:
    """The earlier rule, extent alone (printed next to the main one by benchmarks/fidelity.py). Squares
    drawn with rounded corners read as circles here."""
    if fill > 0.93:
        return "square"
    if fill < 0.68:
        return "triangle"
    return "circle" if fill > 0.75 else _triangle_or_circle(mask)


def _shape(mask: np.ndarray, fill: float) -> str:
    """Corners first (all four filled: square; only the bottom two: triangle), then the extent."""
    tl, tr, bl, br = corner_occupancy(mask)
    if min(tl, tr, bl, br) >= 0.3:
        return "square"
    if fill < 0.68 or (min(bl, br) >= 0.3 and max(tl, tr) < 0.3):
        return "triangle"
    return "circle" if fill >= 0.75 else _triangle_or_circle(mask)


def _foreground(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background RGB from the border, foreground mask: pixels far from it)."""
    f = img.astype(np.float32)
    border = np.concatenate(
        [f[:2].reshape(-1, 3), f[-2:].reshape(-1, 3), f[:, :2].reshape(-1, 3), f[:, -2:].reshape(-1, 3)]
    )
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((f - bg_rgb) ** 2).sum(axis=2))
    return bg_rgb, (dist > 60).astype(np.uint8)


def object_footprint(img: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest foreground object with its holes filled (what it covers)."""
    _, mask = _foreground(img)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    if contours:
        cv2.drawContours(out, [max(contours, key=cv2.contourArea)], -1, 1, thickness=-1)
    return out.astype(bool)


def hollowness(img: np.ndarray) -> float:
    """Share of the largest object's footprint that is background: ~0 filled, ~0.5+ drawn as an outline."""
    _, mask = _foreground(img)
    foot = object_footprint(img)
    if foot.sum() < 20:
        return 0.0
    return float(1.0 - (mask.astype(bool) & foot).sum() / foot.sum())


def analyse(img: np.ndarray) -> Reading:
    """Read an RGB uint8 ``[64, 64, 3]`` image."""
    f = img.astype(np.float32)
    bg_rgb, mask = _foreground(img)
    background = _nearest(bg_rgb, _BG, list(sc.BACKGROUNDS))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return Reading(background, None, None, None, None)
    i = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[i, cv2.CC_STAT_AREA])
    if area < MIN_AREA:
        return Reading(background, None, None, None, None, area=area)
    return _read_component(f, background, labels, stats, i)


MIN_AREA = 20  # pixels: a foreground region smaller than this is a speck, not an object


def _read_component(f: np.ndarray, background: str, labels: np.ndarray, stats: np.ndarray, i: int) -> Reading:
    """Colour, shape, size and position of connected component ``i`` (``f``: the image as float32)."""
    area = int(stats[i, cv2.CC_STAT_AREA])
    x, y, w, h = (int(stats[i, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    obj = labels == i
    # colour from the object's core, away from anti-aliased edges; an outline (the LoRA's style) has little
    # core, so its colour is read from its quarter of pixels farthest from the background
    core = cv2.erode(obj.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if core.sum() >= max(5, 0.25 * obj.sum()):
        pix = f[core]
    else:
        pix = f[obj]
        far = ((pix - np.asarray(sc.BACKGROUNDS[background], np.float32)) ** 2).sum(axis=1)
        pix = pix[far >= np.quantile(far, 0.75)]
    color = _nearest(np.median(pix, axis=0), _PAL, list(sc.COLORS))
    # the shape is what the object covers: an outline is read with its inside filled
    solid = _filled(obj)
    fill = float(solid.sum()) / float(w * h)
    shape = _shape(solid, fill)
    size = "large" if max(w, h) >= 18 else "small"
    position = grid_position(x + w / 2, y + h / 2)
    return Reading(background, color, shape, size, position, fill, area, shape_by_extent(obj, fill))


def _filled(obj: np.ndarray) -> np.ndarray:
    """``obj`` with its holes filled (a filled shape is unchanged)."""
    contours, _ = cv2.findContours(obj.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(obj.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=-1)
    return out.astype(bool) | obj


def read_objects(img: np.ndarray) -> tuple[str, list[Reading]]:
    """(background, every object of at least MIN_AREA pixels, largest first): what the partial checks and
    the object count read. Each object is read as :func:`analyse` reads the largest one."""
    f = img.astype(np.float32)
    bg_rgb, mask = _foreground(img)
    background = _nearest(bg_rgb, _BG, list(sc.BACKGROUNDS))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    objs = [_read_component(f, background, labels, stats, i) for i in order if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA]
    return background, objs


def score(img: np.ndarray, target: sc.Obj, background: str) -> dict[str, bool]:
    r = analyse(img)
    return {
        "color": r.color == target.color,
        "shape": r.shape == target.shape,
        "size": r.size == target.size,
        "position": r.position == target.position,
        "background": r.background == background,
    }


def accuracy(images: list[np.ndarray], targets: list[sc.Scene]) -> dict[str, float]:
    """Per-attribute accuracy of ``images`` against single-object ``targets``, plus ``all`` (every one right)."""
    rows = [score(img, s.objects[0], s.background) for img, s in zip(images, targets)]
    out = {a: float(np.mean([r[a] for r in rows])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([all(r.values()) for r in rows]))
    return out


def extent_only_shape_accuracy(images: list[np.ndarray], targets: list[sc.Scene]) -> float:
    """Shape accuracy under the earlier, extent-only rule (:func:`shape_by_extent`), for comparison."""
    return float(np.mean([analyse(img).shape_by_extent == s.objects[0].shape for img, s in zip(images, targets)]))


# ---------------------------------------------------------------- partial prompts
# A partial prompt (training.captions) is checked on what it states only: each stated attribute of each
# named object, the background when said, and the object count (exactly as many objects as phrases; one
# phrase means one object). Objects are matched to the prompt's phrases by the assignment that gets the
# most stated attributes right.

PARTIAL_COLUMNS = (*ATTRIBUTES, "count", "all")
OPEN_ATTRIBUTES = ("color", "size", "position", "background")  # what a prompt can leave open (shape never)
DOMAIN = {
    "color": len(sc.COLORS),
    "size": len(sc.SIZES),
    "position": len(sc.POSITIONS),
    "background": len(sc.BACKGROUNDS),
}
DIVERSITY_SEEDS = 8
DIVERSITY_VALUES = 3  # distinct values an open attribute should take across the seeds (2 for size: all it has)


def _match(prompt: Prompt, objs: list[Reading]) -> list[Reading | None]:
    """The reading matched to each of the prompt's objects (``None``: fewer objects than phrases)."""

    def hits(spec: ObjSpec, r: Reading | None) -> int:
        return (
            0 if r is None else sum(getattr(spec, a) == getattr(r, a) for a in ("color", "shape", "size", "position"))
        )

    pool: list[Reading | None] = [*objs, *([None] * len(prompt.objects))]
    best, best_hits = None, -1
    for perm in itertools.permutations(range(len(pool)), len(prompt.objects)):
        h = sum(hits(spec, pool[j]) for spec, j in zip(prompt.objects, perm))
        if h > best_hits:
            best, best_hits = perm, h
    assert best is not None
    return [pool[j] for j in best]


def check_prompt(img: np.ndarray, prompt: Prompt) -> dict[str, bool | None]:
    """Per column of PARTIAL_COLUMNS: right (True), wrong (False) or not stated (None). An object attribute
    is right when every object that states it shows it; ``all``: every stated attribute and the count."""
    background, objs = read_objects(img)
    matched = _match(prompt, objs[:6])
    out: dict[str, bool | None] = {}
    for a in ("color", "shape", "size", "position"):
        said = [(getattr(spec, a), r) for spec, r in zip(prompt.objects, matched) if getattr(spec, a) is not None]
        out[a] = None if not said else all(r is not None and getattr(r, a) == v for v, r in said)
    out["background"] = None if prompt.background is None else background == prompt.background
    out["count"] = len(objs) == prompt.count
    out["all"] = all(v for k, v in out.items() if v is not None)
    return out


def partial_accuracy(images: list[np.ndarray], prompts: list[Prompt]) -> dict[str, float]:
    """Per column: the share right among the images whose prompt states it (nan when none does)."""
    rows = [check_prompt(img, p) for img, p in zip(images, prompts)]
    out = {}
    for c in PARTIAL_COLUMNS:
        vals = [r[c] for r in rows if r[c] is not None]
        out[c] = float(np.mean(vals)) if vals else float("nan")
    return out


def open_values(images: list[np.ndarray], prompt: Prompt) -> dict[str, set[str]]:
    """For each attribute the prompt leaves open (``object<i>.<attr>`` for its objects, ``background``), the
    values the images show (one image per seed)."""
    seen: dict[str, set[str]] = {}
    for img in images:
        background, objs = read_objects(img)
        if prompt.background is None:
            seen.setdefault("background", set()).add(background)
        for i, (spec, r) in enumerate(zip(prompt.objects, _match(prompt, objs[:6]))):
            for a in ("color", "size", "position"):
                if getattr(spec, a) is None:
                    vals = seen.setdefault(f"{i}.{a}", set())
                    if r is not None:
                        vals.add(getattr(r, a))
    return seen


def diversity(groups: list[list[np.ndarray]], prompts: list[Prompt]) -> dict[str, float]:
    """Per open attribute (OPEN_ATTRIBUTES): the share of the prompts leaving it open whose images (one
    group of seeds per prompt) show at least ``min(DIVERSITY_VALUES, values it has)`` distinct values, for
    every object; ``<attr> distinct``: the mean number of distinct values; ``all``: the share of prompts
    where every open attribute does."""
    per: dict[str, list[bool]] = {a: [] for a in OPEN_ATTRIBUTES}
    distinct: dict[str, list[int]] = {a: [] for a in OPEN_ATTRIBUTES}
    every = []
    for imgs, p in zip(groups, prompts):
        seen = open_values(imgs, p)
        ok_prompt = True
        for a in OPEN_ATTRIBUTES:
            sets = [v for k, v in seen.items() if k.split(".")[-1] == a]
            if not sets:
                continue
            ok = all(len(v) >= min(DIVERSITY_VALUES, DOMAIN[a]) for v in sets)
            per[a].append(ok)
            distinct[a].append(min(len(v) for v in sets))
            ok_prompt &= ok
        every.append(ok_prompt)
    out = {a: float(np.mean(v)) if v else float("nan") for a, v in per.items()}
    out.update({f"{a} distinct": float(np.mean(v)) if v else float("nan") for a, v in distinct.items()})
    out["all"] = float(np.mean(every)) if every else float("nan")
    return out


def partial_header() -> str:
    return f"{'':<28}" + "".join(f"{a:>12}" for a in PARTIAL_COLUMNS)


def format_partial_row(name: str, acc: dict[str, float]) -> str:
    return f"{name:<28}" + "".join(
        f"{'-':>12}" if math.isnan(acc[a]) else f"{acc[a] * 100:>11.0f}%" for a in PARTIAL_COLUMNS
    )


def format_diversity(name: str, div: dict[str, float]) -> str:
    parts = []
    for a in OPEN_ATTRIBUTES:
        if not math.isnan(div[a]):
            parts.append(f"{a} {div[a] * 100:.0f}% ({div[a + ' distinct']:.1f} distinct)")
    return f"{name:<28}" + ", ".join(parts) + f"; every open attribute {div['all'] * 100:.0f}%"


def stated_counts(prompts: list[Prompt]) -> str:
    """How many prompts state each attribute (the partial table's denominators)."""
    return ", ".join(f"{a} {sum(check is not None for check in (_said(p, a) for p in prompts))}" for a in ATTRIBUTES)


def _said(p: Prompt, a: str) -> str | None:
    if a == "background":
        return p.background
    return next((getattr(o, a) for o in p.objects if getattr(o, a) is not None), None)


def real_partial_images(prompts: list[Prompt], seeds: int = DIVERSITY_SEEDS) -> list[list[np.ndarray]]:
    """For each prompt, ``seeds`` real scenes that satisfy it with the open attributes drawn at random: the
    reference the model's partial table and diversity are read against."""
    return [
        [sc.render(captions.scene_for(p, np.random.default_rng([sc.EVAL_STREAM, 18, i, k]))) for k in range(seeds)]
        for i, p in enumerate(prompts)
    ]


def partial_report(
    groups: list[list[np.ndarray]], prompts: list[Prompt], name: str
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """(accuracy over every seed's image, diversity, the two printed lines) for one sampler."""
    flat = [im for g in groups for im in g]
    acc = partial_accuracy(flat, [p for p, g in zip(prompts, groups) for _ in g])
    div = diversity(groups, prompts)
    return acc, div, [format_partial_row(name, acc), format_diversity(f"  diversity ({len(groups[0])} seeds)", div)]


def format_row(name: str, acc: dict[str, float]) -> str:
    return f"{name:<28}" + "".join(f"{acc[a] * 100:>11.0f}%" for a in (*ATTRIBUTES, "all"))


def header() -> str:
    return f"{'':<28}" + "".join(f"{a:>12}" for a in (*ATTRIBUTES, "all"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--real", action="store_true", help="score the held-out scenes themselves")
    p.add_argument("--noise", action="store_true", help="score random-noise images")
    p.add_argument("--run", help="a training run folder (runs/shapes): score its latest UNet checkpoint")
    p.add_argument("--checkpoint", help="a kiln-shapes .safetensors file to score")
    p.add_argument("--untrained", action="store_true", help="score freshly initialised weights")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--sampler", default="euler", choices=["euler", "dpmpp_2m", "ddim"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    targets = sc.eval_scenes(args.n)
    print(header())
    if args.real or not (args.noise or args.run or args.checkpoint or args.untrained):
        print(format_row("real scenes", accuracy([sc.render(s) for s in targets], targets)))
    if args.noise:
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in targets]
        print(format_row("uniform noise", accuracy(imgs, targets)))
    if args.run or args.checkpoint or args.untrained:
        import torch

        from kiln.training import sample

        torch.set_num_threads(args.threads)
        if args.checkpoint:
            pipe = sample.Pipeline.from_single_file(args.checkpoint)
        elif args.untrained:
            pipe = sample.Pipeline.untrained(args.run)
        else:
            pipe = sample.Pipeline.from_run(args.run)
        imgs = pipe.generate(
            [sc.caption(s) for s in targets], seed=0, steps=args.steps, cfg=args.cfg, sampler=args.sampler
        )
        name = "untrained" if args.untrained else f"{args.sampler} {args.steps} steps cfg {args.cfg:g}"
        print(format_row(name, accuracy(imgs, targets)))


if __name__ == "__main__":
    main()
