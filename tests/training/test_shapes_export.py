"""The LDM single-file export converts back through diffusers' own converters bit-exactly."""

import json

import torch
from safetensors import safe_open

from kiln.training import export as ex, models

TINY_UNET = {**models.UNET_CONFIG, "block_out_channels": [8, 16, 16], "norm_num_groups": 4, "cross_attention_dim": 32}
TINY_VAE = {**models.VAE_CONFIG, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}
TINY_TEXT = {
    **models.TEXT_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "projection_dim": 32,
}


def _stack(unet_cfg=TINY_UNET):
    torch.manual_seed(0)
    u, v, t = models.build_unet(unet_cfg), models.build_vae(TINY_VAE), models.build_text_encoder(TINY_TEXT)
    return u, v, t


def test_round_trip_is_exact_for_several_layouts():
    variants = [
        TINY_UNET,
        {**TINY_UNET, "layers_per_block": 2},
        {**TINY_UNET, "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3},
        {**TINY_UNET, "transformer_layers_per_block": [1, 2, 1]},  # a grown UNet (training/graft.py)
    ]
    for cfg in variants:
        u, v, t = _stack(cfg)
        ucfg, vcfg = ex._plain(u.config), ex._plain(v.config)
        ldm = ex.to_ldm(u.state_dict(), ucfg, v.state_dict(), vcfg, t.state_dict())
        assert all(k.startswith((ex.UNET_PREFIX, ex.VAE_PREFIX, ex.CLIP_PREFIX + "text_model.")) for k in ldm)
        ex.check_round_trip(ldm, u.state_dict(), ucfg, v.state_dict(), vcfg, t.state_dict())


def test_ldm_names_match_sd15():
    u, v, t = _stack()
    ldm = ex.to_ldm(u.state_dict(), ex._plain(u.config), v.state_dict(), ex._plain(v.config), t.state_dict())
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in ldm, key
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_round_trip_catches_a_wrong_mapping():
    u, v, t = _stack()
    ucfg, vcfg = ex._plain(u.config), ex._plain(v.config)
    ldm = ex.to_ldm(u.state_dict(), ucfg, v.state_dict(), vcfg, t.state_dict())
    a, b = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "model.diffusion_model.out.2.weight"
    ldm[a] = ldm[a] + 1
    try:
        ex.check_round_trip(ldm, u.state_dict(), ucfg, v.state_dict(), vcfg, t.state_dict())
    except AssertionError:
        return
    raise AssertionError(f"a changed tensor ({a}) was not noticed; {b}")


def test_metadata_contract(tmp_path):
    from safetensors.torch import save_file

    from kiln.training import tokenizer as tk

    tk.train_tokenizer(tmp_path / "tok")
    u, v, t = _stack()
    meta = ex.metadata(
        ex._plain(u.config), ex._plain(v.config), ex._plain(t.config), models.SCHEDULER_CONFIG, tmp_path / "tok"
    )
    ldm = ex.to_ldm(u.state_dict(), ex._plain(u.config), v.state_dict(), ex._plain(v.config), t.state_dict())
    save_file(ldm, str(tmp_path / "m.safetensors"), metadata=meta)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        m = f.metadata()
    assert m["kiln.format"] == "1" and m["kiln.model_family"] == "kiln-shapes"
    assert json.loads(m["kiln.scheduler_config"])["clip_sample"] is False
    assert json.loads(m["kiln.vae_config"])["scaling_factor"] > 0
    for k in ("kiln.unet_config", "kiln.text_encoder_config"):
        json.loads(m[k])
    assert m["kiln.tokenizer_merges"].startswith("#version")
    pipe = ex.load_pipeline(tmp_path / "m.safetensors")
    assert torch.equal(pipe.unet.conv_in.weight, u.conv_in.weight)
    ids = pipe.tokenizer(["a small red circle"]).input_ids[0]
    assert len(ids) == 6  # <|startoftext|> + five words + <|endoftext|>: one token per grammar word
