"""LoRA export (kohya names) reproduces peft's output when merged; ControlNet file round-trips."""

import pytest
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


def test_a_kohya_lora_loads_back_into_peft_layers_to_train_on():
    from peft import LoraConfig, inject_adapter_in_model

    def injected():
        torch.manual_seed(0)
        return inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, target_modules=lora.TARGETS), models.build_unet(TINY_UNET)
        ).eval()

    trained = injected()
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    sd = lora.kohya_state_dict(trained, rank=4, alpha=4)
    fresh = injected()
    lora.load_kohya_into_peft(fresh, sd)
    back = lora.kohya_state_dict(fresh, rank=4, alpha=4)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    x, t, c = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c).sample, trained(x, t, c).sample)
    # a file written with alpha != rank (strength 1 applies alpha / rank times the update) loads as the same
    # update: the scale is folded into the up weights, as merging the file into the UNet applies it
    stronger = {k: (torch.tensor(6.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    scaled = injected()
    lora.load_kohya_into_peft(scaled, stronger)
    torch.manual_seed(0)
    merged = models.build_unet(TINY_UNET).eval()
    lora.apply_kohya(merged, stronger, strength=1.0)
    with torch.no_grad():
        want, got = merged(x, t, c).sample, scaled(x, t, c).sample
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, trained(x, t, c).sample, atol=1e-3)
    other_rank = {k: (v[:2] if k.endswith("lora_down.weight") else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="rank"):
        lora.load_kohya_into_peft(injected(), other_rank)
    # layers the file lacks (a grown UNet's new blocks) start fresh: no update until trained
    partial = injected()
    missing = lora.load_kohya_into_peft(partial, {k: v for k, v in sd.items() if "down_blocks_0" not in k})
    assert missing and all(m.startswith("lora_unet_down_blocks_0") for m in missing)
    got = lora.kohya_state_dict(partial, rank=4, alpha=4)
    assert all(torch.equal(got[k], sd[k]) for k in sd if "down_blocks_0" not in k)
    assert all(not got[f"{m}.lora_up.weight"].any() for m in missing)
    with pytest.raises(ValueError, match="modules"):
        lora.load_kohya_into_peft(injected(), {**sd, "lora_unet_extra.alpha": torch.tensor(4.0)})


def test_the_pixel_term_can_weigh_the_hollow_inside_an_outline_up():
    from kiln.training import data, scenes as sc, train

    scene = next(s for s in (sc.make_scene(i) for i in range(50)) if s.objects[0].size == "large")
    foot, target = (data.to_tensor([sc.render(scene, style)]) for style in ("filled", "outline"))
    plain, heavy = lora.outline_weight(foot, target), lora.outline_weight(foot, target, 4.0)
    assert torch.equal(plain, train.fg_weight(foot))  # the default: the footprint, stroke and inside alike
    inside = heavy > plain
    assert inside.any() and torch.all(heavy[inside] == 4.0 * train.FG_WEIGHT)
    stroke = train.fg_weight(target) > 1.0
    assert not (inside & stroke).any() and torch.equal(heavy[~inside], plain[~inside])
    assert not (inside & (plain == 1.0)).any()  # only inside the footprint


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
