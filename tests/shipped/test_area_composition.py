"""Area conditioning on the shipped model: each prompt is drawn in the area it is given.

``graphs/area_composition.json`` draws a picture 192 wide and 128 high (in EmptyLatentImage's units; 96x64
pixels on this model) and puts "a large red circle at the left" in its left 128 and "a large blue square at
the right" in its right 128, over a weak whole-picture prompt: each area is the square picture the model
was trained on. Each half of every picture is read by the training side's pixel checker with the other half
painted over in the background colour.
"""

from __future__ import annotations

import json

import numpy as np
from shipped_harness import REPO

from kiln import engine
from kiln.training import evaluate as ev


def _graph(batch: int) -> dict:
    g = json.loads((REPO / "graphs" / "area_composition.json").read_text())
    g["11"]["inputs"]["batch_size"] = batch
    return g


def _images(shapes, graph: dict) -> list[np.ndarray]:
    res = shapes.ex.run(engine.Graph.from_json(graph), targets=["13"])
    assert res.status == "success", res.error
    return [(im.numpy() * 255).round().clip(0, 255).astype(np.uint8) for im in res.values["13"][0]]


def _halves(img: np.ndarray) -> tuple[ev.Reading, ev.Reading]:
    bg = np.median(img[:2].reshape(-1, 3), axis=0).astype(np.uint8)
    half = img.shape[1] // 2
    left, right = img.copy(), img.copy()
    left[:, half:] = bg
    right[:, :half] = bg
    return ev.analyse(left), ev.analyse(right)


def _as_asked(img: np.ndarray) -> tuple[bool, bool]:
    left, right = _halves(img)
    return (
        (left.color, left.shape) == ("red", "circle") and left.position in ("left", "top left", "bottom left"),
        (right.color, right.shape) == ("blue", "square") and right.position in ("right", "top right", "bottom right"),
    )


def test_each_area_draws_its_own_prompt(shapes):
    images = _images(shapes, _graph(4))
    readings = [_as_asked(im) for im in images]
    # the model reaches 4 of 4 on both sides (seed 0); the bar leaves room for a borderline picture
    assert sum(left for left, _ in readings) >= 3, [_halves(im) for im in images]
    assert sum(right for _, right in readings) >= 3, [_halves(im) for im in images]


def test_without_areas_the_prompts_mix(shapes):
    """The same prompts combined over the whole picture blend (purple, one object), so the placement above
    is the areas' doing."""
    g = _graph(2)
    g["8"]["inputs"] = {"conditioning_1": ["2", 0], "conditioning_2": ["4", 0]}
    readings = [_as_asked(im) for im in _images(shapes, g)]
    assert not any(left and right for left, right in readings), readings
