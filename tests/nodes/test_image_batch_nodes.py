"""Image batch nodes: ImageBatch, ImageFromBatch, RepeatImageBatch, RebatchImages."""

import pytest
import torch

from kiln.engine import NodeError
from kiln.nodes.image_batch import ImageBatch, ImageFromBatch, RebatchImages, RepeatImageBatch
from tests.nodes import interface_diff

NAMES = ["ImageBatch", "ImageFromBatch", "RepeatImageBatch", "RebatchImages"]


def solid(value, b=1, h=4, w=4, c=3):
    return torch.full((b, h, w, c), float(value))


def numbered(n, h=4, w=4):
    """A batch whose image i is filled with i / 10, so slices can be identified."""
    return torch.stack([torch.full((h, w, 3), i / 10) for i in range(n)])


def test_interface_matches_comfyui(registry):
    assert interface_diff.diff(registry.object_info(), NAMES) == []
    info = registry.object_info(["RebatchImages"])["RebatchImages"]
    assert info["output_is_list"] == [True]


def test_image_batch_joins_and_rescales_second():
    a, b = solid(0.2, b=2, h=8, w=6), solid(0.8, b=1, h=4, w=3)
    out = ImageBatch().run(a, b)
    assert out.shape == (3, 8, 6, 3)
    assert torch.allclose(out[:2], a) and torch.allclose(out[2], torch.full((8, 6, 3), 0.8))


def test_image_batch_rgb_with_rgba_gets_opaque_alpha():
    out = ImageBatch().run(solid(0.5), solid(0.25, c=4))
    assert out.shape == (2, 4, 4, 4)
    assert torch.all(out[0, ..., 3] == 1.0) and torch.all(out[1, ..., 3] == 0.25)


def test_image_batch_in_a_graph(run_graph):
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 4, "batch_size": 1, "color": 0xFFFFFF}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
    }
    out = run_graph(g, targets=["3"]).values["3"][0]
    assert out.shape == (3, 8, 8, 3) and torch.allclose(out[2], torch.ones(8, 8, 3))


def test_image_from_batch_slices_and_clamps_like_comfyui():
    batch = numbered(5)
    out = ImageFromBatch().run(batch, batch_index=1, length=3)
    assert [round(float(x[0, 0, 0]), 2) for x in out] == [0.1, 0.2, 0.3]
    # past the end: ComfyUI takes the last image, and the length is cut to what is there
    last = ImageFromBatch().run(batch, batch_index=99, length=4)
    assert last.shape[0] == 1 and float(last[0, 0, 0, 0]) == pytest.approx(0.4)
    tail = ImageFromBatch().run(batch, batch_index=3, length=10)
    assert tail.shape[0] == 2
    out[0].fill_(9)  # a copy, not a view of the input
    assert float(batch[1, 0, 0, 0]) == pytest.approx(0.1)


def test_image_from_batch_empty_batch_is_a_node_error():
    with pytest.raises(NodeError) as e:
        ImageFromBatch().run(torch.zeros(0, 4, 4, 3), 0, 1)
    assert e.value.input_name == "image"


def test_repeat_image_batch_repeats_whole_batch():
    out = RepeatImageBatch().run(numbered(2), amount=3)
    assert [round(float(x[0, 0, 0]), 2) for x in out] == [0.0, 0.1, 0.0, 0.1, 0.0, 0.1]


def test_rebatch_images_regroups_list():
    out = RebatchImages().run([numbered(3), numbered(4)], batch_size=[2])
    assert [x.shape[0] for x in out] == [2, 2, 2, 1]
    firsts = [round(float(x[0, 0, 0, 0]), 2) for x in out]
    assert firsts == [0.0, 0.2, 0.1, 0.3]  # order kept across the input batches


def test_rebatch_images_different_sizes_is_a_node_error():
    with pytest.raises(NodeError) as e:
        RebatchImages().run([numbered(2), numbered(2, h=8)], batch_size=[2])
    assert e.value.input_name == "images" and "scale" in (e.value.hint or "")


def test_rebatch_images_list_output_feeds_downstream_once_per_batch(run_graph):
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 5, "color": 0}},
        "2": {"class_type": "RebatchImages", "inputs": {"images": ["1", 0], "batch_size": 2}},
        "3": {"class_type": "GetImageSize", "inputs": {"image": ["2", 0]}},
    }
    res = run_graph(g, targets=["2", "3"])
    (batches,) = res.values["2"]
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert res.values["3"][2] == [2, 2, 1]  # GetImageSize ran once per batch of the list
