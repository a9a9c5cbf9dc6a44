"""Key names between diffusers modules and the original LDM ("single-file") checkpoint layout.

One function per component maps a diffusers state-dict key to its LDM key; loading inverts the map
built from the diffusers model's own keys, exporting applies it. The same code serves both directions,
so a checkpoint Kiln writes is a checkpoint Kiln (and any LDM-layout loader) reads.

LDM layout, as SD1.x/SDXL single files ship:

- UNet ``model.diffusion_model.``: ``input_blocks.N.{0 resnet|1 transformer}``, ``middle_block.{0,1,2}``,
  ``output_blocks.N.{0 resnet|1 transformer|1-or-2 upsampler}``, ``time_embed``, ``label_emb`` (SDXL), ``out``
- VAE ``first_stage_model.``: ``encoder.down.I.block.J``, ``decoder.up.I`` (reversed), ``mid.block_1``,
  ``mid.attn_1`` (1x1 convolutions where diffusers has linear layers)
- CLIP-L ``cond_stage_model.transformer.`` (SD1) / ``conditioner.embedders.0.transformer.`` (SDXL):
  transformers' own names; OpenCLIP-G ``conditioner.embedders.1.model.`` (SDXL) has fused attention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


class UnetLayout:
    """Block arithmetic of an SD-style UNet config, shared by the UNet and ControlNet maps."""

    def __init__(self, config: dict):
        n = len(config["block_out_channels"])
        lpb = config.get("layers_per_block", 2)
        self.layers = list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n
        self.down_types = list(config.get("down_block_types") or [])
        self.up_types = list(config.get("up_block_types") or [])
        self.n = n
        # input_blocks index of each down block's first resnet; a downsampler follows each but the last
        self.down_start = []
        idx = 1
        for i in range(n):
            self.down_start.append(idx)
            idx += self.layers[i] + (1 if i < n - 1 else 0)
        rev = list(reversed(self.layers))
        self.up_layers = [rev[i] + 1 for i in range(n)]
        self.up_start = []
        idx = 0
        for i in range(n):
            self.up_start.append(idx)
            idx += self.up_layers[i]

    def down_has_attn(self, i: int) -> bool:
        return "CrossAttn" in self.down_types[i] if i < len(self.down_types) else False

    def up_has_attn(self, i: int) -> bool:
        return "CrossAttn" in self.up_types[i] if i < len(self.up_types) else False


def _resnet(rest: str, table: dict) -> str:
    for k, v in table.items():
        if rest == k or rest.startswith(k + "."):
            return v + rest[len(k) :]
    return rest


def unet_key_to_ldm(key: str, layout: UnetLayout) -> str:
    """A diffusers UNet2DConditionModel key to its LDM name (without the ``model.diffusion_model.`` prefix)."""
    simple = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for k, v in simple.items():
        if key.startswith(k + "."):
            return v + key[len(k) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = layout.down_start[i] + j
        return f"input_blocks.{n}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        i = int(m[1])
        return f"input_blocks.{layout.down_start[i] + layout.layers[i]}.0.op.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET)}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)", key)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = layout.up_start[i] + j
        return f"output_blocks.{n}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        i = int(m[1])
        n = layout.up_start[i] + layout.up_layers[i] - 1
        return f"output_blocks.{n}.{2 if layout.up_has_attn(i) else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def controlnet_key_to_ldm(key: str, layout: UnetLayout) -> str:
    """A diffusers ControlNetModel key to its LDM ControlNet name (``control_model.`` prefix not included)."""
    m = re.match(r"controlnet_cond_embedding\.(conv_in|blocks\.(\d+)|conv_out)\.(.+)", key)
    if m:
        if m[1] == "conv_in":
            idx = 0
        elif m[1] == "conv_out":
            idx = None
        else:
            idx = 2 * (int(m[2]) + 1)
        if idx is None:
            return f"input_hint_block.@out.{m[3]}"  # resolved by the caller: the last hint conv
        return f"input_hint_block.{idx}.{m[3]}"
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block.") :]
    return unet_key_to_ldm(key, layout)


def vae_key_to_ldm(key: str, n_blocks: int) -> str:
    """A diffusers AutoencoderKL key to its LDM name (without ``first_stage_model.``)."""
    for part in ("encoder", "decoder"):
        if not key.startswith(part + "."):
            continue
        rest = key[len(part) + 1 :]
        if rest.startswith("conv_norm_out."):
            return f"{part}.norm_out." + rest[len("conv_norm_out.") :]
        m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m:
            i = int(m[2]) if m[1] == "down" else n_blocks - 1 - int(m[2])
            return f"{part}.{m[1]}.{i}.block.{m[3]}.{_resnet(m[4], _VAE_RESNET)}"
        m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest)
        if m:
            return f"{part}.down.{m[1]}.downsample.{m[2]}"
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
        if m:
            return f"{part}.up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet(m[2], _VAE_RESNET)}"
        m = re.match(r"mid_block\.attentions\.0\.(.+)", rest)
        if m:
            return f"{part}.mid.attn_1.{_resnet(m[1], _VAE_ATTN)}"
        return key
    return key  # quant_conv, post_quant_conv


def is_vae_attn_linear(ldm_key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def build_map(keys: Iterable[str], fn, prefix: str = "", **kw) -> dict[str, str]:
    """``{diffusers_key: prefixed LDM key}`` for every key of a diffusers model."""
    return {k: prefix + fn(k, **kw) for k in keys}


def controlnet_map(keys: Iterable[str], layout: UnetLayout, prefix: str = "control_model.") -> dict[str, str]:
    keys = list(keys)
    mapping = {k: controlnet_key_to_ldm(k, layout) for k in keys}
    hint = sorted(
        {int(v.split(".")[1]) for v in mapping.values() if v.startswith("input_hint_block.") and "@" not in v}
    )
    last = (max(hint) + 2) if hint else 0
    return {k: prefix + v.replace("input_hint_block.@out", f"input_hint_block.{last}") for k, v in mapping.items()}


# -- OpenCLIP (SDXL's second text encoder) -> transformers CLIPTextModelWithProjection -------------------


def open_clip_to_transformers(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Convert an OpenCLIP text tower (fused qkv, ``resblocks``) to transformers' CLIP names."""
    out: dict[str, torch.Tensor] = {}
    ren = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for key in [k for k in sd if k.startswith(prefix)]:  # only this tower's tensors are read
        t = sd[key]
        k = key[len(prefix) :]
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = t
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = t
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final.") :]] = t
        elif k == "text_projection":
            out["text_projection.weight"] = t.T.contiguous()
        elif k.startswith("transformer.resblocks."):
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", k)
            layer, rest = m[1], m[2]
            base = f"text_model.encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                q, kk, v = t.chunk(3, dim=0)
                for name, part in (("q_proj", q), ("k_proj", kk), ("v_proj", v)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            for a, b in ren.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            out[base + rest] = t
    return out


def transformers_to_open_clip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_transformers`: transformers CLIP text weights (with projection) in
    OpenCLIP's layout under ``prefix``, as SDXL single files carry their second text encoder."""
    plain = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    ren = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    out: dict[str, torch.Tensor] = {}
    for k, t in plain.items():
        if k.endswith("position_ids"):
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k[len("final_layer_norm.") :]] = t
        elif k == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
        elif (m := re.match(r"encoder\.layers\.(\d+)\.(.+)", k)) is not None:
            layer, rest = m[1], m[2]
            base = f"transformer.resblocks.{layer}."
            qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if qkv:
                if qkv[1] == "q":
                    kind = qkv[2]
                    parts = [plain[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            for a, b in ren.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            out[base + rest] = t
    return {prefix + k: v for k, v in out.items()}
