"""CheckpointSave / CLIPSave / VAESave / ModelSave: LDM-layout files with ComfyUI's metadata that load
back bit for bit, with LoRAs applied."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open

from kiln.nodes.sd import ldm_keys


def _txt2img(ckpt_node: dict, lora: str | None = None) -> dict:
    g = {
        "4": ckpt_node,
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 3,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }
    if lora:
        g["10"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["4", 0],
                "clip": ["4", 1],
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
        g["3"]["inputs"]["model"] = ["10", 0]
        for n in ("6", "7"):
            g[n]["inputs"]["clip"] = ["10", 1]
    return g


def _ckpt(name: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def _save(world, prefix: str, lora: str | None = None, prompt=None):
    g = _txt2img(_ckpt("tiny.safetensors"), lora)
    src = ["10", 0] if lora else ["4", 0]
    clip = ["10", 1] if lora else ["4", 1]
    g["20"] = {
        "class_type": "CheckpointSave",
        "inputs": {"model": src, "clip": clip, "vae": ["4", 2], "filename_prefix": prefix},
    }
    res = world.run(g, ["20", "8"], extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    assert res.status == "success", res.error
    return res


def test_checkpoint_save_round_trips_bit_for_bit(world):
    res = _save(world, "checkpoints/rt")
    out = world.base / "output" / "checkpoints" / "rt_00001_.safetensors"
    assert out.is_file()
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # the LDM layout every SD1 loader reads
    assert ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight" in keys
    assert ldm_keys.VAE_PREFIX + "encoder.conv_in.weight" in keys
    assert any(k.startswith(ldm_keys.CLIP_PREFIX + "text_model.") for k in keys)
    assert json.loads(meta["prompt"])["20"]["class_type"] == "CheckpointSave"
    assert json.loads(meta["workflow"]) == {"nodes": []}
    shutil.copy(out, world.models / "checkpoints" / "rt_copy.safetensors")
    again = world.run(_txt2img(_ckpt("rt_copy.safetensors")), ["8"])
    assert again.status == "success", again.error
    assert torch.equal(again.values["8"][0], res.values["8"][0])
    _save(world, "checkpoints/rt")  # ComfyUI's counter: the next number, nothing overwritten
    assert (world.base / "output" / "checkpoints" / "rt_00002_.safetensors").is_file()
    assert not list((world.base / "output" / "checkpoints").glob("*.tmp"))


def test_lora_patched_save_equals_the_patched_model(world):
    res = _save(world, "checkpoints/merged", lora="a_kohya.safetensors")
    out = world.base / "output" / "checkpoints" / "merged_00001_.safetensors"
    shutil.copy(out, world.models / "checkpoints" / "merged_copy.safetensors")
    again = world.run(_txt2img(_ckpt("merged_copy.safetensors")), ["8"])
    assert again.status == "success", again.error
    plain = world.run(_txt2img(_ckpt("tiny.safetensors")), ["8"])
    assert torch.equal(again.values["8"][0], res.values["8"][0])  # the LoRA graph's image
    assert not torch.equal(again.values["8"][0], plain.values["8"][0])


def test_model_vae_and_clip_savers_reload_in_their_loaders(world):
    g = {
        "4": _ckpt("tiny.safetensors"),
        "1": {"class_type": "ModelSave", "inputs": {"model": ["4", 0], "filename_prefix": "diffusion_models/part"}},
        "2": {"class_type": "VAESave", "inputs": {"vae": ["4", 2], "filename_prefix": "vae/part"}},
        "3": {"class_type": "CLIPSave", "inputs": {"clip": ["4", 1], "filename_prefix": "clip/part"}},
    }
    res = world.run(g, ["1", "2", "3"])
    assert res.status == "success", res.error
    out = world.base / "output"
    for sub, name, dest in (
        ("diffusion_models", "part_00001_.safetensors", "diffusion_models"),
        ("vae", "part_00001_.safetensors", "vae"),
        ("clip", "part_clip_l_00001_.safetensors", "text_encoders"),
    ):
        (world.models / dest).mkdir(exist_ok=True)
        shutil.copy(out / sub / name, world.models / dest / f"saved_{sub}.safetensors")
    with safe_open(str(out / "diffusion_models" / "part_00001_.safetensors"), "pt") as f:
        assert all(k.startswith(ldm_keys.UNET_PREFIX) for k in f.keys())
    with safe_open(str(out / "vae" / "part_00001_.safetensors"), "pt") as f:
        assert "encoder.conv_in.weight" in set(f.keys())
    with safe_open(str(out / "clip" / "part_clip_l_00001_.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt" and all(k.startswith("text_model.") for k in f.keys())
    g2 = {
        "4": _ckpt("tiny.safetensors"),
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "saved_diffusion_models.safetensors", "weight_dtype": "default"},
        },
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "saved_vae.safetensors"}},
        "3": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "saved_clip.safetensors", "type": "stable_diffusion"},
        },
    }
    r = world.run(g2, ["4", "1", "2", "3"])
    assert r.status == "success", r.error
    model, clip, vae = r.values["4"]
    pairs = [
        (r.values["1"][0].unet, model.unet),
        (r.values["2"][0].vae, vae.vae),
        (r.values["3"][0].text_encoders[0], clip.text_encoders[0]),
    ]
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb if not k.endswith("position_ids"))
    assert r.values["1"][0].scheduler_config == model.scheduler_config


def test_filename_prefix_outside_output_is_refused(world):
    g = {
        "4": _ckpt("tiny.safetensors"),
        "1": {"class_type": "VAESave", "inputs": {"vae": ["4", 2], "filename_prefix": "../escape"}},
    }
    res = world.run(g, ["1"])
    assert res.status == "error" and "filename_prefix" in res.error.message


def test_sdxl_checkpoint_save_writes_the_sdxl_layout_and_reloads(world):
    from tiny_models import write_tiny_sdxl_folder

    write_tiny_sdxl_folder(world.models / "checkpoints" / "xl_for_save")
    g = {
        "4": _ckpt("xl_for_save"),
        "1": {
            "class_type": "CheckpointSave",
            "inputs": {"model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2], "filename_prefix": "checkpoints/xl"},
        },
    }
    res = world.run(g, ["4", "1"])
    assert res.status == "success", res.error
    out = world.base / "output" / "checkpoints" / "xl_00001_.safetensors"
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert ldm_keys.UNET_PREFIX + "label_emb.0.0.weight" in keys
    assert ldm_keys.SDXL_CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in keys
    assert any(k.startswith(ldm_keys.SDXL_CLIP_L_PREFIX + "text_model.") for k in keys)
    shutil.copy(out, world.models / "checkpoints" / "xl_copy.safetensors")
    r = world.run({"4": _ckpt("xl_copy.safetensors")}, ["4"])
    assert r.status == "success", r.error
    (m1, c1, v1), (m2, c2, v2) = res.values["4"], r.values["4"]
    assert c2.family == "sdxl" and len(c2.text_encoders) == 2
    for a, b in [(m1.unet, m2.unet), (v1.vae, v2.vae), *zip(c1.text_encoders, c2.text_encoders)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("position_ids"))
