"""The pixel evaluator measures something: real scenes score ~100%, noise scores about chance."""

import numpy as np

from training import evaluate as ev
from training import scenes as sc


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
    other = sc.Obj(o.shape, o.color, o.size, sc.POSITIONS[(sc.POSITIONS.index(o.position) + 4) % 9],
                   o.cx, o.cy, o.extent)
    r = ev.score(sc.render(s), other, s.background)
    assert not r["position"] and r["color"] and r["shape"]
