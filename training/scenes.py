"""Procedural training scenes: coloured shapes on a plain background, with captions.

Everything here is a pure function of a seed, so the data set never has to be stored: scene ``i`` of a
stream is ``make_scene(stream_seed * 1_000_003 + i)``. A :class:`Scene` is a small description (shapes,
colours, sizes, grid cells, background); :func:`render` draws it at 64x64 (anti-aliased by drawing at 4x
and averaging), :func:`caption` words it, :func:`edge_map` draws the control image for the ControlNet and
``render(scene, style="outline")`` the style the LoRA learns.

The vocabulary is deliberately small and the layout deliberately regular (a 3x3 grid of cell centres at
16/32/48 px, small objects ~12 px across and large ones ~24 px) so that a pixel checker
(:mod:`training.evaluate`) can decide unambiguously whether an image matches its caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle")
# Hues far apart, all saturated, so the nearest-palette test in the evaluator is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 220, 20),
    "green": (30, 170, 40),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (150, 40, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (110, 70, 40),
}
SIZES = {"small": 12, "large": 24}  # nominal extent in pixels (side, diameter, triangle width/height)
# Row-major 3x3 grid; the phrase is what follows "at the" / "in the".
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
CELL_CENTRES = (16, 32, 48)
JITTER = 2  # max pixels of random offset from the cell centre
SIZE_JITTER = 2

# How many objects a scene has: mostly one, since the evaluation is about "the" prompted shape.
N_OBJECTS_P = (0.7, 0.2, 0.1)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str
    cx: float  # centre of the bounding box, pixels
    cy: float
    extent: float  # pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str


def position_xy(position: str) -> tuple[int, int]:
    idx = POSITIONS.index(position)
    return CELL_CENTRES[idx % 3], CELL_CENTRES[idx // 3]


def _cells_compatible(a: str, b: str, a_large: bool, b_large: bool) -> bool:
    ia, ib = POSITIONS.index(a), POSITIONS.index(b)
    if ia == ib:
        return False
    if a_large or b_large:
        # a large object spans ~1.5 cells: keep the other one at least two cells away on some axis
        return max(abs(ia % 3 - ib % 3), abs(ia // 3 - ib // 3)) >= 2
    return True


def make_scene(seed: int, n_objects: int | None = None) -> Scene:
    """The scene for ``seed``: 1-3 objects in distinct, non-overlapping grid cells."""
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = int(rng.choice(3, p=N_OBJECTS_P)) + 1
    background = str(rng.choice(list(BACKGROUNDS)))
    objects: list[Obj] = []
    tries = 0
    while len(objects) < n_objects:
        tries += 1
        if tries > 50:  # painted into a corner (two large objects can block every cell): start over
            objects, tries = [], 0
        size = str(rng.choice(list(SIZES)))
        position = str(rng.choice(POSITIONS))
        if not all(_cells_compatible(position, o.position, size == "large", o.size == "large") for o in objects):
            # redraw; with at most 3 objects a compatible cell always exists for a small object
            if rng.random() < 0.5:
                continue
            size = "small"
            if not all(_cells_compatible(position, o.position, False, o.size == "large") for o in objects):
                continue
        shape = str(rng.choice(SHAPES))
        color = str(rng.choice(list(COLORS)))
        x, y = position_xy(position)
        cx = x + rng.uniform(-JITTER, JITTER)
        cy = y + rng.uniform(-JITTER, JITTER)
        extent = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        objects.append(Obj(shape, color, size, position, float(cx), float(cy), float(extent)))
    return Scene(tuple(objects), background)


def object_phrase(o: Obj) -> str:
    where = "in the center" if o.position == "center" else f"at the {o.position}"
    return f"a {o.size} {o.color} {o.shape} {where}"


def caption(scene: Scene) -> str:
    """E.g. ``a small green square at the top left on a white background``."""
    objs = " and ".join(object_phrase(o) for o in scene.objects)
    return f"{objs} on a {scene.background} background"


def _polygon(o: Obj, scale: int) -> np.ndarray | None:
    h = o.extent / 2
    cx, cy = o.cx, o.cy
    if o.shape == "square":
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif o.shape == "triangle":  # pointing up, bounding box centred on (cx, cy)
        pts = [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    else:
        return None
    return np.round(np.array(pts) * scale).astype(np.int32)


def _draw(canvas: np.ndarray, o: Obj, color: tuple[int, int, int], scale: int, thickness: int) -> None:
    """Draw one object on a ``scale``-times canvas; ``thickness`` -1 fills, else an outline (pixels at 1x)."""
    t = -1 if thickness < 0 else max(1, thickness * scale)
    poly = _polygon(o, scale)
    if poly is None:
        centre = (int(round(o.cx * scale)), int(round(o.cy * scale)))
        radius = int(round(o.extent / 2 * scale))
        if t > 0:
            radius -= t // 2
        cv2.circle(canvas, centre, radius, color, t, lineType=cv2.LINE_8)
    elif t < 0:
        cv2.fillPoly(canvas, [poly], color, lineType=cv2.LINE_8)
    else:
        # keep the stroke inside the filled shape's footprint: shrink the polygon towards its centre
        c = poly.mean(axis=0)
        inner = np.round(c + (poly - c) * (1 - (t / 2) / max(1.0, o.extent * scale / 2))).astype(np.int32)
        cv2.polylines(canvas, [inner], True, color, t, lineType=cv2.LINE_8)


def render(scene: Scene, style: str = "filled") -> np.ndarray:
    """RGB uint8 ``[64, 64, 3]``. ``style`` is ``"filled"`` (the base model) or ``"outline"`` (the LoRA)."""
    if style not in ("filled", "outline"):
        raise ValueError(f"style must be 'filled' or 'outline', not {style!r}")
    s = SUPERSAMPLE
    canvas = np.empty((SIZE * s, SIZE * s, 3), np.uint8)
    canvas[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        _draw(canvas, o, COLORS[o.color], s, -1 if style == "filled" else 2)
    return cv2.resize(canvas, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def edge_map(scene: Scene) -> np.ndarray:
    """The ControlNet's input: white 1-px object outlines on black, RGB uint8 ``[64, 64, 3]``.

    Drawn from the geometry rather than by an edge detector, so it does not depend on colours.
    """
    s = SUPERSAMPLE
    canvas = np.zeros((SIZE * s, SIZE * s, 3), np.uint8)
    for o in scene.objects:
        _draw(canvas, o, (255, 255, 255), s, 1)
    small = cv2.resize(canvas, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return np.where(small > 60, 255, 0).astype(np.uint8)


def object_mask(o: Obj) -> np.ndarray:
    """Boolean ``[64, 64]`` footprint of one object (for IoU checks)."""
    s = SUPERSAMPLE
    canvas = np.zeros((SIZE * s, SIZE * s, 3), np.uint8)
    _draw(canvas, o, (255, 255, 255), s, -1)
    return cv2.resize(canvas, (SIZE, SIZE), interpolation=cv2.INTER_AREA)[..., 0] > 127


# Seed streams: training, evaluation and tests never share a scene seed.
TRAIN_STREAM, EVAL_STREAM, TEST_STREAM = 1, 2, 3


def stream_seed(stream: int, index: int) -> int:
    return stream * 1_000_003_000 + index


def eval_scenes(n: int, n_objects: int = 1) -> list[Scene]:
    """The held-out evaluation scenes: single objects by default, drawn from their own seed stream."""
    return [make_scene(stream_seed(EVAL_STREAM, i), n_objects=n_objects) for i in range(n)]
