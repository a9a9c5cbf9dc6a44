"""LoRA export (kohya names) reproduces peft's output when merged; ControlNet file round-trips."""

import torch

from kiln.training import controlnet, lora, models

TINY_UNET = {**models.UNET_CONFIG, "block_out_channels": [16, 16, 32], "norm_num_groups": 4, "cross_attention_dim": 32}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 8, 32, generator=g)


def test_kohya_lora_merge_matches_peft_and_unloads_exactly():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = models.build_unet(TINY_UNET).eval()
    torch.manual_seed(0)
    peft_unet = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=lora.TARGETS), models.build_unet(TINY_UNET)
    ).eval()
    with torch.no_grad():
        for n, p in peft_unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # peft initialises B to zero: make the adapter do something
    sd = lora.kohya_state_dict(peft_unet, rank=4, alpha=4)
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert any("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in k for k in sd)
    x, t, c = _inputs()
    with torch.no_grad():
        want = peft_unet(x, t, c).sample
        before = base(x, t, c).sample
        saved = lora.apply_kohya(base, sd, strength=1.0)
        got = base(x, t, c).sample
        lora.unapply(base, saved)
        after = base(x, t, c).sample
    assert (want - before).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(after, before)


def test_controlnet_file_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = models.build_unet(TINY_UNET).eval()
    cn = controlnet.build(unet).eval().half().float()  # the file stores fp16
    path = tmp_path / "cn.safetensors"
    controlnet.save(cn, path)
    back = controlnet.load(path)
    x, t, c = _inputs()
    ctrl = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a = cn(x, t, c, controlnet_cond=ctrl, return_dict=False)
        b = back(x, t, c, controlnet_cond=ctrl, return_dict=False)
    for u, v in zip(a[0], b[0]):
        assert torch.equal(u, v)
    assert a[0][0].shape[-1] == 16  # the conditioning embedding lands on the 16x16 latent grid
