"""SDXL-architecture models (two text encoders, added time conditioning), standalone VAEs, batches,
transformers image-classification safety models."""

from __future__ import annotations

import json

import torch
from tiny_models import write_tiny_sdxl_folder, write_vae_file


def _txt2img(ckpt, batch=1, vae=None):
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.2) circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 3,
                "cfg": 5.0,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae or ["4", 2]}},
    }
    if vae:
        g["9"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_vae.safetensors"}}
        g["8"]["inputs"]["vae"] = ["9", 0]
    return g


def test_sdxl_architecture_runs(world):
    write_tiny_sdxl_folder(world.models / "checkpoints" / "tiny_xl")
    res = world.run(_txt2img("tiny_xl"), ["6", "8"])
    assert res.status == "success", res.error
    cond, opts = res.values["6"][0][0]
    assert cond.shape == (1, 77, 64)  # both encoders' hidden states side by side
    assert opts["pooled_output"].shape == (1, 32)
    assert res.values["8"][0].shape == (1, 64, 64, 3)


def test_sdxl_single_file_loads_every_weight(world, monkeypatch, tmp_path):
    """The SDXL LDM path (label_emb, CLIP-L, OpenCLIP-G with fused attention), with the shipped full-size
    configs swapped for tiny ones so the file stays small."""
    from tiny_models import (
        SCHEDULER_CONFIG,
        SDXL_UNET_CONFIG,
        VAE_CONFIG,
        build_tiny_sdxl,
        sdxl_te2_config,
        text_config,
        write_sdxl_ldm,
    )

    from kiln.nodes.sd import checkpoint

    comps = build_tiny_sdxl(seed=5)
    path = write_sdxl_ldm(tmp_path / "xl.safetensors", comps)
    unet, vae, te1, te2, tok = comps
    tiny = {
        "unet": SDXL_UNET_CONFIG,
        "vae": VAE_CONFIG,
        "text_encoder": text_config(len(tok)),
        "text_encoder_2": sdxl_te2_config(len(tok)),
        "scheduler": SCHEDULER_CONFIG,
    }
    monkeypatch.setattr(checkpoint, "shipped_config", lambda family, part: dict(tiny[part]))
    monkeypatch.setattr(checkpoint, "make_tokenizer", lambda **kw: tok)
    c = checkpoint.load_checkpoint(path, torch.float32, torch.device("cpu"))
    assert c.family == "sdxl" and len(c.text_encoders) == 2
    for a, b in ((c.unet, unet), (c.vae, vae), (c.text_encoders[0], te1), (c.text_encoders[1], te2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb)


def test_vae_loader_reads_a_bare_ldm_vae(world):
    (world.models / "vae").mkdir(exist_ok=True)
    write_vae_file(world.models / "vae" / "tiny_vae.safetensors", world.comps[1])
    a = world.run(_txt2img("tiny.safetensors"), ["8"]).values["8"][0]
    res = world.run(_txt2img("tiny.safetensors", vae=True), ["8"])
    assert res.status == "success", res.error
    assert torch.equal(res.values["8"][0], a)


def test_vae_loader_rejects_a_lora(world):
    (world.models / "vae").mkdir(exist_ok=True)
    (world.models / "vae" / "lora_here.safetensors").write_bytes(
        (world.models / "loras" / "a_kohya.safetensors").read_bytes()
    )
    g = {"9": {"class_type": "VAELoader", "inputs": {"vae_name": "lora_here.safetensors"}}}
    res = world.run(g, ["9"])
    assert res.status == "error" and "not a VAE" in res.error.message


def test_batches_get_different_noise(world):
    res = world.run(_txt2img("tiny.safetensors", batch=2), ["3"])
    s = res.values["3"][0]["samples"]
    assert s.shape[0] == 2 and not torch.allclose(s[0], s[1])


def test_transformers_classifier_as_safety_model(world):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    m = ViTForImageClassification(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
            id2label={0: "normal", 1: "nsfw"},
            label2id={"normal": 0, "nsfw": 1},
        )
    )
    with torch.no_grad():
        m.classifier.bias.copy_(torch.tensor([0.0, 20.0]))  # forced: everything is "nsfw"
    m.save_pretrained(world.models / "safety" / "vit_nsfw")
    g = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "1": {
            "class_type": "ImageSafetyCheck",
            "inputs": {"images": ["10", 0], "model_name": "vit_nsfw", "action": "block"},
        },
    }
    res = world.run(g, ["1"])
    assert res.status == "success", res.error
    images, report = res.values["1"]
    r = json.loads(report)[0]
    assert r["flagged"] and r["score"] > 0.99 and r["action"] == "blocked" and images.abs().max() == 0
