"""Checkpoint formats, detection, the model manager and loader errors."""

from __future__ import annotations

import json

import pytest
import torch

from kiln import engine
from kiln.nodes.sd import ldm_keys
from kiln.nodes.sd.checkpoint import (
    CheckpointError,
    detect_family,
    export_ldm_checkpoint,
    load_checkpoint,
    read_state_dict,
)
from kiln.nodes.sd.manager import ModelManager
from kiln.nodes.sd.tokenizer import make_tokenizer

CPU = torch.device("cpu")


def _graph(ckpt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
    }


def test_ldm_file_roundtrips_every_weight(world):
    c = load_checkpoint(world.ckpt, torch.float32, CPU)
    unet, vae, te, tok = world.comps
    assert c.family == "kiln-shapes"
    for a, b in ((c.unet, unet), (c.vae, vae), (c.text_encoders[0], te)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert c.tokenizers[0]("a red circle").input_ids == tok("a red circle").input_ids
    sd, _ = read_state_dict(world.ckpt)  # the LDM names real SD1.5 files use
    assert f"{ldm_keys.CLIP_PREFIX}text_model.embeddings.token_embedding.weight" in sd
    assert f"{ldm_keys.CLIP_PREFIX}text_model.final_layer_norm.weight" in sd


def test_ldm_key_map_agrees_with_diffusers_converter(world):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd, _ = read_state_dict(world.ckpt)
    unet, vae, _, _ = world.comps
    theirs = convert_ldm_unet_checkpoint(sd, dict(unet.config))
    assert theirs.keys() == unet.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in unet.state_dict().items())
    vae_theirs = convert_ldm_vae_checkpoint(sd, dict(vae.config))
    assert all(torch.equal(vae_theirs[k].reshape(v.shape), v) for k, v in vae.state_dict().items())


def test_vae_attention_maps_to_ldm_convolutions():
    """The tiny test VAE has no mid-block attention; check that part of the map on one that has."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    sd = vae.state_dict()
    ldm = {}
    for k, v in ldm_keys.build_map(sd, ldm_keys.vae_key_to_ldm, ldm_keys.VAE_PREFIX, n_blocks=2).items():
        ldm[v] = sd[k][:, :, None, None] if ldm_keys.is_vae_attn_linear(v) else sd[k]
    assert f"{ldm_keys.VAE_PREFIX}encoder.mid.attn_1.q.weight" in ldm
    theirs = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert all(torch.equal(theirs[k].reshape(v.shape), v) for k, v in sd.items())
    from kiln.nodes.sd.checkpoint import vae_from_ldm

    mine = vae_from_ldm(ldm, dict(vae.config))
    assert all(torch.equal(mine[k], v) for k, v in sd.items())


def test_fp16_export_loads_as_fp32(world, tmp_path):
    unet, vae, te, tok = world.comps
    p = export_ldm_checkpoint(tmp_path / "half.safetensors", unet, vae, te, tok, dtype=torch.float16)
    sd, meta = read_state_dict(p)
    assert meta["kiln.format"] == "1" and json.loads(meta["kiln.text_encoder_config"])["hidden_size"] == 32
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    c = load_checkpoint(p, torch.float32, CPU)
    w = c.unet.conv_in.weight
    assert w.dtype == torch.float32 and torch.allclose(w, unet.conv_in.weight, atol=1e-3)


def test_diffusers_folder_and_single_file_give_the_same_conditioning(world):
    ex = world.executor()
    a = world.run(_graph("tiny.safetensors"), ["2"], ex).values["2"][0]
    b = world.run(_graph("tiny_diffusers"), ["2"], ex).values["2"][0]
    assert torch.equal(a[0][0], b[0][0])


def test_checkpoint_choices_list_files_and_diffusers_folders(world):
    ex = world.executor()
    spec = ex.registry["CheckpointLoaderSimple"]
    with engine.use_folders(engine.Folders(world.base)):
        choices = spec.inputs["ckpt_name"].resolve_choices()
    assert "tiny.safetensors" in choices and "tiny_diffusers" in choices


def test_family_detection_from_keys():
    probe = f"{ldm_keys.UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd15 = {probe: torch.zeros(320, 768), ldm_keys.CLIP_PREFIX + "text_model.x": torch.zeros(1)}
    assert detect_family(sd15) == "sd15"
    sdxl = {f"{ldm_keys.UNET_PREFIX}label_emb.0.0.weight": torch.zeros(1), probe: torch.zeros(640, 2048)}
    assert detect_family(sdxl) == "sdxl"
    with pytest.raises(CheckpointError, match="2.x"):
        detect_family({probe: torch.zeros(320, 1024), "cond_stage_model.model.ln_final.weight": torch.zeros(1)})


def test_open_clip_conversion_splits_fused_attention():
    p = ldm_keys.SDXL_CLIP_G_PREFIX
    w = torch.arange(12.0).reshape(6, 2)
    out = ldm_keys.open_clip_to_transformers(
        {p + "transformer.resblocks.0.attn.in_proj_weight": w, p + "text_projection": torch.ones(2, 3)}, p
    )
    assert torch.equal(out["text_model.encoder.layers.0.self_attn.k_proj.weight"], w[2:4])
    assert out["text_projection.weight"].shape == (3, 2)


def test_standard_clip_tokenizer_ships_offline():
    tok = make_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of an astronaut riding a horse").input_ids == [
        49406,
        320,
        1125,
        539,
        550,
        18376,
        6765,
        320,
        4558,
        49407,
    ]


def test_manager_loads_once_and_evicts_least_recently_used(world, tmp_path):
    m = ModelManager(budget_bytes=10**12, device="cpu", dtype=torch.float32)
    a = m.get("checkpoint", world.ckpt, load_checkpoint)
    assert m.get("checkpoint", world.ckpt, load_checkpoint) is a and m.loads == 1
    m.get("checkpoint", world.folder, load_checkpoint)
    assert m.loads == 2 and len(m) == 2
    n_params = sum(p.numel() for mod in (a.unet, a.vae, *a.text_encoders) for p in mod.parameters())
    assert m.used_bytes >= 2 * 4 * n_params  # both entries are counted, in fp32
    m.budget = 1  # everything is over budget now: only the newest entry stays
    m.get("checkpoint", world.ckpt, load_checkpoint)
    assert len(m) == 1
    # a changed file is a new entry, never a stale hit
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(world.ckpt.read_bytes())
    m.budget = 10**12
    m.get("checkpoint", copy, load_checkpoint)
    n = m.loads
    copy.write_bytes(world.ckpt.read_bytes())
    import os

    os.utime(copy, ns=(1, 1))
    m.get("checkpoint", copy, load_checkpoint)
    assert m.loads == n + 1


def test_second_prompt_loads_nothing(world):
    ex = world.executor(cache="none")
    before = world.manager.loads
    world.run(_graph("tiny.safetensors"), ["2"], ex)
    mid = world.manager.loads
    world.run(_graph("tiny.safetensors"), ["2"], ex)
    assert world.manager.loads == mid and mid - before <= 1


def test_extra_model_paths_yaml_adds_folders(world, tmp_path):
    other = tmp_path / "elsewhere" / "ckpts"
    other.mkdir(parents=True)
    (other / "far.safetensors").write_bytes(world.ckpt.read_bytes())
    (tmp_path / "extra_model_paths.yaml").write_text(
        f"mine:\n  base_path: {tmp_path / 'elsewhere'}\n  checkpoints: ckpts\n"
    )
    ex = world.executor()
    ex.folders = engine.Folders(tmp_path)
    res = world.run(_graph("far.safetensors"), ["2"], ex)
    assert res.status == "success", res.error


# -- errors -----------------------------------------------------------------------------------------------


def _error(world, ckpt: str, folder_file=None):
    res = world.run(_graph(ckpt), ["2"])
    assert res.status == "error"
    return res.error


def test_missing_checkpoint_is_a_validation_error(world):
    with pytest.raises(engine.ValidationFailed) as e:
        world.run(_graph("nope.safetensors"), ["2"])
    errs = e.value.result.problems["1"].issues
    assert errs[0].kind == "value_not_in_list" and errs[0].extra["input_name"] == "ckpt_name"


def test_corrupt_checkpoint_names_the_input(world):
    p = world.models / "checkpoints" / "corrupt.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    err = _error(world, "corrupt.safetensors")
    assert "not a readable safetensors file" in err.message
    assert "ckpt_name" in err.message


def test_unknown_architecture(world, tmp_path):
    from tiny_models import write_sd15_layout_without_metadata

    write_sd15_layout_without_metadata(world.models / "checkpoints" / "nometa.safetensors", world.comps)
    err = _error(world, "nometa.safetensors")
    assert "unknown checkpoint architecture" in err.message


def test_lora_in_checkpoint_folder_says_which_loader(world):
    (world.models / "checkpoints" / "actually_lora.safetensors").write_bytes(
        (world.models / "loras" / "a_kohya.safetensors").read_bytes()
    )
    err = _error(world, "actually_lora.safetensors")
    assert "LoRA" in err.message


def test_outputs_are_cached_until_the_file_changes(world, tmp_path):
    import os

    ckpt = world.models / "checkpoints" / "touch.safetensors"
    ckpt.write_bytes(world.ckpt.read_bytes())
    ex = world.executor()  # default cache
    g = _graph("touch.safetensors")
    first = world.run(g, ["2"], ex)
    again = world.run(g, ["2"], ex)
    assert "2" in again.cached and not again.ran
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = world.run(g, ["2"], ex)
    assert "1" in changed.ran and "2" in changed.ran
    assert torch.equal(changed.values["2"][0][0][0], first.values["2"][0][0][0])
