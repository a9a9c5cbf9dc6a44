"""ControlNet files: diffusers layout or the LDM layout (``control_model.`` / bare ``zero_convs``) most
ControlNets ship in. The architecture comes from ``kiln.controlnet_config`` metadata, a diffusers
``config.json`` beside/inside a folder, or (for SD1.5 files without either) the shipped SD1.5 UNet config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import ldm_keys
from .checkpoint import CheckpointError, describe_keys, detect_kind, materialise, read_state_dict, shipped_config

_CN_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
    "addition_embed_type_num_heads",
)


def sd15_controlnet_config() -> dict:
    unet = shipped_config("sd15", "unet")
    cfg = {k: v for k, v in unet.items() if k in _CN_KEYS}
    cfg["conditioning_embedding_out_channels"] = [16, 32, 96, 256]
    return cfg


def load_controlnet(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from diffusers import ControlNetModel

    path = Path(path)
    if path.is_dir():
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype).to(device).eval().requires_grad_(False)
    sd, meta = read_state_dict(path)
    if detect_kind(sd) != "controlnet":
        raise CheckpointError(
            f"{path.name} is not a ControlNet (keys: {describe_keys(sd)})",
            hint="ControlNetLoader takes ControlNet files from models/controlnet; checkpoints go "
            "to CheckpointLoaderSimple, LoRAs to LoraLoader",
        )
    if "kiln.controlnet_config" in meta:
        cfg = json.loads(meta["kiln.controlnet_config"])
    elif path.with_suffix(".json").is_file():
        cfg = json.loads(path.with_suffix(".json").read_text())
    else:
        probe = [v for k, v in sd.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
        if probe and probe[0].shape[1] != 768:
            raise CheckpointError(
                f"{path.name} is a ControlNet for another model family "
                f"(context size {probe[0].shape[1]}, SD1.5 uses 768)",
                hint="use an SD1.5 ControlNet, or put its diffusers config.json beside it as "
                f"{path.with_suffix('.json').name}",
            )
        cfg = sd15_controlnet_config()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = ControlNetModel.from_config(cfg)
    keys = list(model.state_dict())
    ldm = any(k.startswith(("control_model.", "zero_convs.", "input_hint_block.")) for k in sd)
    if ldm:
        prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
        mapping = ldm_keys.controlnet_map(keys, ldm_keys.UnetLayout(cfg), prefix=prefix)
        sd = {k: sd[v] for k, v in mapping.items() if v in sd}
    return materialise(model, sd, "ControlNet", dtype, device)
