"""Animated savers (SaveAnimatedPNG, SaveAnimatedWEBP) and LoadImageOutput."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine import Graph, validate
from kiln.nodes.animation import write_new_file
from tests.nodes import interface_diff

WORKFLOW = {"nodes": [{"id": 1}], "links": []}


def frames_graph(saver: dict, n=3, w=8, h=6) -> dict:
    """Three solid frames (black, grey, white) batched, then the saver."""
    colours = [0x000000, 0x808080, 0xFFFFFF][:n]
    g: dict = {}
    prev = None
    for i, c in enumerate(colours):
        g[f"e{i}"] = {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": 1, "color": c}}
        if prev is not None:
            g[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": [prev, 0], "image2": [f"e{i}", 0]}}
            prev = f"b{i}"
        else:
            prev = f"e{i}"
    g["save"] = {**saver, "inputs": {**saver["inputs"], "images": [prev, 0]}}
    return g


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def test_interfaces_match_comfyui(registry):
    assert interface_diff.diff(registry.object_info(), ["SaveAnimatedPNG", "SaveAnimatedWEBP", "LoadImageOutput"]) == []
    info = registry.object_info(["LoadImageOutput"])["LoadImageOutput"]
    assert info["experimental"] is True and info["input"]["required"]["image"][1]["image_folder"] == "output"


def test_save_animated_png_frames_duration_and_metadata(run_graph, folders):
    saver = {
        "class_type": "SaveAnimatedPNG",
        "inputs": {"filename_prefix": "anim/walk", "fps": 4.0, "compress_level": 1},
    }
    res = run_graph(frames_graph(saver), extra_data={"extra_pnginfo": {"workflow": WORKFLOW}})
    ui = res.outputs["save"]
    assert ui == {
        "images": [{"filename": "walk_00001_.png", "subfolder": "anim", "type": "output"}],
        "animated": [True],
    }
    path = folders.output_dir / "anim" / "walk_00001_.png"
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.is_animated
        durations, pixels = [], []
        for i in range(3):
            im.seek(i)
            durations.append(im.info["duration"])
            pixels.append(im.convert("RGB").getpixel((0, 0)))
    assert durations == [250, 250, 250]  # 1000 / fps ms per frame
    assert pixels == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    chunks = png_chunks(path.read_bytes())
    kinds = [k for k, _ in chunks]
    comf = dict(c.split(b"\0", 1) for k, c in chunks if k == b"comf")
    assert json.loads(comf[b"prompt"])["save"]["class_type"] == "SaveAnimatedPNG"
    assert json.loads(comf[b"workflow"]) == WORKFLOW
    assert kinds.index(b"comf") > kinds.index(b"IDAT")  # written after the image data, as ComfyUI does
    assert not [p for p in (folders.output_dir / "anim").iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_save_animated_webp_frames_duration_and_exif(run_graph, folders):
    saver = {
        "class_type": "SaveAnimatedWEBP",
        "inputs": {"filename_prefix": "clip", "fps": 10.0, "lossless": True, "quality": 80, "method": "fastest"},
    }
    res = run_graph(frames_graph(saver), extra_data={"extra_pnginfo": {"workflow": WORKFLOW}})
    item = res.outputs["save"]["images"][0]
    assert item == {"filename": "clip_00001_.webp", "subfolder": "", "type": "output"}
    assert res.outputs["save"]["animated"] == [True]
    with Image.open(folders.output_dir / item["filename"]) as im:
        assert im.format == "WEBP" and im.n_frames == 3
        durations, pixels = [], []
        for i in range(3):
            im.seek(i)
            im.load()  # WEBP fills in the frame's info when it is decoded
            durations.append(im.info["duration"])
            pixels.append(im.convert("RGB").getpixel((3, 3)))
        exif = im.getexif()
    assert durations == [100, 100, 100]
    assert pixels == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]  # lossless
    assert exif[0x0110].startswith("prompt:") and json.loads(exif[0x0110][7:])["save"]["class_type"]
    assert exif[0x010F] == "workflow:" + json.dumps(WORKFLOW)


def test_single_frame_is_not_animated_and_counter_never_overwrites(run_graph, folders):
    (folders.output_dir / "one_00004_.png").write_bytes(b"keep")
    saver = {"class_type": "SaveAnimatedPNG", "inputs": {"filename_prefix": "one", "fps": 6.0, "compress_level": 4}}
    res = run_graph(frames_graph(saver, n=1))
    assert res.outputs["save"]["images"][0]["filename"] == "one_00005_.png"
    assert res.outputs["save"]["animated"] == [False]
    assert (folders.output_dir / "one_00004_.png").read_bytes() == b"keep"
    with Image.open(folders.output_dir / "one_00005_.png") as im:
        assert getattr(im, "n_frames", 1) == 1


def test_write_new_file_skips_taken_names(tmp_path):
    (tmp_path / "x_00001_.webp").write_bytes(b"a")
    assert write_new_file(tmp_path, "x", "png", b"data") == "x_00002_.png"
    assert write_new_file(tmp_path, "x", "png", b"more") == "x_00003_.png"
    assert (tmp_path / "x_00002_.png").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00001_.webp", "x_00002_.png", "x_00003_.png"]


@pytest.mark.parametrize("bad", [{"filename_prefix": "../out"}, {"fps": 0.0}])
def test_saver_bad_input_is_a_node_error(run_graph, bad):
    saver = {"class_type": "SaveAnimatedPNG", "inputs": {"filename_prefix": "p", "fps": 6.0, "compress_level": 4}}
    saver["inputs"].update(bad)
    g = frames_graph(saver, n=2)
    if "fps" in bad:  # below the widget minimum: refused before running
        assert not validate(Graph.from_json(g), run_graph.executor.registry).ok
        return
    res = run_graph(g)
    assert res.status == "error" and "filename_prefix" in res.error.message


def test_load_image_output_reads_saved_results(run_graph, folders):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 255
    rgba[0, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folders.output_dir / "result.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(folders.input_dir / "result.png")  # same name in input/
    for name in ("result.png", "result.png [output]"):
        g = {"1": {"class_type": "LoadImageOutput", "inputs": {"image": name}}}
        image, mask = run_graph(g, targets=["1"]).values["1"]
        assert image.shape == (1, 4, 5, 3) and float(image[0, 1, 1, 1]) == pytest.approx(200 / 255)
        assert torch.all(mask[0, 0] == 1.0) and torch.all(mask[0, 1:] == 0.0)
    g = {"1": {"class_type": "LoadImageOutput", "inputs": {"image": "result.png [input]"}}}
    image, _ = run_graph(g, targets=["1"]).values["1"]
    assert float(image.max()) == 0.0  # an explicit [input] annotation still reads the input folder


def test_load_image_output_round_trips_an_animation(run_graph, folders):
    saver = {
        "class_type": "SaveAnimatedWEBP",
        "inputs": {"filename_prefix": "rt", "fps": 6.0, "lossless": True, "quality": 80, "method": "default"},
    }
    run_graph(frames_graph(saver))
    g = {"1": {"class_type": "LoadImageOutput", "inputs": {"image": "rt_00001_.webp [output]"}}}
    image, _ = run_graph(g, targets=["1"]).values["1"]
    assert image.shape == (3, 6, 8, 3)
    assert [round(float(image[i, 0, 0, 0]) * 255) for i in range(3)] == [0, 128, 255]


def test_load_image_output_missing_file_and_traversal(registry, folders):
    for name in ("nope.png", "../../etc/passwd"):
        g = Graph.from_json(
            {
                "1": {"class_type": "LoadImageOutput", "inputs": {"image": name}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            }
        )
        res = validate(g, registry)
        assert not res.ok and res.problems["1"].issues[0].kind == "custom_validation_failed"
