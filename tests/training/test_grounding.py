"""The cross-attention grounding loss: the recording processor computes what the default one does, caption
words are tied to the right objects, and the loss reads 0 for attention inside each object and the area
outside it for attention spread evenly."""

import numpy as np
import pytest
import torch

from kiln.training import grounding as gr, models, scenes as sc

TINY_UNET = {**models.UNET_CONFIG, "block_out_channels": [16, 16, 32], "norm_num_groups": 4}


def _obj(shape, color, size, position):
    x, y = sc.position_xy(position)
    return sc.Obj(shape, color, size, position, float(x), float(y), float(sc.SIZES[size]))


RED_SQUARE = _obj("square", "red", "small", "top left")
BLUE_CIRCLE = _obj("circle", "blue", "large", "bottom right")
SCENE = sc.Scene((RED_SQUARE, BLUE_CIRCLE), "white")


def test_the_recording_processor_gives_the_default_output_and_keeps_each_layers_probabilities():
    torch.manual_seed(0)
    unet = models.build_unet(TINY_UNET).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 32, 128)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        rec = gr.AttentionRecorder(unet)
        rec.clear()
        out = unet(x, t, ctx).sample
    assert torch.allclose(out, ref, atol=1e-5)
    assert len(rec.maps) == len(rec.layers) == 7  # 8x8 and 4x4 layers, down, mid and up
    assert {m.shape[2] for m in rec.maps} == {64, 16}
    for m in rec.maps:
        assert m.shape[:2] == (2, unet.config.attention_head_dim) and m.shape[3] == 32
        assert torch.allclose(m.sum(dim=-1), torch.ones(m.shape[:3]), atol=1e-5)  # over the tokens


def test_caption_words_are_tied_to_the_objects_they_describe():
    # the phrases in the other order than the scene's objects, the background in each wording
    text = "a large blue circle at the bottom right and a red square on a white background"
    got = gr.word_objects(text, SCENE)
    assert list(zip(text.split(), got)) == [
        ("a", -2), ("large", 1), ("blue", 1), ("circle", 1), ("at", -2), ("the", -2), ("bottom", 1),
        ("right", 1), ("and", -2), ("a", -2), ("red", 0), ("square", 0), ("on", -2), ("a", -2),
        ("white", -1), ("background", -2),
    ]  # fmt: skip
    assert gr.word_objects("square and circle on white", SCENE) == [0, -2, 1, -2, -1]
    # two phrases that fit either object, a phrase the scene lacks, a wrong count: nothing is grounded
    twins = sc.Scene((RED_SQUARE, _obj("square", "red", "small", "bottom left")), "black")
    assert gr.word_objects("a square and a red square", twins) is None
    assert gr.word_objects("a triangle and a circle", SCENE) is None
    assert gr.word_objects("a circle", SCENE) is None


def test_the_loss_is_zero_inside_the_objects_and_the_outside_area_when_spread():
    owner, masks = gr.targets(["a red square and a blue circle"], [SCENE], torch.tensor([True]), 32)
    assert owner[0, :8].tolist() == [-2, -2, 0, 0, -2, -2, 1, 1] and set(owner[0, 8:]) == {-2}
    tokens = [2, 3, 6, 7]
    maps = []
    for res in (8, 4):
        inside = torch.zeros(1, 4, res * res, 32)
        for t in tokens:
            cells = torch.from_numpy(gr._cells(masks[0][owner[0, t]], res).reshape(-1)).float()
            inside[0, :, :, t] = cells / cells.sum()
        maps.append(inside)
    assert gr.loss(maps, owner, masks).item() == pytest.approx(0.0, abs=1e-6)
    spread = [torch.full((1, 4, r * r, 32), 1 / 32) for r in (8, 4)]
    outside = [
        1 - gr._cells(masks[0][owner[0, t]], r).mean() for r in (8, 4) for t in tokens
    ]  # the share of cells each token's object does not touch
    assert gr.loss(spread, owner, masks).item() == pytest.approx(float(np.mean(outside)), abs=1e-6)
    # a dropped caption grounds nothing
    owner, masks = gr.targets(["a red square and a blue circle"], [SCENE], torch.tensor([False]), 32)
    assert (owner == -2).all() and not masks and gr.loss(spread, owner, masks).item() == 0.0
