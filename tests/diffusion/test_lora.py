"""LoRA: both file formats, exact on/off, strength, stacking, the base never mutated, wrong-architecture errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

BASE = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 3,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["1", 0],
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent_image": ["4", 0],
        },
    },
}


def _with_loras(*loras, model_only=False):
    g = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in BASE.items()}
    model, clip = ["1", 0], ["1", 1]
    for i, (name, sm, *rest) in enumerate(loras):
        sc = rest[0] if rest else 0.0
        nid = f"L{i}"
        if model_only:
            g[nid] = {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": model, "lora_name": name, "strength_model": sm},
            }
            model = [nid, 0]
        else:
            g[nid] = {
                "class_type": "LoraLoader",
                "inputs": {"model": model, "clip": clip, "lora_name": name, "strength_model": sm, "strength_clip": sc},
            }
            model, clip = [nid, 0], [nid, 1]
    g["5"]["inputs"]["model"] = model
    g["2"]["inputs"]["clip"] = clip
    g["3"]["inputs"]["clip"] = clip
    return g


def _latent(world, graph, ex=None):
    res = world.run(graph, ["5"], ex)
    assert res.status == "success", res.error
    return res.values["5"][0]["samples"]


@pytest.fixture(scope="module")
def ex(world):
    return world.executor(cache="none")


@pytest.fixture(scope="module")
def plain(world, ex):
    return _latent(world, _with_loras(), ex)


def test_lora_changes_output_and_removing_it_is_bit_identical(world, ex, plain):
    base_weights = {k: v.clone() for k, v in _unet(world).state_dict().items()}
    with_lora = _latent(world, _with_loras(("a_kohya.safetensors", 1.0, 1.0)), ex)
    assert not torch.allclose(with_lora, plain)
    after = _latent(world, _with_loras(), ex)
    assert torch.equal(after, plain)
    now = _unet(world).state_dict()
    assert all(torch.equal(now[k], v) for k, v in base_weights.items())  # the cached base was never changed


def _unet(world):
    from kiln.nodes.loaders import load_checkpoint_handles

    return load_checkpoint_handles(world.ckpt, "tiny").model.unet


def test_strength_zero_equals_no_lora(world, ex, plain):
    assert torch.equal(_latent(world, _with_loras(("a_kohya.safetensors", 0.0, 0.0)), ex), plain)
    assert torch.equal(_latent(world, _with_loras(("a_kohya.safetensors", 0.0), model_only=True), ex), plain)


def test_kohya_and_diffusers_formats_agree(world, ex):
    a = _latent(world, _with_loras(("a_kohya.safetensors", 0.7, 0.7)), ex)
    b = _latent(world, _with_loras(("a_diffusers.safetensors", 0.7, 0.7)), ex)
    assert torch.allclose(a, b, atol=1e-4)


def test_patched_weights_are_base_plus_scaled_delta(world):
    from kiln import engine
    from kiln.nodes.loaders import _lora_patches, load_checkpoint_handles

    h = load_checkpoint_handles(world.ckpt, "tiny")
    with engine.use_folders(engine.Folders(world.base)):
        mp, cp = _lora_patches("a_kohya.safetensors", h.model, h.clip, 0.5, 1.0)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up, alpha = world.lora_a[("unet", name)]
    base = dict(h.model.unet.named_parameters())[name + ".weight"].detach().clone()
    m = h.model.with_patch(mp)
    with m.patched() as unet:
        patched = dict(unet.named_parameters())[name + ".weight"].detach().clone()
    expect = base + 0.5 * (alpha / down.shape[0]) * (up @ down)
    assert torch.allclose(patched, expect, atol=1e-6)
    assert torch.equal(dict(h.model.unet.named_parameters())[name + ".weight"], base)
    assert cp is not None and "0.encoder.layers.0.self_attn.q_proj.weight" in cp.deltas, list(cp.deltas)[:3]


def test_two_loras_stack(world, ex, plain):
    a = _latent(world, _with_loras(("a_kohya.safetensors", 1.0, 1.0)), ex)
    b = _latent(world, _with_loras(("b_kohya.safetensors", 1.0, 1.0)), ex)
    ab = _latent(world, _with_loras(("a_kohya.safetensors", 1.0, 1.0), ("b_kohya.safetensors", 1.0, 1.0)), ex)
    ba = _latent(world, _with_loras(("b_kohya.safetensors", 1.0, 1.0), ("a_kohya.safetensors", 1.0, 1.0)), ex)
    assert not torch.allclose(ab, a) and not torch.allclose(ab, b)
    assert torch.allclose(ab, ba, atol=1e-4)
    assert torch.equal(_latent(world, _with_loras(), ex), plain)


def test_model_only_leaves_the_text_encoder_alone(world, ex):
    g = _with_loras(("a_kohya.safetensors", 1.0), model_only=True)
    res = world.run(g, ["2", "5"], ex)
    plain_cond = world.run(_with_loras(), ["2"], ex).values["2"][0]
    assert torch.equal(res.values["2"][0][0][0], plain_cond[0][0])


def test_lora_for_another_architecture_lists_the_keys(world, ex):
    save_file(
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
            "lora_unet_something_sdxl_only.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_something_sdxl_only.lora_up.weight": torch.zeros(8, 4),
        },
        str(world.models / "loras" / "xl_style.safetensors"),
    )
    res = world.run(_with_loras(("xl_style.safetensors", 1.0, 1.0)), ["5"], ex)
    assert res.status == "error"
    msg = res.error.message
    assert "lora_unet_something_sdxl_only" in msg and "lora_name" in str(res.error)


def test_lora_with_wrong_shapes_is_an_error(world, ex):
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(
                4, 320
            ),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        },
        str(world.models / "loras" / "sd15_real.safetensors"),
    )
    res = world.run(_with_loras(("sd15_real.safetensors", 1.0, 1.0)), ["5"], ex)
    assert res.status == "error" and "another model architecture" in str(res.error)
