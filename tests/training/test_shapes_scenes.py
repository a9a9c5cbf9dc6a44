"""The procedural scenes are a pure function of their seed and their captions say what is drawn."""

import re

import numpy as np

from kiln.training import evaluate as ev, scenes as sc

CAPTION = re.compile(r"a (small|large) (\w+) (circle|square|triangle) (?:at the|in the) ([a-z ]+?)(?= and a | on a )")


def test_same_seed_same_scene_and_pixels():
    for i in range(20):
        seed = sc.stream_seed(sc.TEST_STREAM, i)
        a, b = sc.make_scene(seed), sc.make_scene(seed)
        assert a == b
        assert np.array_equal(sc.render(a), sc.render(b))
        assert np.array_equal(sc.edge_map(a), sc.edge_map(b))
    assert sc.make_scene(1) != sc.make_scene(2)


def test_caption_lists_every_object_and_the_background():
    for i in range(200):
        s = sc.make_scene(sc.stream_seed(sc.TEST_STREAM, i))
        text = sc.caption(s)
        found = CAPTION.findall(text)
        assert [(o.size, o.color, o.shape, o.position) for o in s.objects] == list(found), text
        assert text.endswith(f"on a {s.background} background")


def test_single_objects_are_common_and_all_words_occur():
    scenes = [sc.make_scene(sc.stream_seed(sc.TEST_STREAM, i)) for i in range(600)]
    singles = sum(len(s.objects) == 1 for s in scenes) / len(scenes)
    assert 0.6 < singles < 0.8
    objs = [o for s in scenes for o in s.objects]
    assert {o.position for o in objs} == set(sc.POSITIONS)
    assert {o.color for o in objs} == set(sc.COLORS)
    assert {s.background for s in scenes} == set(sc.BACKGROUNDS)


def test_rendered_object_is_where_the_caption_says():
    for s in sc.eval_scenes(50):
        r = ev.analyse(sc.render(s))
        o = s.objects[0]
        assert (r.color, r.shape, r.size, r.position, r.background) == (
            o.color,
            o.shape,
            o.size,
            o.position,
            s.background,
        )


def test_outline_style_and_edge_map():
    s = sc.make_scene(sc.stream_seed(sc.TEST_STREAM, 3), n_objects=1)
    filled, outline, edges = sc.render(s), sc.render(s, "outline"), sc.edge_map(s)
    bg = np.array(sc.BACKGROUNDS[s.background])
    fg_filled = (np.abs(filled.astype(int) - bg).sum(-1) > 60).sum()
    fg_outline = (np.abs(outline.astype(int) - bg).sum(-1) > 60).sum()
    assert fg_outline < 0.8 * fg_filled  # the inside is background
    mask = sc.object_mask(s.objects[0])
    on = edges[..., 0] > 0
    assert on.sum() > 20 and set(np.unique(edges)) <= {0, 255}
    # the edges trace the object's boundary: every edge pixel is on or next to the footprint
    grown = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown[np.clip(ys + dy, 0, 63), np.clip(xs + dx, 0, 63)] = True
    assert (on & ~grown).sum() == 0
