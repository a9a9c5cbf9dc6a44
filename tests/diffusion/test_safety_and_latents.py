"""ImageSafetyCheck with a tiny random checker whose threshold is forced; latent/VAE nodes and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from kiln import engine


def _checker(path, flag_all: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    model = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():  # cosine similarity is in [-1, 1]: a threshold of -2 flags all, +2 flags none
        model.concept_embeds_weights.fill_(-2.0 if flag_all else 2.0)
        model.special_care_embeds_weights.fill_(2.0)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


@pytest.fixture(scope="module")
def checkers(world):
    root = world.models / "safety"
    _checker(root / "flags_all", True)
    _checker(root / "flags_none", False)
    return root


def _run(world, model_name, action):
    g = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "1": {
            "class_type": "ImageSafetyCheck",
            "inputs": {"images": ["10", 0], "model_name": model_name, "action": action},
        },
    }
    res = world.run(g, ["1", "10"])
    assert res.status == "success", res.error
    (images, report), src = res.values["1"], res.values["10"][0]
    return images, json.loads(report), src


def test_flagged_images_are_blocked(world, checkers):
    images, report, src = _run(world, "flags_all", "block")
    assert report == [{"index": 0, "flagged": True, "score": None, "action": "blocked"}]
    assert images.abs().max() == 0


def test_flagged_images_are_blurred_or_passed(world, checkers):
    images, report, src = _run(world, "flags_all", "blur")
    assert report[0]["action"] == "blurred"
    assert images.std() < src.std() and not torch.equal(images, src)
    images, report, src = _run(world, "flags_all", "pass")
    assert report[0]["action"] == "passed" and torch.equal(images, src)


def test_clean_images_pass_untouched(world, checkers):
    images, report, src = _run(world, "flags_none", "block")
    assert report[0]["flagged"] is False and torch.equal(images, src)


def test_missing_safety_model_is_a_validation_error(world, checkers):
    g = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "1": {
            "class_type": "ImageSafetyCheck",
            "inputs": {"images": ["10", 0], "model_name": "nothing_here", "action": "block"},
        },
    }
    with pytest.raises(engine.ValidationFailed) as e:
        world.run(g, ["1"])
    assert e.value.result.problems["1"].issues[0].kind == "value_not_in_list"


# -- latents and the VAE ---------------------------------------------------------------------------------


def _nodes():
    from kiln.nodes import latent

    return latent


def test_empty_latent_shape():
    out = _nodes().EmptyLatentImage().run(width=64, height=32, batch_size=3)
    assert out["samples"].shape == (3, 4, 4, 8) and out["samples"].abs().sum() == 0


def test_latent_upscale_and_by():
    L = _nodes()
    x = {"samples": torch.randn(1, 4, 8, 8)}
    assert L.LatentUpscale().run(samples=x, width=128, height=0)["samples"].shape == (1, 4, 16, 16)
    assert L.LatentUpscale().run(samples=x, width=96, height=64, crop="center")["samples"].shape == (1, 4, 8, 12)
    assert L.LatentUpscaleBy().run(samples=x, upscale_method="bilinear", scale_by=1.5)["samples"].shape == (
        1,
        4,
        12,
        12,
    )


def test_bislerp_keeps_vector_lengths_and_matches_bilinear_on_parallel_vectors():
    L = _nodes()
    x = torch.randn(1, 4, 6, 6)
    out = L.LatentUpscaleBy().run(samples={"samples": x}, upscale_method="bislerp", scale_by=2.0)["samples"]
    assert out.shape == (1, 4, 12, 12) and torch.isfinite(out).all()
    n_in, n_out = x.norm(dim=1), out.norm(dim=1)
    assert n_out.min() >= n_in.min() - 1e-4 and n_out.max() <= n_in.max() + 1e-4
    # when all vectors point the same way, spherical interpolation is plain linear interpolation
    d = torch.tensor([1.0, 2.0, -1.0, 0.5]).reshape(1, 4, 1, 1)
    par = d * (torch.rand(1, 1, 6, 6) + 0.5)
    a = L.LatentUpscale().run(samples={"samples": par}, upscale_method="bislerp", width=96, height=72)["samples"]
    b = L.LatentUpscale().run(samples={"samples": par}, upscale_method="bilinear", width=96, height=72)["samples"]
    assert torch.allclose(a, b, atol=1e-5)


def test_vae_encode_decode_shapes_and_crop(world):
    from kiln.nodes.loaders import load_checkpoint_handles

    L = _nodes()
    vae = load_checkpoint_handles(world.ckpt, "tiny").vae
    img = torch.rand(2, 70, 66, 3)
    lat = L.VAEEncode().run(pixels=img, vae=vae)
    assert lat["samples"].shape == (2, 4, 8, 8)  # centre-cropped to 64x64
    out = L.VAEDecode().run(samples=lat, vae=vae)
    assert out.shape == (2, 64, 64, 3) and 0 <= out.min() and out.max() <= 1


def test_inpaint_encode_greys_the_masked_area_and_grows_the_mask(world):
    from kiln.nodes.loaders import load_checkpoint_handles

    L = _nodes()
    vae = load_checkpoint_handles(world.ckpt, "tiny").vae
    img = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 30:34, 30:34] = 1
    out = L.VAEEncodeForInpaint().run(pixels=img, vae=vae, mask=mask, grow_mask_by=3)
    nm = out["noise_mask"][0, 0]
    assert nm[27:37, 27:37].min() == 1 and nm.sum() == 100
    plain = L.VAEEncode().run(pixels=img, vae=vae)["samples"]
    assert not torch.allclose(out["samples"], plain)


def test_mask_size_mismatch_is_a_node_error(world):
    from kiln.nodes.loaders import load_checkpoint_handles

    L = _nodes()
    vae = load_checkpoint_handles(world.ckpt, "tiny").vae
    with pytest.raises(engine.NodeError) as e:
        L.VAEEncodeForInpaint().run(pixels=torch.rand(1, 64, 64, 3), vae=vae, mask=torch.zeros(1, 32, 48))
    assert e.value.input_name == "mask" and "48x32" in str(e.value)
    with pytest.raises(engine.NodeError) as e:
        L.SetLatentNoiseMask().run(samples={"samples": torch.zeros(1, 4, 8, 8)}, mask=torch.zeros(1, 64, 128))
    assert e.value.input_name == "mask"


def test_set_latent_noise_mask_keeps_samples():
    L = _nodes()
    x = {"samples": torch.randn(1, 4, 8, 8)}
    out = L.SetLatentNoiseMask().run(samples=x, mask=torch.ones(64, 64))
    assert out["samples"] is x["samples"] and out["noise_mask"].shape == (1, 1, 64, 64)
    assert "noise_mask" not in x
