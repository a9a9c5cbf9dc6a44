"""Partial prompts (issue 16): the caption grammar with attributes left open, the evaluator that reads them,
and CLIPTextEncode's warning about words the shipped model's tokenizer does not know.

The v2 model's own figures come from ``benchmarks/fidelity.py``; here the parser, the checker (on real
drawn scenes, where it must be right) and the warning are pinned down.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln import engine
from kiln.nodes.sd.prompt import unknown_words, unknown_words_warning
from kiln.nodes.sd.tokenizer import make_tokenizer
from kiln.training import captions as cp, evaluate as ev, scenes as sc

# ---------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", cp.Prompt((cp.ObjSpec("circle", color="red"),))),
        ("red circle on black", cp.Prompt((cp.ObjSpec("circle", color="red"),), "black")),
        ("a small square at the bottom", cp.Prompt((cp.ObjSpec("square", size="small", position="bottom"),))),
        (
            "a large green square at the top left on a white background",
            cp.Prompt((cp.ObjSpec("square", "green", "large", "top left"),), "white"),
        ),
        ("Triangle in the center, on a gray", cp.Prompt((cp.ObjSpec("triangle", position="center"),), "gray")),
        (
            "a blue circle and a large triangle at the right",
            cp.Prompt((cp.ObjSpec("circle", color="blue"), cp.ObjSpec("triangle", size="large", position="right"))),
        ),
    ],
)
def test_parser_reads_what_is_stated(text, expected):
    p = cp.parse(text)
    assert p == expected
    assert p.count == len(expected.objects)


@pytest.mark.parametrize("text", ["a photo of a cat", "a red star", "red", "on a black background", "circle red"])
def test_parser_rejects_text_outside_the_grammar(text):
    assert cp.parse(text) is None


def test_full_captions_and_random_wordings_round_trip():
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(300):
        scene = sc.make_scene(sc.stream_seed(sc.TEST_STREAM, i))
        full = cp.full_prompt(scene)
        assert cp.render_prompt(full) == sc.caption(scene)  # v1 captions are the grammar's full wording
        assert cp.parse(sc.caption(scene)) == full and full.is_full()
        text = cp.partial_caption(scene, rng)
        p = cp.parse(text)
        assert p is not None, text
        assert p.count == len(scene.objects)  # one phrase per object: the count is always said
        assert sorted(o.shape for o in p.objects) == sorted(o.shape for o in scene.objects)
        for spec in p.objects:  # whatever is stated is true of some object of the scene
            assert any(
                all(getattr(spec, a) in (None, getattr(o, a)) for a in cp.OBJECT_ATTRIBUTES) for o in scene.objects
            )
        assert p.background in (None, scene.background)
        kinds.add("full" if p.is_full() else "partial")
    assert kinds == {"full", "partial"}  # the training mix has both


def test_scene_for_satisfies_the_prompt_and_varies_the_rest():
    p = cp.parse("a red circle at the top left")
    scenes = [cp.scene_for(p, np.random.default_rng(k)) for k in range(16)]
    assert all(len(s.objects) == 1 and s.objects[0].color == "red" for s in scenes)
    assert all(s.objects[0].position == "top left" for s in scenes)
    assert len({s.background for s in scenes}) >= 3 and len({s.objects[0].size for s in scenes}) == 2


# ---------------------------------------------------------------- the evaluator, on real scenes


def _real_groups(prompts: list[cp.Prompt], seeds: int = 8) -> list[list[sc.Scene]]:
    return [
        [cp.scene_for(p, np.random.default_rng([sc.TEST_STREAM, 16, i, k])) for k in range(seeds)]
        for i, p in enumerate(prompts)
    ]


def test_partial_checks_score_real_scenes_fully():
    prompts = cp.eval_prompts(24)
    groups = _real_groups(prompts, 4)
    images = [sc.render(s) for g in groups for s in g]
    acc = ev.partial_accuracy(images, [p for p in prompts for _ in range(4)])
    # every stated colour, size, position, background and every count is read right; the shape reader
    # misreads about one small real circle in 400-500 (training/README.md: 99.8% on 1,000 real scenes), one
    # of these 96 pictures
    assert {c: v for c, v in acc.items() if c not in ("shape", "all")} == {
        c: 1.0 for c in ev.PARTIAL_COLUMNS if c not in ("shape", "all")
    }
    assert acc["shape"] >= 0.98 and acc["all"] >= 0.98


def test_partial_checks_catch_what_is_wrong():
    p = cp.parse("a red circle on black")
    good = cp.scene_for(p, np.random.default_rng(1))
    o = good.objects[0]
    blue = sc.Scene((sc.Obj("circle", "blue", o.size, o.position, o.cx, o.cy, o.extent),), "black")
    r = ev.check_prompt(sc.render(blue), p)
    assert r["color"] is False and r["shape"] and r["background"] and r["count"] and r["all"] is False
    assert r["size"] is None and r["position"] is None  # not stated: not judged
    two = cp.scene_for(cp.parse("a red circle and a green square on black"), np.random.default_rng(2))
    r = ev.check_prompt(sc.render(two), p)
    assert r["count"] is False and r["all"] is False  # one phrase means exactly one object
    r = ev.check_prompt(sc.render(two), cp.parse("a square and a red circle"))
    assert r["count"] and r["all"]  # matched whatever the order of the phrases


def test_diversity_counts_distinct_values_of_what_is_left_open():
    prompts = [cp.parse("a red circle"), cp.parse("a large square at the top on white")]
    groups = _real_groups(prompts)
    images = [[sc.render(s) for s in g] for g in groups]
    for imgs, scenes, p in zip(images, groups, prompts):
        seen = ev.open_values(imgs, p)
        expected = {"0.color": {s.objects[0].color for s in scenes}} if p.objects[0].color is None else {}
        if p.objects[0].size is None:
            expected["0.size"] = {s.objects[0].size for s in scenes}
        if p.objects[0].position is None:
            expected["0.position"] = {s.objects[0].position for s in scenes}
        if p.background is None:
            expected["background"] = {s.background for s in scenes}
        assert seen == expected
    div = ev.diversity(images, prompts)
    assert div["position"] == 1.0 and div["background"] == 1.0 and div["color"] == 1.0 and div["all"] == 1.0
    # the same picture eight times leaves nothing varied
    same = ev.diversity([[imgs[0]] * 8 for imgs in images], prompts)
    assert same["all"] == 0.0 and same["position distinct"] == 1.0


# ---------------------------------------------------------------- CLIPTextEncode's unknown-word warning


def _encode(shapes, text: str) -> engine.RunResult:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "kiln-shapes.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
    }
    ex = engine.Executor(shapes.ex.registry, cache="none", folders=shapes.ex.folders, services=shapes.ex.services)
    res = ex.run(engine.Graph.from_json(g), targets=["pos"])
    assert res.status == "success", res.error
    return res


def test_unknown_words_are_named_on_the_shipped_model(shapes, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.nodes.conditioning"):
        res = _encode(shapes, "a photo of a cat")
    (warning,) = res.outputs["pos"]["warnings"]
    assert "photo, of, cat" in warning
    assert "circle" in warning.split("It knows:")[1]  # and says what the model does understand
    assert any("photo, of, cat" in r.getMessage() for r in caplog.records)  # the CLI's and server's log
    assert res.values["pos"][0][0][0].shape[0] == 1  # still encoded: a warning, never an error


def test_prompts_in_the_grammar_encode_silently(shapes, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.nodes.conditioning"):
        res = _encode(shapes, "a (large:1.2) green square at the top left on a white background")
    assert "pos" not in res.outputs and not caplog.records


def test_open_bpe_vocabularies_never_warn():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusion"))
    import tiny_models

    text = "a photo of a cat, (zxqv:1.3) astronaut riding a horse"
    for tok in (make_tokenizer(), tiny_models.train_tokenizer()):  # CLIP's 49,408 tokens; a tiny real BPE
        assert unknown_words(text, tok) == []

    assert unknown_words_warning([make_tokenizer(), make_tokenizer()], text) is None  # SDXL: two encoders
