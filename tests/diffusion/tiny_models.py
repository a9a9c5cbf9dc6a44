"""Tiny SD1.5-architecture components with random weights, and writers for every file format Kiln reads.

Nothing here downloads anything: configs are spelled out, the tokenizer is trained on a small corpus
with ``tokenizers``, weights come from a seeded generator.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nodes.sd import ldm_keys as L
from nodes.sd.checkpoint import export_ldm_checkpoint
from nodes.sd.tokenizer import byte_symbols, make_tokenizer

CORPUS = """a photo of a red circle on a blue background
a green square in the top left corner, high quality
an orange triangle at the bottom right of a white canvas
two yellow stars and a purple heart on black
a small cat sitting next to a large dog in a garden
masterpiece best quality detailed painting of mountains at sunset
portrait of an astronaut riding a horse on the moon
""" * 4

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
                  layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
                  mid_block_add_attention=False,  # local receptive field: inpainting is checkable in pixels
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        timestep_spacing="leading")


def train_tokenizer(vocab_size: int = 400):
    """A small CLIP-style BPE (lower-cased words, ``</w>`` word ends) trained on CORPUS."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=[c for c in byte_symbols()[:94]])
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return make_tokenizer(vocab, merges)


def text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def build_components(seed: int = 0, unet_config: dict | None = None):
    """(unet, vae, text_encoder, tokenizer) with random weights from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = train_tokenizer()
    unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG)).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    te = CLIPTextModel(CLIPTextConfig(**text_config(len(tok)))).eval()
    with torch.no_grad():  # random init leaves some layers at zero; make every weight matter
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.05)
    return unet, vae, te, tok


def write_ldm(path: Path, comps, family: str = "kiln-shapes", **kw) -> Path:
    unet, vae, te, tok = comps
    return export_ldm_checkpoint(path, unet, vae, te, tokenizer=tok, scheduler_config=SCHEDULER_CONFIG,
                                 model_family=family, **kw)


def write_diffusers(folder: Path, comps) -> Path:
    from diffusers import EulerDiscreteScheduler

    unet, vae, te, tok = comps
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    te.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    return folder


def write_sd15_layout_without_metadata(path: Path, comps) -> Path:
    """An LDM file with no kiln.* metadata: must be recognised (or rejected) from its keys alone."""
    from safetensors.torch import save_file

    from nodes.sd.checkpoint import ldm_state_dict

    unet, vae, te, _ = comps
    save_file(ldm_state_dict(unet, vae, te), str(path))
    return path


def make_controlnet(unet, seed: int = 1, perturb: float = 0.05):
    """A ControlNet derived from the UNet, its zero convolutions perturbed so it is not a no-op."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    if perturb:
        with torch.no_grad():
            for m in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
                for p in m.parameters():
                    p.normal_(0, perturb)
    return cn


def write_controlnet(path: Path, cn, layout: str = "diffusers") -> Path:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in cn.state_dict().items()}
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cn.config).items() if not k.startswith("_")}
    if layout == "ldm":
        mapping = L.controlnet_map(sd, L.UnetLayout(cfg))
        sd = {mapping[k]: v for k, v in sd.items()}
    save_file(sd, str(path), metadata={"kiln.controlnet_config": json.dumps(cfg)})
    return path


def lora_targets(unet, te):
    """(module name, in, out) of the attention projections a typical LoRA trains."""
    out = []
    for prefix, model, names in (("unet", unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                 ("te", te, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(name.endswith(n) for n in names):
                if prefix == "te" and not name.startswith("text_model."):
                    name = "text_model." + name  # the names LoRA files use
                out.append((prefix, name, mod.in_features, mod.out_features))
    return out


def make_lora(unet, te, rank: int = 4, seed: int = 0, scale: float = 0.2):
    """Random LoRA factors {(part, module): (down [r,in], up [out,r], alpha)}."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for part, name, fin, fout in lora_targets(unet, te):
        down = torch.randn(rank, fin, generator=g) * scale
        up = torch.randn(fout, rank, generator=g) * scale
        lora[(part, name)] = (down, up, float(rank) / 2)
    return lora


def write_lora_kohya(path: Path, lora) -> Path:
    from safetensors.torch import save_file

    sd = {}
    for (part, name), (down, up, alpha) in lora.items():
        base = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
        sd[f"{base}.lora_down.weight"] = down.contiguous()
        sd[f"{base}.lora_up.weight"] = up.contiguous()
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def write_lora_diffusers(path: Path, lora) -> Path:
    """PEFT/diffusers naming; the alpha/rank scale is folded into lora_B (diffusers files carry no alpha)."""
    from safetensors.torch import save_file

    sd = {}
    for (part, name), (down, up, alpha) in lora.items():
        base = ("unet." if part == "unet" else "text_encoder.") + name
        sd[f"{base}.lora_A.weight"] = down.contiguous()
        sd[f"{base}.lora_B.weight"] = (up * (alpha / down.shape[0])).contiguous()
    save_file(sd, str(path))
    return path


def write_tiny_sdxl_folder(folder: Path, seed: int = 0) -> Path:
    """A diffusers SDXL-architecture folder: two text encoders (the second with projection), a UNet with
    text_time added conditioning."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = train_tokenizer()
    te1 = CLIPTextModel(CLIPTextConfig(**text_config(len(tok)))).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_config(len(tok)), "hidden_act": "gelu"})).eval()
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "cross_attention_dim": 64, "addition_embed_type": "text_time",
                                   "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
                                   "use_linear_projection": True}).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2),
                      ("tokenizer", tok), ("tokenizer_2", tok)):
        obj.save_pretrained(folder / name)
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def write_vae_file(path: Path, vae) -> Path:
    """A standalone VAE in the bare LDM layout (``encoder.down.0...``) with its config as metadata."""
    from safetensors.torch import save_file

    sd = vae.state_dict()
    out = {}
    for k, v in L.build_map(sd, L.vae_key_to_ldm, "", n_blocks=len(vae.config.block_out_channels)).items():
        out[v] = sd[k][:, :, None, None] if L.is_vae_attn_linear(v) and sd[k].ndim == 2 else sd[k]
    cfg = {k: (list(x) if isinstance(x, tuple) else x) for k, x in dict(vae.config).items() if not k.startswith("_")}
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata={"kiln.vae_config": json.dumps(cfg)})
    return path
