"""Image transform, post-processing and compositing nodes: each checked for what it is for."""

import numpy as np
import pytest
import torch

from kiln.engine import NodeError
from kiln.nodes.image_compositing import (
    ImageRGBToYUV,
    ImageYUVToRGB,
    JoinImageWithAlpha,
    PorterDuffImageComposite,
    SplitImageWithAlpha,
)
from kiln.nodes.image_transform import (
    GetImageSize,
    ImageAddNoise,
    ImageFlip,
    ImageQuantize,
    ImageRotate,
    ImageScaleToMaxDimension,
    ImageScaleToTotalPixels,
    ImageSharpen,
    ImageStitch,
    Morphology,
    ResizeAndPadImage,
)
from tests.nodes import interface_diff

NAMES = [
    "ImageFlip",
    "ImageRotate",
    "ImageSharpen",
    "ImageQuantize",
    "ImageAddNoise",
    "ImageScaleToTotalPixels",
    "ImageScaleToMaxDimension",
    "ImageStitch",
    "ResizeAndPadImage",
    "GetImageSize",
    "Morphology",
    "PorterDuffImageComposite",
    "SplitImageWithAlpha",
    "JoinImageWithAlpha",
    "ImageRGBToYUV",
    "ImageYUVToRGB",
    # the interface fixes in nodes/image.py
    "ImageBlend",
    "ImageCompositeMasked",
    "SaveImage",
]


def solid(value, b=1, h=4, w=4, c=3):
    return torch.full((b, h, w, c), float(value))


def gradient(h=4, w=6):
    """A [1, h, w, 3] image whose pixel (y, x) is (y / 10, x / 10, 0): positions are readable."""
    ys = torch.arange(h).view(h, 1).expand(h, w) / 10
    xs = torch.arange(w).view(1, w).expand(h, w) / 10
    return torch.stack([ys, xs, torch.zeros(h, w)], -1).unsqueeze(0)


def test_interfaces_match_comfyui(registry):
    assert interface_diff.diff(registry.object_info(), NAMES) == []
    save = registry.object_info(["SaveImage"])["SaveImage"]["input"]
    assert set(save["optional"]) >= {"validate", "embed_provenance", "generation_info"}
    assert save["optional"]["validate"][1]["default"] is False


def test_flip_mirrors_the_right_axis():
    img = gradient()
    v = ImageFlip().run(img, "x-axis: vertically")
    h = ImageFlip().run(img, "y-axis: horizontally")
    assert torch.equal(v[0, 0], img[0, -1]) and torch.equal(v[0, -1], img[0, 0])  # rows swapped
    assert torch.equal(h[0, :, 0], img[0, :, -1])  # columns swapped
    assert torch.equal(ImageFlip().run(v, "x-axis: vertically"), img)


def test_rotate_quarter_turns_clockwise():
    img = gradient(h=4, w=6)
    r90 = ImageRotate().run(img, "90 degrees")
    assert r90.shape == (1, 6, 4, 3)
    # clockwise: the old top-left corner goes to the top-right, the old bottom-left to the top-left
    assert torch.equal(r90[0, 0, -1], img[0, 0, 0]) and torch.equal(r90[0, 0, 0], img[0, -1, 0])
    assert torch.equal(ImageRotate().run(img, "180 degrees")[0, 0, 0], img[0, -1, -1])
    r270 = ImageRotate().run(img, "270 degrees")
    assert torch.equal(ImageRotate().run(r270, "90 degrees"), img)
    assert torch.equal(ImageRotate().run(img, "none"), img)


def test_sharpen_raises_edge_contrast_and_keeps_flat_areas():
    img = torch.full((1, 9, 9, 3), 0.4)
    img[:, :, 5:] = 0.6  # a vertical edge
    out = ImageSharpen().run(img, sharpen_radius=1, sigma=1.0, alpha=0.5)
    assert out.shape == img.shape
    assert torch.allclose(out[0, :, 0], img[0, :, 0], atol=1e-5)  # far from the edge: unchanged
    assert float(out[0, 4, 4, 0]) < 0.4 and float(out[0, 4, 5, 0]) > 0.6  # overshoot on both sides
    assert torch.allclose(ImageSharpen().run(img, 1, 1.0, 0.0), img, atol=1e-6)  # alpha 0: identity


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-4"])
def test_quantize_limits_colour_count(dither):
    torch.manual_seed(0)
    img = torch.rand(2, 16, 16, 3)
    out = ImageQuantize().run(img, colors=4, dither=dither)
    assert out.shape == img.shape
    for b in range(2):
        colours = {tuple(p) for p in (out[b] * 255).round().int().reshape(-1, 3).tolist()}
        assert 1 < len(colours) <= 4


def test_quantize_keeps_alpha():
    img = torch.rand(1, 8, 8, 4)
    out = ImageQuantize().run(img, colors=2, dither="none")
    assert torch.equal(out[..., 3], img[..., 3])


def test_add_noise_is_seeded_and_clipped():
    img = solid(0.5, h=8, w=8)
    a = ImageAddNoise().run(img, seed=7, strength=0.5)
    assert torch.equal(a, ImageAddNoise().run(img, seed=7, strength=0.5))
    assert not torch.equal(a, ImageAddNoise().run(img, seed=8, strength=0.5))
    assert a.min() >= 0 and a.max() <= 1 and float((a - img).abs().mean()) > 0.1
    gen = torch.Generator().manual_seed(7)  # ComfyUI's noise: randn after manual_seed(seed)
    assert torch.allclose(a, (img + 0.5 * torch.randn(img.shape, generator=gen)).clamp(0, 1))
    assert torch.equal(ImageAddNoise().run(img, seed=1, strength=0.0), img)


def test_scale_to_total_pixels_keeps_aspect():
    out = ImageScaleToTotalPixels().run(solid(0.3, h=20, w=40), "bilinear", megapixels=0.01)
    h, w = out.shape[1:3]
    assert (h, w) == (round(20 * (0.01 * 1024 * 1024 / 800) ** 0.5), round(40 * (0.01 * 1024 * 1024 / 800) ** 0.5))
    assert abs(h * w - 0.01 * 1024 * 1024) < 0.01 * 0.02 * 1024 * 1024 and abs(w - 2 * h) <= 1


@pytest.mark.parametrize("h,w,expect", [(20, 40, (16, 32)), (40, 20, (32, 16)), (10, 10, (32, 32))])
def test_scale_to_max_dimension(h, w, expect):
    out = ImageScaleToMaxDimension().run(solid(0.3, h=h, w=w), "area", largest_size=32)
    assert tuple(out.shape[1:3]) == expect
    assert ImageScaleToMaxDimension().run(solid(0.3), "lanczos", 0).shape == (1, 4, 4, 3)
    rgba = ImageScaleToMaxDimension().run(solid(0.5, h=8, w=8, c=4), "lanczos", 4)  # Lanczos keeps alpha
    assert rgba.shape == (1, 4, 4, 4) and torch.allclose(rgba[..., 3], torch.full((1, 4, 4), 127 / 255))


def test_stitch_sizes_order_and_spacing():
    red, blue = solid(0) + torch.tensor([1.0, 0, 0]), solid(0, h=8, w=8) + torch.tensor([0, 0, 1.0])
    right = ImageStitch().run(red, "right", True, 2, "black", image2=blue)
    # blue is scaled to red's height (4) keeping its square shape, then a 2-pixel black gap between them
    assert right.shape == (1, 4, 4 + 2 + 4, 3)
    assert torch.allclose(right[0, 0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.all(right[0, :, 4:6] == 0.0)
    assert torch.allclose(right[0, 0, -1], torch.tensor([0, 0, 1.0]), atol=0.01)
    up = ImageStitch().run(red, "up", True, 0, "white", image2=blue)
    assert up.shape == (1, 8, 4, 3) and up[0, 0, 0, 2] > 0.9 and up[0, -1, 0, 0] == 1.0  # image2 on top
    odd = ImageStitch().run(red, "down", True, 3, "red", image2=blue)
    assert odd.shape[1] == 4 + 4 + 4  # an odd spacing is rounded up to even
    assert torch.allclose(odd[0, 5, 0], torch.tensor([1.0, 0, 0]))
    assert torch.equal(ImageStitch().run(red, "right", True, 8, "white"), red)  # no image2: unchanged


def test_stitch_without_matching_pads_and_batches():
    a, b = solid(0.2, b=2, h=4, w=4), solid(0.6, b=1, h=8, w=2)
    out = ImageStitch().run(a, "right", False, 0, "white", image2=b)
    assert out.shape == (2, 8, 6, 3)  # the shorter image is padded (centred) to 8 rows
    assert torch.all(out[:, :2, :4] == 1.0) and torch.all(out[:, 2:6, :4] == 0.2)
    assert torch.all(out[1, :, 4:] == 0.6)  # image2's last image repeats for the longer batch


def test_stitch_rgb_with_rgba():
    out = ImageStitch().run(solid(0.5), "right", False, 2, "blue", image2=solid(0.5, c=4))
    assert out.shape == (1, 4, 10, 4) and torch.all(out[..., :4, 3] == 1.0)
    assert torch.allclose(out[0, 0, 4], torch.tensor([0, 0, 1.0, 1.0]))


def test_resize_and_pad_fits_and_centres():
    out = ResizeAndPadImage().run(solid(0.0, h=10, w=20), 16, 16, "white", "bilinear")
    assert out.shape == (1, 16, 16, 3)
    assert torch.all(out[0, :4] == 1.0) and torch.all(out[0, 12:] == 1.0)  # 16x8 content centred
    assert torch.all(out[0, 4:12] == 0.0)


def test_get_image_size_and_graph(run_graph):
    assert GetImageSize().run(solid(0, b=3, h=5, w=7)) == (7, 5, 3)
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 2, "color": 0}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
    }
    assert run_graph(g, targets=["2"]).values["2"] == (24, 16, 2)


def test_morphology_operations():
    img = torch.zeros(1, 9, 9, 3)
    img[:, 4, 4] = 1.0  # one bright pixel
    dil = Morphology().run(img, "dilate", 3)
    assert int(dil[0, ..., 0].sum()) == 9 and float(dil[0, 3, 5, 0]) == 1.0  # grows to 3x3
    assert float(Morphology().run(dil, "erode", 3)[0, ..., 0].sum()) == 1.0  # and shrinks back
    assert float(Morphology().run(img, "open", 3).sum()) == 0.0  # opening removes specks
    grad = Morphology().run(dil, "gradient", 3)
    assert float(grad[0, 4, 4, 0]) == 0.0 and float(grad[0, 2, 4, 0]) == 1.0  # edges only
    assert torch.equal(Morphology().run(img, "top_hat", 3), img)  # the speck is what opening removed
    hole = 1 - img
    assert float(Morphology().run(hole, "bottom_hat", 3)[0, 4, 4, 0]) == 1.0
    assert float(Morphology().run(hole, "close", 3).min()) == 1.0
    big = Morphology().run(img, "dilate", 999)  # a huge kernel covers the whole image, cheaply
    assert torch.all(big == 1.0)
    even = Morphology().run(img, "dilate", 4)  # even size: reaches 2 back, 1 forward
    assert float(even[0, 2, 2, 0]) == 0.0 and float(even[0, 5, 5, 0]) == 1.0 and float(even[0, 6, 6, 0]) == 1.0
    assert float(even[0, 3, 3, 0]) == 1.0 and float(even[0, 7, 7, 0]) == 0.0


@pytest.mark.parametrize("k", [3, 5, 7])
def test_morphology_matches_a_plain_max_pool_for_odd_kernels(k):
    torch.manual_seed(k)
    img = torch.rand(2, 11, 13, 3)
    x = img.movedim(-1, 1)
    dilated = torch.nn.functional.max_pool2d(x, k, stride=1, padding=k // 2).movedim(1, -1)
    eroded = -torch.nn.functional.max_pool2d(-x, k, stride=1, padding=k // 2).movedim(1, -1)
    assert torch.allclose(Morphology().run(img, "dilate", k), dilated)
    assert torch.allclose(Morphology().run(img, "erode", k), eroded)


def test_porter_duff_over_and_mask_convention():
    src, dst = solid(1.0, h=4, w=4), solid(0.0, h=4, w=4)
    src_mask = torch.zeros(1, 4, 4)
    src_mask[:, :, 2:] = 1.0  # right half of the source is transparent (MASK = 1 - alpha)
    dst_mask = torch.zeros(1, 4, 4)
    img, mask = PorterDuffImageComposite().run(src, src_mask, dst, dst_mask, "SRC_OVER")
    assert torch.all(img[0, :, :2] == 1.0) and torch.all(img[0, :, 2:] == 0.0)
    assert torch.all(mask == 0.0)  # the result is opaque everywhere
    img, mask = PorterDuffImageComposite().run(src, src_mask, dst, dst_mask, "SRC_IN")
    assert torch.all(mask[0, :, 2:] == 1.0) and torch.all(img[0, :, :2] == 1.0)
    img, _ = PorterDuffImageComposite().run(src, src_mask, dst, dst_mask, "DST")
    assert torch.all(img == 0.0)
    _, mask = PorterDuffImageComposite().run(src, src_mask, dst, dst_mask, "CLEAR")
    assert torch.all(mask == 1.0)


def test_porter_duff_rescales_source_and_refuses_channel_mismatch():
    img, _ = PorterDuffImageComposite().run(
        solid(1.0, h=2, w=2), torch.zeros(1, 2, 2), solid(0, h=8, w=8), torch.zeros(1, 8, 8), "SRC"
    )
    assert img.shape == (1, 8, 8, 3) and torch.allclose(img, torch.ones(1, 8, 8, 3))
    with pytest.raises(NodeError) as e:
        PorterDuffImageComposite().run(solid(1, c=4), torch.zeros(1, 4, 4), solid(0), torch.zeros(1, 4, 4), "ADD")
    assert e.value.input_name == "source" and "channels" in str(e.value)


def test_split_and_join_alpha_round_trip():
    rgba = torch.rand(2, 4, 4, 4)
    rgb, mask = SplitImageWithAlpha().run(rgba)
    assert rgb.shape == (2, 4, 4, 3) and torch.allclose(mask, 1 - rgba[..., 3])
    back = JoinImageWithAlpha().run(rgb, mask)
    assert torch.allclose(back, rgba, atol=1e-6)
    _, opaque = SplitImageWithAlpha().run(torch.rand(1, 4, 4, 3))
    assert torch.all(opaque == 0.0)


def test_join_alpha_rescales_mask_and_repeats_batch():
    out = JoinImageWithAlpha().run(solid(0.5, b=2, h=8, w=8), torch.ones(1, 4, 4))
    assert out.shape == (2, 8, 8, 4) and torch.all(out[..., 3] == 0.0)
    with pytest.raises(NodeError) as e:
        JoinImageWithAlpha().run(solid(0.5), torch.zeros(0, 4, 4))
    assert e.value.input_name == "alpha"


def test_yuv_round_trip_and_luma():
    torch.manual_seed(1)
    img = torch.rand(1, 6, 6, 3)
    y, u, v = ImageRGBToYUV().run(img)
    assert y.shape == img.shape and torch.equal(y[..., 0], y[..., 2])  # grey images
    luma = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    assert torch.allclose(y[..., 0], luma)
    white_y, white_u, white_v = ImageRGBToYUV().run(torch.ones(1, 2, 2, 3))
    assert torch.allclose(white_u, torch.full_like(white_u, 0.5)) and torch.allclose(white_v, white_u)
    assert torch.allclose(ImageYUVToRGB().run(y, u, v), img, atol=2e-3)
    with pytest.raises(NodeError) as e:
        ImageYUVToRGB().run(y, u, v[:, :3])
    assert e.value.input_name == "V"


def test_bad_input_in_a_graph_is_a_clean_node_error(run_graph):
    mask = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 4, "height": 4}}
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
        "2": mask,
        "3": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["2", 0]}},
        "4": {
            "class_type": "PorterDuffImageComposite",
            "inputs": {
                "source": ["3", 0],
                "source_alpha": ["2", 0],
                "destination": ["1", 0],
                "destination_alpha": ["2", 0],
                "mode": "SRC_OVER",
            },
        },
    }
    res = run_graph(g, targets=["4"])
    assert res.status == "error"
    assert "4 channels" in res.error.message and "Traceback" not in res.error.message
    with pytest.raises(NodeError):
        ImageFlip().run(np.zeros((1, 4, 4, 3), dtype=np.float32), "x-axis: vertically")  # not a tensor
