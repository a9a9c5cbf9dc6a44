"""A checkpoint is described by its weights: UNet, VAE and text-encoder sizes are read from tensor
shapes, so files without Kiln metadata and with unusual shapes load and compute exactly as built."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    build_plain_sd1,
    build_plain_sdxl,
    plain_unet_config,
    write_sd15_layout_without_metadata,
    write_sdxl_ldm,
)

from kiln.nodes.sd import model_detection
from kiln.nodes.sd.checkpoint import TensorFile, load_checkpoint


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def _unet_out(unet, cross: int, seed: int = 0, added=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, cross, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample


@pytest.mark.parametrize(
    "levels, attention",
    [(1, (True,)), (2, (True, False)), (2, (False, True))],
    ids=["one-level", "two-level-attn-first", "two-level-attn-last"],
)
def test_sd1_layout_of_any_depth_loads_and_computes_as_built(tmp_path, levels, attention):
    comps = build_plain_sd1(plain_unet_config(levels, attention))
    path = write_sd15_layout_without_metadata(tmp_path / "m.safetensors", comps)
    loaded = load_checkpoint(path, torch.float32, torch.device("cpu"))
    unet, vae, te, _ = comps
    assert loaded.family == "sd15"
    cfg = loaded.unet_config
    assert cfg["block_out_channels"] == [32 * (i + 1) for i in range(levels)]
    assert cfg["down_block_types"] == list(unet.config.down_block_types)
    assert cfg["cross_attention_dim"] == 64 and cfg["layers_per_block"] == 1
    _same_weights(loaded.unet, unet)
    _same_weights(loaded.vae, vae)
    _same_weights(loaded.text_encoders[0], te)
    assert torch.equal(_unet_out(loaded.unet, 64), _unet_out(unet, 64))
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded.text_encoders[0](ids).last_hidden_state, te(ids).last_hidden_state)
        img = torch.rand(1, 3, 16, 16)
        assert torch.equal(loaded.vae.encode(img).latent_dist.mean, vae.encode(img).latent_dist.mean)


def test_sdxl_layout_infers_two_encoders_and_added_time_embedding(tmp_path):
    comps = build_plain_sdxl()
    path = write_sdxl_ldm(tmp_path / "xl.safetensors", comps)
    loaded = load_checkpoint(path, torch.float32, torch.device("cpu"))
    unet, vae, te1, te2, _ = comps
    assert loaded.family == "sdxl" and len(loaded.text_encoders) == 2
    cfg = loaded.unet_config
    assert cfg["addition_embed_type"] == "text_time" and cfg["addition_time_embed_dim"] == 8
    assert cfg["use_linear_projection"] is True and cfg["cross_attention_dim"] == 128
    _same_weights(loaded.unet, unet)
    _same_weights(loaded.vae, vae)
    _same_weights(loaded.text_encoders[0], te1)
    _same_weights(loaded.text_encoders[1], te2)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    assert torch.equal(_unet_out(loaded.unet, 128, added=added), _unet_out(unet, 128, added=added))


def test_unet_config_reads_levels_depths_and_channels_from_shapes(tmp_path):
    cfg = plain_unet_config(3, (True, False, True), layers_per_block=2, transformer_layers_per_block=[2, 1, 3])
    comps = build_plain_sd1(cfg)
    path = write_sd15_layout_without_metadata(tmp_path / "deep.safetensors", comps)
    shapes = TensorFile(path).shapes
    got = model_detection.unet_config_from_ldm(shapes, {"norm_num_groups": 32})
    assert got["block_out_channels"] == [32, 64, 96]
    assert got["layers_per_block"] == 2
    assert got["transformer_layers_per_block"][0] == 2 and got["transformer_layers_per_block"][2] == 3
    assert got["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert got["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
    assert got["in_channels"] == 4 and got["use_linear_projection"] is False
    vae = model_detection.vae_config_from_ldm(shapes, {})
    assert vae["block_out_channels"] == [32, 32] and vae["latent_channels"] == 4
    te = model_detection.text_config_from_transformers(shapes, {}, "cond_stage_model.transformer.")
    assert (te["hidden_size"], te["num_hidden_layers"]) == (64, 2)
    assert (te["vocab_size"], te["intermediate_size"]) == (49408, 128)


def test_norm_groups_fall_back_to_a_divisor():
    assert model_detection.norm_groups([320, 640], 32) == 32
    assert model_detection.norm_groups([8, 16], 32) == 8
    assert model_detection.sdxl_time_embed_dim(2816, 1280) == 256
    assert model_detection.sdxl_time_embed_dim(80, 32) == 8
