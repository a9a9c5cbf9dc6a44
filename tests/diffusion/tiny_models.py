"""Tiny SD1.5-architecture components with random weights, and writers for every file format Kiln reads.

Nothing here downloads anything: configs are spelled out, the tokenizer is trained on a small corpus
with ``tokenizers``, weights come from a seeded generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.nodes.sd import ldm_keys
from kiln.nodes.sd.checkpoint import export_ldm_checkpoint
from kiln.nodes.sd.tokenizer import byte_symbols, make_tokenizer

CORPUS = (
    """a photo of a red circle on a blue background
a green square in the top left corner, high quality
an orange triangle at the bottom right of a white canvas
two yellow stars and a purple heart on black
a small cat sitting next to a large dog in a garden
masterpiece best quality detailed painting of mountains at sunset
portrait of an astronaut riding a horse on the moon
"""
    * 4
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
    mid_block_add_attention=False,  # local receptive field: inpainting is checkable in pixels
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def train_tokenizer(vocab_size: int = 400):
    """A small CLIP-style BPE (lower-cased words, ``</w>`` word ends) trained on CORPUS."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        show_progress=False,
        initial_alphabet=[c for c in byte_symbols()[:94]],
    )
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
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


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
    return export_ldm_checkpoint(
        path, unet, vae, te, tokenizer=tok, scheduler_config=SCHEDULER_CONFIG, model_family=family, **kw
    )


def write_diffusers(folder: Path, comps) -> Path:
    from diffusers import EulerDiscreteScheduler

    unet, vae, te, tok = comps
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    te.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            }
        )
    )
    return folder


def write_sd15_layout_without_metadata(path: Path, comps) -> Path:
    """An LDM file with no kiln.* metadata: must be recognised (or rejected) from its keys alone."""
    from safetensors.torch import save_file

    from kiln.nodes.sd.checkpoint import ldm_state_dict

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
        mapping = ldm_keys.controlnet_map(sd, ldm_keys.UnetLayout(cfg))
        sd = {mapping[k]: v for k, v in sd.items()}
    save_file(sd, str(path), metadata={"kiln.controlnet_config": json.dumps(cfg)})
    return path


def lora_targets(unet, te):
    """(module name, in, out) of the attention projections a typical LoRA trains."""
    out = []
    for prefix, model, names in (
        ("unet", unet, ("to_q", "to_k", "to_v", "to_out.0")),
        ("te", te, ("q_proj", "k_proj", "v_proj", "out_proj")),
    ):
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


SDXL_UNET_CONFIG = {
    **UNET_CONFIG,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "use_linear_projection": True,
}


def build_tiny_sdxl(seed: int = 0):
    """(unet, vae, te1, te2, tok): SDXL architecture, two text encoders (the second with projection)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = train_tokenizer()
    te1 = CLIPTextModel(CLIPTextConfig(**text_config(len(tok)))).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_te2_config(len(tok)))).eval()
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    return unet, vae, te1, te2, tok


def sdxl_te2_config(vocab_size: int) -> dict:
    return {**text_config(vocab_size), "hidden_act": "gelu"}


def write_tiny_sdxl_folder(folder: Path, seed: int = 0) -> Path:
    from diffusers import EulerDiscreteScheduler

    unet, vae, te1, te2, tok = build_tiny_sdxl(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in (
        ("unet", unet),
        ("vae", vae),
        ("text_encoder", te1),
        ("text_encoder_2", te2),
        ("tokenizer", tok),
        ("tokenizer_2", tok),
    ):
        obj.save_pretrained(folder / name)
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def to_open_clip(sd: dict, prefix: str) -> dict:
    """transformers CLIP text weights in OpenCLIP's layout (fused attention), as SDXL single files carry."""
    out = {}
    sd = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    ren = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for k, v in sd.items():
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("encoder.layers."):
            n, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.split(".")[-1]
                if rest.startswith("self_attn.q_proj"):
                    parts = [sd[f"encoder.layers.{n}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
                    out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(parts).contiguous()
                continue
            for a, b in ren.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
            out[f"transformer.resblocks.{n}.{rest}"] = v
    return {prefix + k: v for k, v in out.items()}


def write_sdxl_ldm(path: Path, comps) -> Path:
    """An SDXL-layout single file (no kiln metadata): UNet with label_emb, CLIP-L, OpenCLIP-G, VAE."""
    from safetensors.torch import save_file

    unet, vae, te1, te2, _ = comps
    out = {}
    usd = unet.state_dict()
    for k, v in ldm_keys.build_map(
        usd, ldm_keys.unet_key_to_ldm, ldm_keys.UNET_PREFIX, layout=ldm_keys.UnetLayout(dict(unet.config))
    ).items():
        out[v] = usd[k]
    vsd = vae.state_dict()
    for k, v in ldm_keys.build_map(
        vsd, ldm_keys.vae_key_to_ldm, ldm_keys.VAE_PREFIX, n_blocks=len(vae.config.block_out_channels)
    ).items():
        out[v] = vsd[k]
    for k, v in te1.state_dict().items():
        if not k.endswith("position_ids"):
            out[ldm_keys.SDXL_CLIP_L_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = v
    out.update(
        to_open_clip(
            {k: v for k, v in te2.state_dict().items() if not k.endswith("position_ids")}, ldm_keys.SDXL_CLIP_G_PREFIX
        )
    )
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


def write_vae_file(path: Path, vae) -> Path:
    """A standalone VAE in the bare LDM layout (``encoder.down.0...``) with its config as metadata."""
    from safetensors.torch import save_file

    sd = vae.state_dict()
    out = {}
    for k, v in ldm_keys.build_map(
        sd, ldm_keys.vae_key_to_ldm, "", n_blocks=len(vae.config.block_out_channels)
    ).items():
        out[v] = sd[k][:, :, None, None] if ldm_keys.is_vae_attn_linear(v) and sd[k].ndim == 2 else sd[k]
    cfg = {k: (list(x) if isinstance(x, tuple) else x) for k, x in dict(vae.config).items() if not k.startswith("_")}
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata={"kiln.vae_config": json.dumps(cfg)})
    return path


# The project's own model family ("kiln-shapes"): a 4x VAE (3 blocks), a text encoder with 32 positions,
# linear betas with trailing timesteps. Same structure as the trained model, much smaller.
SHAPES_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=[16, 32, 32],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)
SHAPES_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.7,
)
SHAPES_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=0,
    timestep_spacing="trailing",
)


def write_shapes_like(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = train_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(**{**text_config(len(tok)), "max_position_embeddings": 32})).eval()
    unet = UNet2DConditionModel(**SHAPES_UNET_CONFIG).eval()
    vae = AutoencoderKL(**SHAPES_VAE_CONFIG).eval()
    return export_ldm_checkpoint(
        path,
        unet,
        vae,
        te,
        tokenizer=tok,
        scheduler_config=SHAPES_SCHEDULER_CONFIG,
        model_family="kiln-shapes",
        dtype=torch.float16,
    )


# -- models whose architecture is visible in their weights alone (config inference) ----------------------
# GroupNorm widths divisible by 32, 8 UNet heads (SD1) or 64 channels per head (SDXL), 64 channels per text
# head and the standard CLIP vocabulary: what a file without metadata is assumed to use.

PLAIN_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[32, 32],
    layers_per_block=1,
    norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)


def plain_unet_config(levels: int, attention: tuple[bool, ...] | None = None, **kw) -> dict:
    attention = attention or (True,) * levels
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32 * (i + 1) for i in range(levels)],
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        mid_block_type="UNetMidBlock2DCrossAttn",
    )
    cfg.update(kw)
    return cfg


def plain_text_config(projection: bool = False) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def build_plain_sd1(unet_config: dict, seed: int = 0):
    """(unet, vae, te, tokenizer) with the standard CLIP tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).eval()
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.05)
    vae = AutoencoderKL(**PLAIN_VAE_CONFIG).eval()
    te = CLIPTextModel(CLIPTextConfig(**plain_text_config())).eval()
    return unet, vae, te, make_tokenizer()


def build_plain_sdxl(seed: int = 0):
    """(unet, vae, te1, te2, tokenizer): SDXL layout, 64 channels per head, standard vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = plain_unet_config(
        2,
        (False, True),
        cross_attention_dim=128,
        attention_head_dim=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    unet = UNet2DConditionModel(**cfg).eval()
    vae = AutoencoderKL(**PLAIN_VAE_CONFIG).eval()
    te1 = CLIPTextModel(CLIPTextConfig(**plain_text_config())).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**plain_text_config(projection=True))).eval()
    return unet, vae, te1, te2, make_tokenizer()


def write_hypernetwork(path: Path, widths: tuple[int, ...], seed: int = 0, activation: str = "relu") -> Path:
    """An A1111-format hypernetwork (.pt): per width two stacks Linear(w, 2w) -> act -> Linear(2w, w)."""
    g = torch.Generator().manual_seed(seed)
    obj: dict = {"activation_func": activation, "is_layer_norm": False, "use_dropout": False, "name": "tiny"}
    for w in widths:
        pair = []
        for _ in range(2):
            pair.append(
                {
                    "linear.0.weight": torch.randn(2 * w, w, generator=g) * 0.1,
                    "linear.0.bias": torch.randn(2 * w, generator=g) * 0.1,
                    "linear.2.weight": torch.randn(w, 2 * w, generator=g) * 0.1,
                    "linear.2.bias": torch.randn(w, generator=g) * 0.1,
                }
            )
        obj[w] = pair
    torch.save(obj, str(path))
    return path
