"""The pixel evaluator measures something: real scenes score ~100%, noise scores about chance."""

import numpy as np

from kiln.training import evaluate as ev, scenes as sc


def test_real_scenes_score_near_100():
    targets = sc.eval_scenes(200)
    acc = ev.accuracy([sc.render(s) for s in targets], targets)
    assert all(acc[a] >= 0.97 for a in ev.ATTRIBUTES), acc


def test_noise_and_blank_images_score_low():
    targets = sc.eval_scenes(200)
    rng = np.random.default_rng(0)
    noise = ev.accuracy([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in targets], targets)
    assert noise["all"] < 0.05 and noise["position"] < 0.25 and noise["color"] < 0.3, noise
    blank = ev.accuracy([np.full((64, 64, 3), 128, np.uint8) for _ in targets], targets)
    assert blank["color"] == 0 and blank["shape"] == 0 and blank["all"] == 0


def test_wrong_prompt_is_caught():
    s = sc.eval_scenes(1)[0]
    o = s.objects[0]
    other = sc.Obj(
        o.shape, o.color, o.size, sc.POSITIONS[(sc.POSITIONS.index(o.position) + 4) % 9], o.cx, o.cy, o.extent
    )
    r = ev.score(sc.render(s), other, s.background)
    assert not r["position"] and r["color"] and r["shape"]


def test_corner_analysis_tells_rounded_squares_from_circles():
    import cv2

    def drawn(kind: str, size: int, radius: float = 0.0) -> np.ndarray:
        """Drawn at 4x and averaged down, as the scenes are; ``radius``: the rounded square's corner
        radius as a share of its side."""
        img = np.full((256, 256, 3), 245, np.uint8)
        c, h, r = 128, size * 2, max(1, int(size * 4 * radius))
        if kind == "circle":
            cv2.circle(img, (c, c), h, (220, 30, 30), -1)
        else:  # a square with rounded corners, as a model draws it
            cv2.rectangle(img, (c - h + r, c - h), (c + h - r, c + h), (220, 30, 30), -1)
            cv2.rectangle(img, (c - h, c - h + r), (c + h, c + h - r), (220, 30, 30), -1)
            for dx in (-1, 1):
                for dy in (-1, 1):
                    cv2.circle(img, (c + dx * (h - r), c + dy * (h - r)), r, (220, 30, 30), -1)
        return cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)

    for size, radius in ((12, 0.1), (16, 0.15), (24, 0.15)):
        assert ev.analyse(drawn("circle", size)).shape == "circle", size
        assert ev.analyse(drawn("rounded", size, radius)).shape == "square", size
    assert ev.analyse(drawn("rounded", 24, 0.3)).shape == "circle"  # a rounder one is not a square any more
