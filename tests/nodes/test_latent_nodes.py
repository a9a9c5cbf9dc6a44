"""Latent arithmetic, composite, transforms, batches, operations and .latent files (ComfyUI's behaviour).

One file for the LATENT node families (latent_ops, latent_batch, latent_operation, latent_io): they share
the small latent builders at the top, and each section is short.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kiln.engine import NodeError, ValidationFailed, use_folders
from kiln.engine.fingerprint import fingerprint
from kiln.nodes import latent_batch as LB, latent_operation as LO, latent_ops as L
from kiln.nodes.latent_io import LoadLatent, SaveLatent
from kiln.nodes.sd.model_patch import CfgArgs, StepState


def lat(b=1, c=4, h=8, w=8, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(b, c, h, w, generator=g), **extra}


# -- arithmetic ---------------------------------------------------------------------------------------------


def test_add_subtract_multiply_math_and_extra_keys_kept():
    a, b = lat(2, seed=1, batch_index=[5, 6]), lat(2, seed=2)
    out = L.LatentAdd().run(samples1=a, samples2=b)
    assert torch.equal(out["samples"], a["samples"] + b["samples"]) and out["batch_index"] == [5, 6]
    assert torch.equal(L.LatentSubtract().run(samples1=a, samples2=b)["samples"], a["samples"] - b["samples"])
    assert torch.equal(L.LatentMultiply().run(samples=a, multiplier=-2.5)["samples"], a["samples"] * -2.5)
    assert a["samples"].shape == (2, 4, 8, 8)  # inputs untouched


def test_add_repeats_a_single_latent_and_resizes_a_smaller_one():
    a = lat(3, h=8, w=8)
    one = {"samples": torch.ones(1, 4, 4, 4)}
    out = L.LatentAdd().run(samples1=a, samples2=one)["samples"]
    assert out.shape == (3, 4, 8, 8)
    assert torch.allclose(out, a["samples"] + 1)  # constant stays constant through the bilinear resize
    two = {"samples": torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])}
    out = L.LatentAdd().run(samples1=lat(3, seed=0), samples2=two)["samples"]
    assert torch.allclose(out - lat(3, seed=0)["samples"], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1, 1))


def test_channel_mismatch_is_a_node_error_naming_the_input():
    with pytest.raises(NodeError) as e:
        L.LatentAdd().run(samples1=lat(c=4), samples2=lat(c=16))
    assert e.value.input_name == "samples2" and "channels" in str(e.value)
    with pytest.raises(NodeError) as e:
        L.LatentMultiply().run(samples={"samples": torch.zeros(4, 8)}, multiplier=1.0)
    assert e.value.input_name == "samples"


def test_interpolate_mixes_direction_and_length_separately():
    a = torch.zeros(1, 4, 2, 2)
    b = torch.zeros(1, 4, 2, 2)
    a[:, 0] = 2.0  # length 2 along channel 0
    b[:, 1] = 4.0  # length 4 along channel 1
    for ratio in (1.0, 0.0):
        out = L.LatentInterpolate().run(samples1={"samples": a}, samples2={"samples": b}, ratio=ratio)["samples"]
        assert torch.allclose(out, a if ratio == 1.0 else b)
    mid = L.LatentInterpolate().run(samples1={"samples": a}, samples2={"samples": b}, ratio=0.5)["samples"]
    # direction halfway between the unit vectors, length halfway between 2 and 4 (a plain mean would give ~2.24)
    assert torch.allclose(mid.norm(dim=1), torch.full((1, 2, 2), 3.0))
    assert torch.allclose(mid[:, 0], mid[:, 1])


def test_interpolate_works_per_item_of_a_batch():
    a, b = lat(3, seed=1), lat(3, seed=2)
    out = L.LatentInterpolate().run(samples1=a, samples2=b, ratio=0.25)["samples"]
    one = L.LatentInterpolate().run(
        samples1={"samples": a["samples"][1:2]}, samples2={"samples": b["samples"][1:2]}, ratio=0.25
    )["samples"]
    assert torch.allclose(out[1:2], one, atol=1e-6)


def test_blend_weights_and_resizes_samples2():
    a, b = lat(seed=1), lat(seed=2)
    out = L.LatentBlend().run(samples1=a, samples2=b, blend_factor=0.3)["samples"]
    assert torch.allclose(out, a["samples"] * 0.3 + b["samples"] * 0.7)
    small = {"samples": torch.full((1, 4, 4, 4), 2.0)}
    out = L.LatentBlend().run(samples1={"samples": torch.zeros(1, 4, 8, 8)}, samples2=small, blend_factor=0.5)
    assert out["samples"].shape == (1, 4, 8, 8) and torch.allclose(out["samples"], torch.ones(1, 4, 8, 8))
    with pytest.raises(NodeError) as e:
        L.LatentBlend().run(samples1=lat(2), samples2=lat(3), blend_factor=0.5)
    assert e.value.input_name == "samples2"


# -- composite ----------------------------------------------------------------------------------------------


def test_composite_places_source_at_x_y():
    to = {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": torch.ones(1, 1, 64, 64)}
    frm = {"samples": torch.ones(1, 4, 3, 2)}
    out = L.LatentComposite().run(samples_to=to, samples_from=frm, x=16, y=8, feather=0)
    s = out["samples"]
    assert torch.equal(s[:, :, 1:4, 2:4], torch.ones(1, 4, 3, 2))
    assert s.sum() == 4 * 3 * 2  # nothing else touched
    assert "noise_mask" in out and torch.equal(to["samples"], torch.zeros(1, 4, 8, 8))


def test_composite_clamps_to_bounds_like_comfyui():
    to, frm = {"samples": torch.zeros(1, 4, 8, 8)}, {"samples": torch.ones(1, 4, 6, 6)}
    s = L.LatentComposite().run(samples_to=to, samples_from=frm, x=40, y=48, feather=0)["samples"]
    assert s[:, :, 6:, 5:].eq(1).all() and s.sum() == 4 * 2 * 3
    far = L.LatentComposite().run(samples_to=to, samples_from=frm, x=800, y=0, feather=0)["samples"]
    assert torch.equal(far, to["samples"])


def test_composite_feathers_inner_edges_only():
    to, frm = {"samples": torch.zeros(1, 1, 8, 8)}, {"samples": torch.ones(1, 1, 4, 4)}
    s = L.LatentComposite().run(samples_to=to, samples_from=frm, x=16, y=0, feather=16)["samples"][0, 0]
    # feather 16 px = 2 latent rows/columns; the top edge lies on samples_to's border and stays hard
    assert torch.allclose(s[0, 2:6], torch.tensor([0.5, 1.0, 1.0, 0.5]))
    assert torch.allclose(s[:4, 3], torch.tensor([1.0, 1.0, 1.0, 0.5]))
    assert torch.allclose(s[3, 2], torch.tensor(0.25))  # corner: both ramps
    assert s[:, :2].eq(0).all() and s[4:].eq(0).all()


def test_composite_batch_mismatch_is_a_node_error():
    with pytest.raises(NodeError) as e:
        L.LatentComposite().run(samples_to=lat(2), samples_from=lat(3), x=0, y=0, feather=0)
    assert e.value.input_name == "samples_from"


def test_composite_masked_uses_mask_and_repeats_source_batch():
    dst = {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [0, 1]}
    src = {"samples": torch.ones(1, 4, 4, 4)}
    mask = torch.zeros(32, 32)
    mask[:, 16:] = 1.0  # right half of the source only
    out = L.LatentCompositeMasked().run(destination=dst, source=src, x=8, y=8, resize_source=False, mask=mask)
    s = out["samples"]
    assert out["batch_index"] == [0, 1] and s.shape == (2, 4, 8, 8)
    assert s[:, :, 1:5, 3:5].eq(1).all() and s[:, :, 1:5, 1:3].lt(0.5).all()
    assert s[:, :, 5:].eq(0).all() and s[:, :, :1].eq(0).all()
    no_mask = L.LatentCompositeMasked().run(destination=dst, source=src, x=48, y=48, resize_source=False)
    assert no_mask["samples"][:, :, 6:, 6:].eq(1).all() and no_mask["samples"].sum() == 2 * 4 * 4


def test_composite_masked_resize_source_fills_destination():
    dst = {"samples": torch.zeros(1, 4, 8, 8)}
    src = {"samples": torch.full((1, 4, 2, 2), 3.0)}
    out = L.LatentCompositeMasked().run(destination=dst, source=src, x=0, y=0, resize_source=True)
    assert torch.allclose(out["samples"], torch.full((1, 4, 8, 8), 3.0))


# -- transforms ---------------------------------------------------------------------------------------------


def test_flip_and_rotate_move_samples_and_noise_mask_together():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    s = {"samples": x, "noise_mask": x.clone()}
    v = L.LatentFlip().run(samples=s, flip_method="x-axis: vertically")
    assert torch.equal(v["samples"][0, 0], torch.tensor([[3.0, 4, 5], [0, 1, 2]]))
    h = L.LatentFlip().run(samples=s, flip_method="y-axis: horizontally")
    assert torch.equal(h["samples"][0, 0], torch.tensor([[2.0, 1, 0], [5, 4, 3]]))
    r = L.LatentRotate().run(samples=s, rotation="90 degrees")
    assert torch.equal(r["samples"][0, 0], torch.tensor([[3.0, 0], [4, 1], [5, 2]]))  # clockwise
    assert torch.equal(r["noise_mask"], r["samples"])
    assert torch.equal(L.LatentRotate().run(samples=s, rotation="none")["samples"], x)
    r180 = L.LatentRotate().run(samples=s, rotation="180 degrees")["samples"]
    assert torch.equal(r180, torch.flip(x, dims=[2, 3]))
    r270 = L.LatentRotate().run(samples=s, rotation="270 degrees")["samples"]
    assert torch.equal(torch.rot90(r270, k=1, dims=[3, 2]), x)  # 270 + 90 = a full turn


def test_crop_cuts_region_and_clamps_like_comfyui():
    x = torch.arange(16 * 16.0).view(1, 1, 16, 16)
    s = {"samples": x, "noise_mask": torch.arange(128 * 128.0).view(1, 1, 128, 128)}
    out = L.LatentCrop().run(samples=s, width=64, height=64, x=16, y=8)
    assert torch.equal(out["samples"], x[:, :, 1:9, 2:10])
    assert torch.equal(out["noise_mask"], s["noise_mask"][:, :, 8:72, 16:80])
    # x past the end is pulled back so 8 latent columns (64 px) remain
    far = L.LatentCrop().run(samples=s, width=64, height=64, x=4000, y=0)["samples"]
    assert torch.equal(far, x[:, :, 0:8, 8:16])
    big = L.LatentCrop().run(samples=s, width=512, height=512, x=0, y=0)["samples"]
    assert torch.equal(big, x)


# -- batches ------------------------------------------------------------------------------------------------


def test_latent_batch_concatenates_with_batch_index_and_masks():
    a = lat(2, seed=1, batch_index=[7, 8], noise_mask=torch.zeros(2, 1, 64, 64))
    b = {"samples": torch.ones(1, 4, 4, 4)}
    out = LB.LatentBatch().run(samples1=a, samples2=b)
    assert out["samples"].shape == (3, 4, 8, 8) and out["batch_index"] == [7, 8, 0]
    assert torch.allclose(out["samples"][2], torch.ones(4, 8, 8))
    assert out["noise_mask"].shape == (3, 1, 64, 64)
    assert out["noise_mask"][:2].eq(0).all() and out["noise_mask"][2].eq(1).all()


def test_latent_from_batch_picks_items_masks_and_indices():
    s = lat(4, noise_mask=torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8))
    out = LB.LatentFromBatch().run(samples=s, batch_index=1, length=2)
    assert torch.equal(out["samples"], s["samples"][1:3]) and out["batch_index"] == [1, 2]
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    clamp = LB.LatentFromBatch().run(samples=s, batch_index=10, length=5)
    assert clamp["batch_index"] == [3] and torch.equal(clamp["samples"], s["samples"][3:])
    again = LB.LatentFromBatch().run(samples=out, batch_index=1, length=1)
    assert again["batch_index"] == [2]  # the original noise index travels along


def test_repeat_latent_batch_continues_batch_index():
    s = lat(2, batch_index=[3, 4], noise_mask=torch.rand(2, 1, 8, 8))
    out = LB.RepeatLatentBatch().run(samples=s, amount=3)
    assert out["samples"].shape == (6, 4, 8, 8) and torch.equal(out["samples"][4:], s["samples"])
    assert out["batch_index"] == [3, 4, 5, 6, 7, 8]
    assert torch.equal(out["noise_mask"][2:4], s["noise_mask"])
    plain = LB.RepeatLatentBatch().run(samples=lat(1), amount=2)
    assert "batch_index" not in plain and plain["samples"].shape[0] == 2


def test_seed_behavior_fixed_and_random():
    s = lat(3, batch_index=[4, 5, 6])
    fixed = LB.LatentBatchSeedBehavior().run(samples=s, seed_behavior="fixed")
    assert fixed["batch_index"] == [4, 4, 4] and s["batch_index"] == [4, 5, 6]
    assert LB.LatentBatchSeedBehavior().run(samples=lat(2), seed_behavior="fixed")["batch_index"] == [0, 0]
    rnd = LB.LatentBatchSeedBehavior().run(samples=s, seed_behavior="random")
    assert "batch_index" not in rnd and torch.equal(rnd["samples"], s["samples"])


def test_rebatch_splits_and_keeps_batch_index_and_noise_mask():
    m = torch.zeros(3, 1, 64, 64)
    a = lat(3, seed=1, noise_mask=m)
    b = lat(2, seed=2)
    other = lat(1, h=4, w=4, seed=3)
    out = LB.RebatchLatents().run(latents=[a, b, other], batch_size=[2])
    assert [o["samples"].shape[0] for o in out] == [2, 2, 1, 1]
    assert [o["batch_index"] for o in out] == [[0, 1], [2, 3], [4], [5]]
    assert torch.equal(out[1]["samples"], torch.cat([a["samples"][2:], b["samples"][:1]]))
    assert "noise_mask" in out[0] and out[0]["noise_mask"].eq(0).all()
    assert out[1]["noise_mask"][0].eq(0).all() and out[1]["noise_mask"][1].eq(1).all()
    assert "noise_mask" not in out[2] and out[3]["samples"].shape[2:] == (4, 4)  # all-ones masks dropped


def test_rebatch_in_a_graph_outputs_a_list(run_graph):
    g = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 5}},
        "2": {"class_type": "RebatchLatents", "inputs": {"latents": ["1", 0], "batch_size": 2}},
    }
    res = run_graph(g, targets=["2"])
    assert res.status == "success", res.error
    assert [v["batch_index"] for v in res.values["2"][0]] == [[0, 1], [2, 3], [4]]


# -- operations ---------------------------------------------------------------------------------------------


def test_tonemap_keeps_directions_and_compresses_magnitudes():
    op = LO.LatentOperationTonemapReinhard().run(multiplier=1.0)
    x = lat(2, seed=4)["samples"] * 3
    y = LO.LatentApplyOperation().run(samples={"samples": x}, operation=op)["samples"]
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    assert torch.allclose(x / nx[:, None], y / ny[:, None], atol=1e-5)
    assert (ny < nx).all()
    ratio = ny / nx  # the curve x / (1 + x): bigger magnitudes are squeezed more
    order = nx.flatten().argsort()
    assert ratio.flatten()[order[0]] > ratio.flatten()[order[-1]]


def test_sharpen_identity_at_alpha_zero_and_sharpens_otherwise():
    x = lat(1, h=16, w=16, seed=5)["samples"]
    same = LO.LatentOperationSharpen().run(sharpen_radius=3, sigma=1.0, alpha=0.0)(latent=x)
    assert torch.allclose(same, x, atol=1e-5)
    sharp = LO.LatentOperationSharpen().run(sharpen_radius=3, sigma=1.0, alpha=0.5)(latent=x)
    d = x / x.norm(dim=1, keepdim=True)
    ds = sharp / x.norm(dim=1, keepdim=True)
    # unsharp masking moves each direction away from its local average: the differences grow
    assert (ds[..., 1:] - ds[..., :-1]).abs().mean() > (d[..., 1:] - d[..., :-1]).abs().mean()
    small = LO.LatentOperationSharpen().run(sharpen_radius=9, sigma=1.0, alpha=0.1)(latent=lat(1)["samples"])
    assert small.shape == (1, 4, 8, 8) and torch.isfinite(small).all()  # radius beyond the latent: no crash


def test_operations_have_stable_fingerprints():
    a = LO.LatentOperationSharpen().run(sharpen_radius=9, sigma=1.0, alpha=0.1)
    b = LO.LatentOperationSharpen().run(sharpen_radius=9, sigma=1.0, alpha=0.1)
    c = LO.LatentOperationSharpen().run(sharpen_radius=9, sigma=1.0, alpha=0.2)
    assert a == b and fingerprint(a) == fingerprint(b) != fingerprint(c)
    t = LO.LatentOperationTonemapReinhard().run(multiplier=1.0)
    assert fingerprint(t) != fingerprint(a)


class _Model:
    def __init__(self, patches=()):
        self.model_patches = tuple(patches)

    def with_model_patch(self, p):
        return _Model(self.model_patches + (p,))


def _args(cond, uncond, cfg):
    return CfgArgs(
        x=torch.zeros_like(cond),
        sigma=torch.tensor(1.0),
        cond_denoised=cond,
        uncond_denoised=uncond,
        cfg=cfg,
        state=StepState(),
        predict=lambda *a, **k: cond,
    )


def test_apply_operation_cfg_patches_the_guidance():
    op = LO.LatentOperationTonemapReinhard().run(multiplier=0.5)
    base = _Model()
    m = LO.LatentApplyOperationCFG().run(model=base, operation=op)
    assert base.model_patches == () and len(m.model_patches) == 1
    patch = m.model_patches[0]
    cond, uncond = lat(seed=6)["samples"], lat(seed=7)["samples"]
    out = patch.cfg(_args(cond, uncond, 7.0))
    assert torch.allclose(out, uncond + 7.0 * op(latent=cond - uncond), atol=1e-5)
    assert torch.allclose(patch.cfg(_args(cond, None, 1.0)), op(latent=cond))
    ident = LO.LatentApplyOperationCFG().run(
        model=base, operation=LO.LatentOperationSharpen().run(sharpen_radius=2, sigma=1.0, alpha=0.0)
    )
    plain = uncond + 5.0 * (cond - uncond)
    assert torch.allclose(ident.model_patches[0].cfg(_args(cond, uncond, 5.0)), plain, atol=1e-4)
    same = LO.LatentApplyOperationCFG().run(model=base, operation=LO.LatentOperationTonemapReinhard().run(0.5))
    assert same.model_patches[0].token() == patch.token()
    with pytest.raises(NodeError) as e:
        LO.LatentApplyOperationCFG().run(model="nope", operation=op)
    assert e.value.input_name == "model"


# -- .latent files ------------------------------------------------------------------------------------------


def test_save_latent_load_latent_round_trip_bit_for_bit(run_graph, folders):
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(9))
    x[0, 0, 0, 0] = -0.0
    with use_folders(folders):
        res = SaveLatent().run(samples={"samples": x}, filename_prefix="latents/t", prompt={"1": {}})
        assert res.ui == {"latents": [{"filename": "t_00001_.latent", "subfolder": "latents", "type": "output"}]}
        res2 = SaveLatent().run(samples={"samples": x}, filename_prefix="latents/t")
        assert res2.ui["latents"][0]["filename"] == "t_00002_.latent"
        path = folders.output_dir / "latents" / "t_00001_.latent"
        raw = load_file(str(path))
        assert set(raw) == {"latent_tensor", "latent_format_version_0"}  # what ComfyUI reads
        (folders.input_dir / "t.latent").write_bytes(path.read_bytes())
        assert LoadLatent.validate("t.latent") is True and LoadLatent.validate("nope.latent") is not True
        back = LoadLatent().run(latent="t.latent")["samples"]
    assert back.dtype == torch.float32 and torch.equal(back.view(torch.int32), x.view(torch.int32))
    assert sorted(p.name for p in (folders.output_dir / "latents").iterdir()) == ["t_00001_.latent", "t_00002_.latent"]


def test_save_latent_metadata_and_graph_run(run_graph, folders):
    g = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/g"}},
    }
    res = run_graph(g, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    assert res.status == "success", res.error
    assert res.outputs["2"] == {"latents": [{"filename": "g_00001_.latent", "subfolder": "latents", "type": "output"}]}
    with safe_open(str(folders.output_dir / "latents" / "g_00001_.latent"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["prompt"])["2"]["class_type"] == "SaveLatent"
    assert json.loads(meta["workflow"]) == {"nodes": []}


def test_load_latent_lists_files_reads_legacy_scale_and_reports_missing(run_graph, registry, folders):
    save_file({"latent_tensor": torch.ones(1, 4, 2, 2)}, str(folders.input_dir / "old.latent"))
    (folders.input_dir / "not_a_latent.png").write_bytes(b"x")
    with use_folders(folders):
        info = registry.object_info()["LoadLatent"]["input"]["required"]["latent"]
        assert info[0] == ["old.latent"]
    g = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "old.latent"}}}
    res = run_graph(g, targets=["1"])
    assert res.status == "success", res.error
    assert torch.allclose(res.values["1"][0]["samples"], torch.full((1, 4, 2, 2), 1 / 0.18215))
    with pytest.raises(ValidationFailed, match="Invalid latent file: missing.latent"):
        run_graph({"1": {"class_type": "LoadLatent", "inputs": {"latent": "missing.latent"}}}, targets=["1"])
    (folders.input_dir / "broken.latent").write_bytes(b"not safetensors")
    with use_folders(folders), pytest.raises(NodeError) as e:
        LoadLatent().run(latent="broken.latent")
    assert e.value.input_name == "latent"


def test_save_latent_refuses_prefix_outside_output(run_graph):
    g = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "../evil"}},
    }
    res = run_graph(g)
    assert res.status == "error" and "filename_prefix" in res.error.message


def test_operations_travel_through_a_graph_and_cache(registry, folders):
    from kiln.engine import Executor, Graph

    g = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 1.0}},
        "3": {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 1.0}},
        "4": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["2", 0], "operation": ["3", 0]}},
    }
    ex = Executor(registry, folders=folders)
    first = ex.run(Graph.from_json(g), targets=["4"])
    assert first.status == "success", first.error
    assert torch.equal(first.values["4"][0]["samples"], torch.zeros(1, 4, 8, 8))
    again = ex.run(Graph.from_json(g), targets=["4"])
    assert "4" not in again.ran  # same operation settings: served from the cache
    g["3"]["inputs"]["multiplier"] = 2.0
    changed = ex.run(Graph.from_json(g), targets=["4"])
    assert "3" in changed.ran and "4" in changed.ran
