"""Architecture from tensors: a checkpoint is described by its weights, not only by its family.

A single-file checkpoint says which family it belongs to (SD1.x, SDXL) through its key layout, but not
the size of each part: a fine-tune may drop a UNet level, change the channel widths, use fewer text
layers, or take nine input channels (inpainting). The functions here read those numbers from the names
and shapes of the tensors and lay them over the configs Kiln ships for the family, so anything that is
not visible in the weights (schedules, norm groups, head counts that change no shape) keeps the family's
value.

What the weights cannot say, and the rule used instead:

- attention heads: SD1 UNets use 8 heads per block; SDXL (and any UNet with linear projections) uses
  64 channels per head. CLIP text encoders use 64 channels per head (CLIP-L 12, OpenCLIP-G 20).
- GroupNorm groups: 32, as every published SD model.
- the VAE's latent scale: the family's (0.18215 for SD1, 0.13025 for SDXL).

Files written by Kiln carry their exact configs in their metadata (``kiln.*_config``); those win.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from . import ldm_keys

Tensors = Mapping[str, Any]  # name -> tensor, or its shape as a tuple


def _shape(sd: Tensors, key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    if t is None:
        return None
    return tuple(int(x) for x in (t.shape if hasattr(t, "shape") else t))


def _indices(sd: Tensors, pattern: str) -> list[int]:
    """Distinct integers captured by ``pattern`` (one group) over the keys of ``sd``, sorted."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in sd if (m := rx.match(k))})


# -- UNet --------------------------------------------------------------------------------------------------


def _depth(sd: Tensors, block: str) -> int:
    """How many transformer blocks the attention at ``block`` (an LDM key prefix ending in '.') holds."""
    idx = _indices(sd, re.escape(block) + r"transformer_blocks\.(\d+)\.")
    return (max(idx) + 1) if idx else 0


def unet_config_from_ldm(sd: Tensors, base: dict, prefix: str = ldm_keys.UNET_PREFIX) -> dict | None:
    """A diffusers ``UNet2DConditionModel`` config for the LDM UNet under ``prefix`` in ``sd``, laid over
    ``base``; None when ``sd`` holds no LDM UNet there."""
    p = prefix
    conv_in = _shape(sd, p + "input_blocks.0.0.weight")
    if conv_in is None:
        return None
    channels: list[int] = []
    layers: list[int] = []
    depth: list[int] = []
    n, cur_layers, cur_depth, cur_ch = 1, 0, 0, conv_in[0]
    while True:
        res = _shape(sd, f"{p}input_blocks.{n}.0.out_layers.3.weight")
        down = _shape(sd, f"{p}input_blocks.{n}.0.op.weight")
        if res is not None:
            cur_ch, cur_layers = res[0], cur_layers + 1
            cur_depth = max(cur_depth, _depth(sd, f"{p}input_blocks.{n}.1."))
        elif down is not None or cur_layers:
            channels.append(cur_ch)
            layers.append(cur_layers)
            depth.append(cur_depth)
            cur_layers, cur_depth = 0, 0
            if down is None:
                break
        else:
            break
        n += 1
    if not channels:
        return None
    mid_depth = _depth(sd, f"{p}middle_block.1.")
    ctx = [s[1] for k in sd if k.startswith(p) and k.endswith("attn2.to_k.weight") and (s := _shape(sd, k))]
    proj = [s for k in sd if k.startswith(p) and k.endswith(".proj_in.weight") and (s := _shape(sd, k))]
    linear = bool(proj) and len(proj[0]) == 2
    adm = _shape(sd, p + "label_emb.0.0.weight")
    cfg = {k: v for k, v in base.items() if not k.startswith("_")}
    cfg.update(
        in_channels=conv_in[1],
        out_channels=(_shape(sd, p + "out.2.weight") or (conv_in[1],))[0],
        block_out_channels=channels,
        layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        transformer_layers_per_block=[max(d, 1) for d in depth],
        use_linear_projection=linear,
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_depth else None,
    )
    if ctx:
        cfg["cross_attention_dim"] = ctx[0]
    cfg["norm_num_groups"] = norm_groups([channels[0], *channels], int(base.get("norm_num_groups", 32)))
    time_embed = _shape(sd, p + "time_embed.0.weight")
    if time_embed is not None and time_embed[0] != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_embed[0]
    else:
        cfg.pop("time_embedding_dim", None)
    if adm is not None or linear:  # SDXL-style: 64 channels per head
        cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]
    else:  # SD1: 8 heads
        cfg["attention_head_dim"] = 8
    cfg["num_attention_heads"] = None
    if adm is not None:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = adm[1]
    else:
        for k in ("addition_embed_type", "projection_class_embeddings_input_dim"):
            cfg[k] = None
    return cfg


def norm_groups(widths: list[int], wanted: int) -> int:
    """``wanted`` GroupNorm groups (32 in every published model) when it divides every width, else the
    largest number below it that does (small and unusual models)."""
    for g in range(wanted, 0, -1):
        if all(w % g == 0 for w in widths):
            return g
    return 1


def sdxl_time_embed_dim(adm_in: int, pooled_dim: int | None) -> int:
    """SDXL's per-number embedding width: ``adm_in`` = pooled text width + 6 embedded sizes (original
    size, crop, target size, two numbers each)."""
    if pooled_dim is not None and adm_in > pooled_dim and (adm_in - pooled_dim) % 6 == 0:
        return (adm_in - pooled_dim) // 6
    return 256  # SDXL base: 2816 = 1280 + 6 * 256


# -- VAE ---------------------------------------------------------------------------------------------------


def vae_config_from_ldm(sd: Tensors, base: dict, prefix: str = ldm_keys.VAE_PREFIX) -> dict | None:
    """A diffusers ``AutoencoderKL`` config for the LDM VAE under ``prefix``, laid over ``base``."""
    p = prefix
    conv_in = _shape(sd, p + "encoder.conv_in.weight")
    if conv_in is None:
        return None
    levels = _indices(sd, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels:
        return None
    channels, layers = [], 0
    for i in levels:
        blocks = _indices(sd, re.escape(f"{p}encoder.down.{i}.block.") + r"(\d+)\.")
        layers = max(layers, len(blocks))
        last = _shape(sd, f"{p}encoder.down.{i}.block.{blocks[-1]}.conv2.weight") if blocks else None
        channels.append(last[0] if last else (channels[-1] if channels else conv_in[0]))
    latent = _shape(sd, p + "decoder.conv_in.weight")
    cfg = {k: v for k, v in base.items() if not k.startswith("_")}
    cfg.update(
        in_channels=conv_in[1],
        out_channels=(_shape(sd, p + "decoder.conv_out.weight") or (3,))[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=latent[1] if latent else base.get("latent_channels", 4),
        mid_block_add_attention=any(k.startswith(p + "encoder.mid.attn_1.") for k in sd),
        use_quant_conv=(p + "quant_conv.weight") in sd,
        use_post_quant_conv=(p + "post_quant_conv.weight") in sd,
        norm_num_groups=norm_groups(channels, int(base.get("norm_num_groups", 32))),
    )
    return cfg


# -- CLIP text encoders ------------------------------------------------------------------------------------


def text_config_from_transformers(sd: Tensors, base: dict, prefix: str) -> dict | None:
    """A transformers ``CLIPTextConfig`` dict for the CLIP text weights under ``prefix`` (``text_model.*``
    names, or names without it), laid over ``base``."""
    tm = prefix + "text_model." if any(k.startswith(prefix + "text_model.") for k in sd) else prefix
    tok = _shape(sd, tm + "embeddings.token_embedding.weight")
    if tok is None:
        return None
    pos = _shape(sd, tm + "embeddings.position_embedding.weight")
    n_layers = len(_indices(sd, re.escape(tm + "encoder.layers.") + r"(\d+)\."))
    fc1 = _shape(sd, tm + "encoder.layers.0.mlp.fc1.weight")
    proj = _shape(sd, prefix + "text_projection.weight")
    return _text_config(base, tok, pos, n_layers, fc1, proj[0] if proj else None)


def text_config_from_open_clip(sd: Tensors, base: dict, prefix: str) -> dict | None:
    """The same for an OpenCLIP text tower (SDXL's second encoder: ``resblocks``, fused attention)."""
    tok = _shape(sd, prefix + "token_embedding.weight")
    if tok is None:
        return None
    pos = _shape(sd, prefix + "positional_embedding")
    n_layers = len(_indices(sd, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\."))
    fc1 = _shape(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight")
    proj = _shape(sd, prefix + "text_projection")
    return _text_config(base, tok, pos, n_layers, fc1, proj[1] if proj else None)


def _text_config(base: dict, tok, pos, n_layers: int, fc1, projection: int | None) -> dict:
    cfg = {k: v for k, v in base.items() if not k.startswith("_")}
    hidden = tok[1]
    cfg.update(
        vocab_size=tok[0],
        hidden_size=hidden,
        num_hidden_layers=n_layers or cfg.get("num_hidden_layers", 12),
        num_attention_heads=max(1, hidden // 64),
    )
    if pos is not None:
        cfg["max_position_embeddings"] = pos[0]
    if fc1 is not None:
        cfg["intermediate_size"] = fc1[0]
    cfg["projection_dim"] = projection if projection is not None else hidden
    return cfg


def describe_unet(cfg: dict) -> str:
    """A short line for messages: levels, widths, attention."""
    att = ["x" if "CrossAttn" in t else "-" for t in cfg.get("down_block_types", [])]
    return (
        f"{len(cfg['block_out_channels'])} levels {list(cfg['block_out_channels'])}, attention {''.join(att)}, "
        f"context {cfg.get('cross_attention_dim')}, in {cfg.get('in_channels')}"
    )


def tensor_dtype(sd: Tensors) -> torch.dtype | None:
    """The floating dtype most of the weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=lambda d: counts[d]) if counts else None
