"""Latent nodes that need a real model. Tiled VAE decode/encode: the tiler is exact for local functions, equals
the plain VAE when the image fits in a tile, and stays close to it (seams blended away) on a trained VAE.
LatentApplyOperationCFG: sampling changes only through the operation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln.engine import NodeError
from kiln.nodes import latent as L, vae_tiled as T
from kiln.nodes.loaders import load_checkpoint_handles

SHAPES = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "kiln-shapes.safetensors"


def test_tiler_is_exact_for_local_functions():
    x = torch.rand(2, 4, 20, 36)

    def up(t):  # a "decoder" that only looks at each position
        return F.interpolate(t * 2 - 1, scale_factor=8, mode="nearest")

    out = T.three_pass(x, up, 8, 2, 8.0, 4)
    assert out.shape == (2, 4, 160, 288) and torch.allclose(out, up(x), atol=1e-6)

    def down(t):  # an "encoder" that averages 8x8 cells
        return F.avg_pool2d(t, 8)[:, :3]

    px = torch.rand(1, 3, 160, 96)
    enc = T.three_pass(px, down, 64, 16, 1 / 8, 3, multiple=8)
    assert enc.shape == (1, 3, 20, 12) and torch.allclose(enc, down(px), atol=1e-6)


def test_tiles_overlap_and_cover_everything():
    calls = []

    def record(t):
        calls.append(tuple(t.shape[2:]))
        return t

    T.tiled_apply(torch.zeros(1, 1, 20, 12), record, (8, 8), 2, 1.0, 1)
    assert T._starts(20, 8, 2) == [0, 6, 12] and T._starts(12, 8, 2) == [0, 6]
    assert calls == [(8, 8), (8, 6), (8, 8), (8, 6), (8, 8), (8, 6)]  # the last tile of a row is shorter
    assert T._starts(8, 8, 2) == [0]


def test_small_image_decodes_and_encodes_exactly_as_untiled(world):
    vae = load_checkpoint_handles(world.ckpt, "tiny").vae
    img = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    z = L.VAEEncode().run(pixels=img, vae=vae)["samples"]
    zt = T.VAEEncodeTiled().run(pixels=img, vae=vae, tile_size=512, overlap=64)["samples"]
    assert torch.allclose(zt, z, atol=1e-5)
    x = L.VAEDecode().run(samples={"samples": z}, vae=vae)
    xt = T.VAEDecodeTiled().run(samples={"samples": z}, vae=vae, tile_size=512, overlap=64)
    assert xt.shape == x.shape == (2, 64, 64, 3) and torch.allclose(xt, x, atol=1e-5)


def test_tiled_decode_of_the_random_tiny_model_runs_in_tiles(world):
    vae = load_checkpoint_handles(world.ckpt, "tiny").vae
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    out = T.VAEDecodeTiled().run(samples={"samples": z}, vae=vae, tile_size=64, overlap=32)
    assert out.shape == (1, 128, 192, 3) and 0 <= out.min() and out.max() <= 1 and torch.isfinite(out).all()
    with pytest.raises(NodeError) as e:
        T.VAEDecodeTiled().run(samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=vae, tile_size=64, overlap=32)
    assert e.value.input_name == "samples"
    with pytest.raises(NodeError) as e:
        T.VAEEncodeTiled().run(pixels=torch.zeros(1, 64, 64, 3), vae="not a vae", tile_size=64, overlap=32)
    assert e.value.input_name == "vae"


def _shapes_scene() -> torch.Tensor:
    img = torch.zeros(1, 128, 128, 3)
    img[:, 20:70, 30:100] = torch.tensor([0.9, 0.2, 0.1])
    img[:, 60:120, 10:60] = torch.tensor([0.1, 0.3, 0.9])
    return img


@pytest.mark.skipif(not SHAPES.is_file(), reason="the shipped kiln-shapes model is not present")
def test_tiled_close_to_untiled_on_the_trained_shapes_vae():
    vae = load_checkpoint_handles(SHAPES, "kiln-shapes").vae
    img = _shapes_scene()
    z = L.encode(vae, img)
    x = L.decode(vae, z)
    # decode: 128 px tiles (32 latents) over a 32x32 latent -> the wide/tall passes really tile
    xt = T.VAEDecodeTiled().run(samples={"samples": z}, vae=vae, tile_size=128, overlap=32)
    assert (xt - x).abs().mean() < 0.03
    # the overlap blends seams away: without it the worst pixel is much further off
    hard = T.VAEDecodeTiled().run(samples={"samples": z}, vae=vae, tile_size=64, overlap=0)
    soft = T.VAEDecodeTiled().run(samples={"samples": z}, vae=vae, tile_size=64, overlap=32)
    assert (soft - x).abs().max() < 0.5 * (hard - x).abs().max()
    # encode: a round trip through the tiled encoder reconstructs the image about as well as the plain one
    zt = T.VAEEncodeTiled().run(pixels=img, vae=vae, tile_size=128, overlap=32)["samples"]
    assert zt.shape == z.shape
    xr = L.decode(vae, zt)
    assert (xr - x).abs().mean() < 0.015
    assert (xr - img).abs().mean() < 1.2 * (x - img).abs().mean()


def test_apply_operation_cfg_changes_sampling_only_through_the_operation(world):
    from kiln.nodes import latent_operation as LO
    from kiln.nodes.conditioning import encode_prompt
    from kiln.nodes.sampling import sample
    from kiln.nodes.sd.samplers import sigmas_for

    h = load_checkpoint_handles(world.ckpt, "tiny")
    pos, neg = encode_prompt(h.clip, "a red circle"), encode_prompt(h.clip, "")
    sig = sigmas_for(h.model.sampling, "normal", 3, 1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def run(model):
        return sample(model, 1, 5.0, "euler", sig, pos, neg, latent)["samples"]

    base = run(h.model)
    identity = LO.LatentApplyOperationCFG().run(model=h.model, operation=LO.Sharpen(2, 1.0, 0.0))
    assert torch.allclose(run(identity), base, atol=1e-5)
    tamed = LO.LatentApplyOperationCFG().run(model=h.model, operation=LO.TonemapReinhard(0.2))
    assert (run(tamed) - base).abs().mean() > 0.05 * base.abs().mean()


def test_tiled_nodes_in_a_graph_report_progress_per_tile(world):
    from kiln.engine.events import Progress

    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 192, "batch_size": 1}},
        "3": {
            "class_type": "VAEDecodeTiled",
            "inputs": {"samples": ["2", 0], "vae": ["1", 2], "tile_size": 64, "overlap": 32},
        },
        "4": {
            "class_type": "VAEEncodeTiled",
            "inputs": {"pixels": ["3", 0], "vae": ["1", 2], "tile_size": 64, "overlap": 32},
        },
    }
    events: list = []
    res = world.run(g, ["3", "4"], sink=events.append)
    assert res.status == "success", res.error
    assert res.values["3"][0].shape == (1, 192, 128, 3) and res.values["4"][0]["samples"].shape == (1, 4, 24, 16)
    ticks = [e for e in events if isinstance(e, Progress) and e.node == "3"]
    # overlap 32 > 64 / 4 is cut to 16 px = 2 latents; latent 24x16 in 8x8 tiles: 4x3, in 4x16: 11x1, in 16x4: 2x7
    assert len(ticks) == 12 + 11 + 14 and ticks[-1].value == ticks[-1].max == 37
