import json

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine import Graph, ValidationFailed, validate
from kiln.engine.events import Progress


def empty(color=0, w=8, h=8, b=1):
    return {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": b, "color": color}}


def test_empty_image_colour_and_shape(run_graph):
    res = run_graph({"1": empty(0x336699, 5, 3, 2)}, targets=["1"])
    img = res.values["1"][0]
    assert img.shape == (2, 3, 5, 3) and img.dtype == torch.float32
    assert torch.allclose(img[0, 0, 0], torch.tensor([0x33, 0x66, 0x99]) / 255.0)


def test_save_image_names_truncates_and_embeds_graph(run_graph, folders):
    g = {
        "1": empty(0x808080),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sub/pic"}},
    }
    extra = {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}}
    first = run_graph(g, extra_data=extra)
    assert first.outputs["2"] == {"images": [{"filename": "pic_00001_.png", "subfolder": "sub", "type": "output"}]}
    path = folders.output_dir / "sub" / "pic_00001_.png"
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (128, 128, 128)
        assert json.loads(im.text["prompt"])["2"]["class_type"] == "SaveImage"
        assert json.loads(im.text["workflow"]) == {"nodes": [], "links": []}
    # truncation, not rounding: 0.5 -> 127 (ComfyUI's clients compare pixels)
    g2 = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 4, "height": 4}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "half"}},
    }
    run_graph(g2)
    with Image.open(folders.output_dir / "half_00001_.png") as im:
        assert im.getpixel((0, 0)) == (127, 127, 127)


def test_save_image_counter_continues_and_never_overwrites(run_graph, folders):
    (folders.output_dir / "k_00007_.png").write_bytes(b"existing")
    g = {"1": empty(b=2), "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "k"}}}
    res = run_graph(g)
    names = [i["filename"] for i in res.outputs["2"]["images"]]
    assert names == ["k_00008_.png", "k_00009_.png"]
    assert (folders.output_dir / "k_00007_.png").read_bytes() == b"existing"


def test_save_image_refuses_prefix_outside_output(run_graph):
    g = {"1": empty(), "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../evil"}}}
    res = run_graph(g)
    assert res.status == "error"
    assert "filename_prefix" in res.error.message


def test_preview_image_goes_to_temp(run_graph, folders):
    res = run_graph({"1": empty(), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    item = res.outputs["2"]["images"][0]
    assert item["type"] == "temp" and item["filename"].startswith("ComfyUI_temp_")
    assert (folders.temp_dir / item["filename"]).is_file()


def test_load_image_mask_from_alpha_and_reload_on_change(run_graph, folders):
    rgba = np.zeros((6, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[:3, :, 3] = 0  # top half transparent
    Image.fromarray(rgba, "RGBA").save(folders.input_dir / "a.png")
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    res = run_graph(g, targets=["1"])
    image, mask = res.values["1"]
    assert image.shape == (1, 6, 4, 3) and torch.all(image[..., 0] == 1.0)
    assert torch.all(mask[0, :3] == 1.0) and torch.all(mask[0, 3:] == 0.0)
    again = run_graph(g, targets=["1"])
    assert "1" in again.cached  # same file: served from cache
    Image.fromarray(np.full((6, 4, 3), 9, np.uint8)).save(folders.input_dir / "a.png")
    changed = run_graph(g, targets=["1"])
    assert "1" in changed.ran  # the file's hash is part of the key


def test_load_image_missing_file_is_a_validation_error(registry, folders):
    g = Graph.from_json(
        {
            "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
    )
    res = validate(g, registry)
    assert not res.ok
    err = res.problems["1"].issues[0]
    assert err.kind == "custom_validation_failed" and "nope.png" in err.details


def test_load_image_rejects_traversal(registry, folders):
    g = Graph.from_json(
        {
            "1": {"class_type": "LoadImage", "inputs": {"image": "../../etc/passwd"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
    )
    assert not validate(g, registry).ok


@pytest.mark.parametrize("w,h,expect", [(0, 6, (6, 12)), (20, 0, (10, 20)), (0, 0, (4, 8)), (16, 16, (16, 16))])
def test_image_scale_keeps_aspect_with_zero(run_graph, w, h, expect):
    g = {
        "1": empty(w=8, h=4),
        "2": {
            "class_type": "ImageScale",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": w, "height": h, "crop": "disabled"},
        },
    }
    img = run_graph(g, targets=["2"]).values["2"][0]
    assert (img.shape[1], img.shape[2]) == (expect[0], expect[1])


def test_crop_blur_scale_by(run_graph):
    g = {
        "1": empty(0xFFFFFF, 10, 10),
        "2": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 4, "height": 3, "x": 8, "y": 1}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
        "4": {
            "class_type": "ImageScaleBy",
            "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "scale_by": 1.5},
        },
    }
    res = run_graph(g, targets=["2", "3", "4"])
    assert res.values["2"][0].shape == (1, 3, 2, 3)  # clipped at the right edge
    assert torch.allclose(res.values["3"][0], torch.ones(1, 10, 10, 3), atol=1e-5)  # blur of flat is flat
    assert res.values["4"][0].shape == (1, 15, 15, 3)


def test_pad_for_outpaint_mask_and_fill(run_graph):
    g = {
        "1": empty(0xFF0000, 32, 32),
        "2": {
            "class_type": "ImagePadForOutpaint",
            "inputs": {"image": ["1", 0], "left": 8, "top": 0, "right": 0, "bottom": 16, "feathering": 4},
        },
    }
    image, mask = run_graph(g, targets=["2"]).values["2"]
    assert image.shape == (1, 48, 40, 3) and mask.shape == (1, 48, 40)
    assert torch.all(image[0, :, :8] == 0.5) and torch.all(image[0, 40:, :] == 0.5)
    assert torch.all(mask[0, :, :8] == 1) and torch.all(mask[0, 32:, :] == 1)
    assert mask[0, 10, 20] == 0  # untouched interior
    assert mask[0, 10, 8] == 1 and 1 > mask[0, 10, 9] > mask[0, 10, 10] > 0  # feathered towards the new edge


def test_composite_masked_and_blend(run_graph):
    g = {
        "1": empty(0x000000, 16, 16),
        "2": empty(0xFFFFFF, 8, 8),
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 8, "height": 8}},
        "4": {
            "class_type": "ImageCompositeMasked",
            "inputs": {
                "destination": ["1", 0],
                "source": ["2", 0],
                "x": 8,
                "y": 0,
                "resize_source": False,
                "mask": ["3", 0],
            },
        },
        "5": {
            "class_type": "ImageBlend",
            "inputs": {"image1": ["1", 0], "image2": ["2", 0], "blend_factor": 1.0, "blend_mode": "screen"},
        },
    }
    res = run_graph(g, targets=["4", "5"])
    comp = res.values["4"][0]
    assert torch.allclose(comp[0, 0, 12], torch.full((3,), 0.5)) and torch.all(comp[0, 0, 0] == 0)
    assert torch.all(comp[0, 12, 12] == 0)  # below the pasted area
    assert torch.allclose(res.values["5"][0], torch.ones(1, 16, 16, 3))  # screen with white, resized


def test_mask_nodes(run_graph):
    g = {
        "1": empty(0x00FF00, 4, 4),
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "green"}},
        "3": {"class_type": "InvertMask", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
    }
    res = run_graph(g, targets=["2", "3", "4"])
    assert torch.all(res.values["2"][0] == 1) and torch.all(res.values["3"][0] == 0)
    assert res.values["4"][0].shape == (1, 4, 4, 3)


def test_save_image_websocket_sends_png_frames(run_graph):
    res = run_graph(
        {"1": empty(0x112233, 4, 4, b=2), "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    )
    frames = [e.preview for e in res.events if isinstance(e, Progress) and e.preview is not None]
    assert len(frames) == 2 and all(f.kind == "output" and f.format == "PNG" for f in frames)
    assert frames[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_graph(
        {"1": empty(0x112233, 4, 4, b=2), "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    )
    assert "2" in again.ran  # never served from cache: the client wants the frames again


def test_wrong_link_type_into_image_node(registry):
    g = Graph.from_json(
        {
            "1": {"class_type": "SolidMask", "inputs": {}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
    )
    res = validate(g, registry)
    assert res.problems["2"].issues[0].kind == "return_type_mismatch"
    with pytest.raises(ValidationFailed):
        res.raise_for_errors()
