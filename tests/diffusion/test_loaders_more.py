"""UNETLoader, CLIPLoader, DualCLIPLoader, CheckpointLoader, DiffusersLoader, DiffControlNetLoader and
HypernetworkLoader: what each loads, and the errors that name the input to fix."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file
from tiny_models import write_hypernetwork, write_tiny_sdxl_folder

from kiln.nodes.sd import ldm_keys


def _ckpt(name="tiny.safetensors"):
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def _sample(model_ref, clip_ref=("4", 1)) -> dict:
    return {
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": list(clip_ref)}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": list(clip_ref)}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 3,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": list(model_ref),
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
    }


def test_clip_loader_refuses_types_kiln_cannot_run(world):
    (world.models / "text_encoders").mkdir(exist_ok=True)
    for n in ("x", "a", "b"):
        (world.models / "text_encoders" / f"{n}.safetensors").write_bytes(b"")
    g = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "x.safetensors", "type": "sd3"}}}
    res = world.run(g, ["1"])
    assert res.status == "error"
    assert "'sd3'" in res.error.message and "type" in res.error.message
    g = {
        "1": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": "a.safetensors", "clip_name2": "b.safetensors", "type": "flux"},
        }
    }
    res = world.run(g, ["1"])
    assert res.status == "error" and "'flux'" in res.error.message


def test_dual_clip_loader_builds_sdxl_clip_from_two_files(world):
    write_tiny_sdxl_folder(world.models / "checkpoints" / "xl_for_dual")
    g = {
        "4": _ckpt("xl_for_dual"),
        "1": {"class_type": "CLIPSave", "inputs": {"clip": ["4", 1], "filename_prefix": "clip/xl"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
    }
    res = world.run(g, ["1", "6"])
    assert res.status == "success", res.error
    te = world.models / "text_encoders"
    te.mkdir(exist_ok=True)
    for part in ("clip_l", "clip_g"):
        shutil.copy(world.base / "output" / "clip" / f"xl_{part}_00001_.safetensors", te / f"xl_{part}.safetensors")
    g2 = {
        "1": {
            "class_type": "DualCLIPLoader",  # G first: the loader puts them in SDXL's order
            "inputs": {"clip_name1": "xl_clip_g.safetensors", "clip_name2": "xl_clip_l.safetensors", "type": "sdxl"},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 0]}},
    }
    r = world.run(g2, ["1", "6"])
    assert r.status == "success", r.error
    assert r.values["1"][0].family == "sdxl"
    a, b = r.values["6"][0][0], res.values["6"][0][0]
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1]["pooled_output"], b[1]["pooled_output"], atol=1e-6)


def test_unet_loader_reads_legacy_folder_and_rounds_through_fp8(world):
    unet = world.models / "unet"
    unet.mkdir(exist_ok=True)
    res = world.run(
        {"4": _ckpt(), "1": {"class_type": "ModelSave", "inputs": {"model": ["4", 0], "filename_prefix": "u/m"}}},
        ["4", "1"],
    )
    assert res.status == "success", res.error
    shutil.copy(world.base / "output" / "u" / "m_00001_.safetensors", unet / "legacy.safetensors")
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "legacy.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "legacy.safetensors", "weight_dtype": "fp8_e4m3fn"}},
    }
    r = world.run(g, ["1", "2"])
    assert r.status == "success", r.error
    base = res.values["4"][0].unet.conv_in.weight
    w = r.values["2"][0].unet.conv_in.weight
    assert torch.equal(r.values["1"][0].unet.conv_in.weight, base)
    assert not torch.equal(w, base) and torch.equal(w, w.to(torch.float8_e4m3fn).float())
    (unet / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "broken.safetensors", "weight_dtype": "default"}}}
    r = world.run(g, ["1"])
    assert r.status == "error" and "unet_name" in r.error.message


def test_checkpoint_loader_with_config_sets_clip_skip(world):
    cfg = world.models / "configs"
    cfg.mkdir(exist_ok=True)
    (cfg / "skip2.yaml").write_text(
        "model:\n  params:\n    cond_stage_config:\n      params:\n        layer: penultimate\n"
    )
    g = {
        "1": {
            "class_type": "CheckpointLoader",
            "inputs": {"config_name": "skip2.yaml", "ckpt_name": "tiny.safetensors"},
        }
    }
    r = world.run(g, ["1"])
    assert r.status == "success", r.error
    assert r.values["1"][1].layer == -2


def test_diffusers_loader_reads_models_diffusers(world):
    dst = world.models / "diffusers" / "tiny_d"
    if not dst.exists():
        shutil.copytree(world.folder, dst)
    r = world.run({"1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "tiny_d"}}}, ["1"])
    assert r.status == "success", r.error
    sa, sb = r.values["1"][0].unet.state_dict(), world.comps[0].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_diff_controlnet_adds_the_model_weights(world):
    unet = world.comps[0]
    full = world.models / "controlnet" / "tiny_cn_ldm.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(full))
    base = {k[len(ldm_keys.UNET_PREFIX) :]: v for k, v in _unet_ldm(unet).items()}
    diff = {}
    for k, v in sd.items():
        rest = k[len("control_model.") :]
        diff[k] = (v - base[rest]).contiguous() if rest in base and base[rest].shape == v.shape else v
    diff["difference"] = torch.tensor([])
    save_file(diff, str(world.models / "controlnet" / "tiny_cn_diff.safetensors"))
    g = {
        "4": _ckpt(),
        "1": {
            "class_type": "DiffControlNetLoader",
            "inputs": {"model": ["4", 0], "control_net_name": "tiny_cn_diff.safetensors"},
        },
        "2": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny_cn_ldm.safetensors"}},
    }
    r = world.run(g, ["1", "2"])
    assert r.status == "success", r.error
    a, b = r.values["1"][0].model.state_dict(), r.values["2"][0].model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def _unet_ldm(unet):
    from kiln.nodes.sd.checkpoint import unet_ldm_state_dict

    return unet_ldm_state_dict(unet)


def test_hypernetwork_changes_attention_keys_and_values_only_while_sampling(world):
    hn = world.models / "hypernetworks"
    hn.mkdir(exist_ok=True)
    write_hypernetwork(hn / "tiny_hn.pt", (32,))
    write_hypernetwork(hn / "other.pt", (320, 768))

    def graph(strength):
        g = {"4": _ckpt(), **_sample(("1", 0))}
        g["1"] = {
            "class_type": "HypernetworkLoader",
            "inputs": {"model": ["4", 0], "hypernetwork_name": "tiny_hn.pt", "strength": strength},
        }
        return g

    plain = world.run({"4": _ckpt(), **_sample(("4", 0))}, ["3"])
    zero = world.run(graph(0.0), ["3"])
    one = world.run(graph(1.0), ["3", "1"])
    assert one.status == "success", one.error
    s = lambda r: r.values["3"][0]["samples"]  # noqa: E731
    assert torch.equal(s(zero), s(plain))
    assert not torch.allclose(s(one), s(plain))
    again = world.run({"4": _ckpt(), **_sample(("4", 0))}, ["3"])
    assert torch.equal(s(again), s(plain))  # the hooks are gone after the run
    # the hook adds strength * net(x) to to_k / to_v inputs, as ComfyUI's attn1/attn2 patch does
    patch = one.values["1"][0].model_patches[-1]
    attn = world.comps[0].down_blocks[0].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(1, 5, 32)
    with torch.no_grad(), patch.installed(world.comps[0]):
        k = attn.to_k(x)
    with torch.no_grad():
        assert torch.allclose(k, attn.to_k(x + patch.nets[32][0](x)), atol=1e-6)
    bad = graph(1.0)
    bad["1"]["inputs"]["hypernetwork_name"] = "other.pt"
    r = world.run(bad, ["3"])
    assert r.status == "error" and "hypernetwork_name" in r.error.message


def test_clip_l_with_identity_projection_loads_as_plain_clip_l(world, tmp_path):
    from kiln.nodes.sd.checkpoint import TextEncoderFile, clip_state_dict, load_text_encoder_file

    te = world.comps[2]
    sd = clip_state_dict(te)
    sd["text_projection.weight"] = torch.eye(te.config.hidden_size)  # as ComfyUI stores every CLIP-L
    from kiln.nodes.sd.tokenizer import tokenizer_to_text

    vocab, merges = tokenizer_to_text(world.comps[3])
    save_file(
        {k: v.contiguous() for k, v in sd.items()},
        str(tmp_path / "clip_l.safetensors"),
        metadata={"kiln.tokenizer_vocab": vocab, "kiln.tokenizer_merges": merges},
    )
    got = load_text_encoder_file(tmp_path / "clip_l.safetensors", torch.float32, torch.device("cpu"))
    assert isinstance(got, TextEncoderFile) and not got.projection
    assert type(got.model).__name__ == "CLIPTextModel"
    a, b = got.model.state_dict(), te.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if not k.endswith("position_ids"))
