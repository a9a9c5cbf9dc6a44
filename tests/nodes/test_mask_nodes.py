"""Mask nodes: threshold, colour, crop, feather, grow, composite, load from an image channel, preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine import NodeError, use_folders
from kiln.nodes import mask as M


def square(h=9, w=9, top=3, left=3, size=3):
    m = torch.zeros(1, h, w)
    m[:, top : top + size, left : left + size] = 1.0
    return m


def test_threshold_mask():
    m = torch.tensor([[0.1, 0.5, 0.51, 0.9]])
    assert M.ThresholdMask().run(mask=m, value=0.5).tolist() == [[[0.0, 0.0, 1.0, 1.0]]]
    assert M.ThresholdMask().run(mask=m, value=0.0).sum() == 4


def test_image_color_to_mask_matches_exact_8bit_colour():
    img = torch.zeros(2, 2, 3, 3)
    img[0, 0, 0] = torch.tensor([0x33, 0x66, 0x99]) / 255.0
    img[1, 1, 2] = torch.tensor([0x33, 0x66, 0x9A]) / 255.0  # one step off
    out = M.ImageColorToMask().run(image=img, color=0x336699)
    assert out.shape == (2, 2, 3) and out.dtype == torch.float32
    assert out.sum() == 1 and out[0, 0, 0] == 1.0
    assert M.ImageColorToMask().run(image=img, color=0).sum() == 2 * 2 * 3 - 2


def test_crop_mask_region_clips_and_rejects_outside():
    m = torch.arange(20.0).view(1, 4, 5)
    assert torch.equal(M.CropMask().run(mask=m, x=1, y=2, width=2, height=2), m[:, 2:4, 1:3])
    assert M.CropMask().run(mask=m[0], x=3, y=0, width=512, height=512).shape == (1, 4, 2)  # [H, W] accepted
    with pytest.raises(NodeError) as e:
        M.CropMask().run(mask=m, x=5, y=0, width=2, height=2)
    assert e.value.input_name == "x" and "0 to 4" in e.value.hint
    with pytest.raises(NodeError) as e:
        M.CropMask().run(mask=m, x=0, y=9, width=2, height=2)
    assert e.value.input_name == "y"


def test_feather_mask_ramps_each_edge():
    m = torch.ones(1, 6, 8)
    out = M.FeatherMask().run(mask=m, left=4, top=0, right=2, bottom=3)
    assert torch.allclose(out[0, 0], torch.tensor([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5]))
    assert torch.allclose(out[0, :, 4], torch.tensor([1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3]))
    assert torch.allclose(out[0, -1, 0], torch.tensor(0.25 / 3))  # corner: both ramps
    assert torch.equal(M.FeatherMask().run(mask=m, left=0, top=0, right=0, bottom=0), m)
    huge = M.FeatherMask().run(mask=m, left=100, top=0, right=0, bottom=0)  # clamped to the width
    assert torch.allclose(huge[0, 0], torch.arange(1, 9) / 8.0)


def test_grow_mask_grows_and_shrinks_by_n_pixels():
    m = square()
    grown = M.GrowMask().run(mask=m, expand=2, tapered_corners=False)
    assert torch.equal(grown, square(top=1, left=1, size=7))  # the 3x3 square grows 2 px on every side
    tapered = M.GrowMask().run(mask=m, expand=2, tapered_corners=True)
    assert tapered[0, 1, 4] == 1 and tapered[0, 4, 1] == 1 and tapered[0, 1, 1] == 0  # corners rounded
    assert tapered[0, 2, 2] == 1 and tapered.sum() == 9 + 4 * 3 * 2 + 4 * 1
    shrunk = M.GrowMask().run(mask=square(size=5, top=2, left=2), expand=-2, tapered_corners=False)
    assert torch.equal(shrunk, square(size=1, top=4, left=4))
    assert torch.equal(M.GrowMask().run(mask=m, expand=0, tapered_corners=True), m)
    full = M.GrowMask().run(mask=m, expand=16384, tapered_corners=True)
    assert full.eq(1).all()


@pytest.mark.parametrize("tapered", [True, False])
@pytest.mark.parametrize("expand", [3, -2])
def test_grow_mask_matches_grey_morphology(tapered, expand):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    m = torch.from_numpy(rng.random((2, 12, 10)).astype(np.float32))
    c = 0 if tapered else 1
    fp = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    ref = []
    for item in m.numpy():
        for _ in range(abs(expand)):
            op = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
            item = op(item, footprint=fp)
        ref.append(item)
    out = M.GrowMask().run(mask=m, expand=expand, tapered_corners=tapered)
    assert torch.equal(out, torch.from_numpy(np.stack(ref)))


@pytest.mark.parametrize(
    "op,a,expected",
    [
        ("multiply", 0.25, [0.2, 0.0]),
        ("add", 0.7, [1.0, 0.6]),  # 1.5 clamped
        ("subtract", 0.25, [0.55, 0.6]),
        ("and", 0.7, [1.0, 0.0]),  # logic ops round: 0.8 & 0.7 -> 1, 0.6 & 0 -> 0
        ("or", 0.7, [1.0, 1.0]),
        ("xor", 0.7, [0.0, 1.0]),
    ],
)
def test_mask_composite_operations(op, a, expected):
    dst = torch.zeros(1, 4, 4)
    dst[0, 1, 1], dst[0, 1, 2] = 0.8, 0.6
    src = torch.zeros(1, 2, 2)
    src[0, 0, 0] = a  # pasted at (1, 1): src covers dst[1:3, 1:3]
    out = M.MaskComposite().run(destination=dst, source=src, x=1, y=1, operation=op)
    assert torch.allclose(out[0, 1, 1:3], torch.tensor(expected))
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[1:3, 1:3] = False
    assert torch.equal(out[0][outside], dst[0][outside])  # nothing outside the pasted area changes
    assert out.min() >= 0 and out.max() <= 1


def test_mask_composite_clips_at_edges_and_matches_batches():
    dst = torch.zeros(2, 4, 4)
    out = M.MaskComposite().run(destination=dst, source=torch.ones(1, 3, 3), x=2, y=3, operation="add")
    assert out.shape == (2, 4, 4) and out.sum() == 2 * 2 and out[:, 3, 2:].eq(1).all()
    far = M.MaskComposite().run(destination=dst, source=torch.ones(1, 3, 3), x=100, y=0, operation="add")
    assert torch.equal(far, dst)
    one_dst = M.MaskComposite().run(destination=torch.zeros(4, 4), source=torch.ones(3, 2, 2), x=0, y=0, operation="or")
    assert one_dst.shape == (3, 4, 4)
    with pytest.raises(NodeError) as e:
        M.MaskComposite().run(destination=dst, source=torch.ones(3, 2, 2), x=0, y=0, operation="add")
    assert e.value.input_name == "source"


def test_load_image_mask_channels_and_alpha_inversion(folders):
    arr = np.zeros((4, 6, 4), np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[..., 1] = 51  # 0.2 green
    arr[..., 3] = 255
    arr[1, 2, 3] = 0  # one transparent pixel
    Image.fromarray(arr, "RGBA").save(folders.input_dir / "m.png")
    Image.fromarray(arr[..., :3], "RGB").save(folders.input_dir / "rgb.png")
    with use_folders(folders):
        alpha = M.LoadImageMask().run(image="m.png", channel="alpha")
        assert alpha.shape == (1, 4, 6) and alpha.sum() == 1 and alpha[0, 1, 2] == 1.0  # 1 - alpha
        assert M.LoadImageMask().run(image="m.png", channel="red").eq(1).all()
        assert torch.allclose(M.LoadImageMask().run(image="m.png", channel="green"), torch.full((1, 4, 6), 0.2))
        assert M.LoadImageMask().run(image="m.png", channel="blue").eq(0).all()
        assert M.LoadImageMask().run(image="rgb.png", channel="alpha").eq(0).all()  # opaque: nothing to change
        with pytest.raises(NodeError) as e:
            M.LoadImageMask().run(image="missing.png", channel="red")
        assert e.value.input_name == "image"
        assert M.LoadImageMask.validate("missing.png") is not True
        assert M.LoadImageMask.fingerprint("m.png", "red") == M.LoadImageMask.fingerprint("m.png", "alpha")


def test_mask_preview_saves_a_grey_image_to_temp(run_graph, folders):
    g = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 5, "height": 3}},
        "2": {"class_type": "MaskPreview", "inputs": {"mask": ["1", 0]}},
    }
    res = run_graph(g)
    assert res.status == "success", res.error
    (entry,) = res.outputs["2"]["images"]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    with Image.open(folders.temp_dir / entry["subfolder"] / entry["filename"]) as im:
        assert im.size == (5, 3) and im.getpixel((0, 0)) == (127, 127, 127)
