"""A big VAEDecode batch is decoded a slice at a time: the same pixels as one pass, progress per slice, and
an interrupt stops it between slices (a 4096-latent decode used to ignore /interrupt to its end)."""

from __future__ import annotations

import threading

import torch

from kiln import engine
from kiln.engine import events as ev
from kiln.nodes import latent as latent_nodes


def _graph(batch: int) -> dict:
    return {
        "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["l", 0], "vae": ["c", 2]}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}},
    }


def test_sliced_decode_gives_the_pixels_of_one_pass(world, monkeypatch):
    ex = world.executor()
    res = ex.run(engine.Graph.from_json(_graph(5)), targets=["c", "d"])
    assert res.ok, res.error
    vae = res.values["c"][2]
    whole = res.values["d"][0]
    monkeypatch.setattr(latent_nodes, "DECODE_CHUNK_PIXELS", 2 * 64 * 64)  # two images per slice
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sliced = latent_nodes.decode(vae, latents)
    monkeypatch.setattr(latent_nodes, "DECODE_CHUNK_PIXELS", 10**9)
    one_pass = latent_nodes.decode(vae, latents)
    assert sliced.shape == one_pass.shape == whole.shape
    assert torch.allclose(sliced, one_pass, atol=1e-5)


def test_an_interrupt_stops_a_big_decode_between_slices(world, monkeypatch):
    monkeypatch.setattr(latent_nodes, "DECODE_CHUNK_PIXELS", 64 * 64)  # one image per slice
    cancel = threading.Event()
    ticks = []

    def sink(e):
        if isinstance(e, ev.Progress) and e.node == "d":
            ticks.append(e.value)
            cancel.set()  # interrupt as soon as the first slice is reported

    res = world.executor().run(engine.Graph.from_json(_graph(12)), sink=sink, cancel=cancel)
    assert res.status == "interrupted"
    assert isinstance(res.error, ev.ExecutionInterrupted) and res.error.node_id == "d"
    assert ticks and max(ticks) < 12  # it stopped before decoding the whole batch
