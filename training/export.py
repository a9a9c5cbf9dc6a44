"""Export the trained stack as ONE Stable Diffusion (LDM) single-file checkpoint, self-describing.

Key layout is the original SD1.x one users' checkpoints have: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE, attention projections as 1x1 convs), ``cond_stage_model.transformer.text_model.*``
(the CLIP text model; transformers 5 names its keys without ``text_model.``, so that level is added on
export and dropped on load). Because the architecture is small and non-standard, the file carries
its own configs in the safetensors ``__metadata__`` (all values strings):

==========================  =====================================================================
``kiln.format``             ``"1"``
``kiln.model_family``       ``"kiln-shapes"``
``kiln.unet_config``        JSON, diffusers ``UNet2DConditionModel`` config
``kiln.vae_config``         JSON, diffusers ``AutoencoderKL`` config, with ``scaling_factor``
``kiln.text_encoder_config``  JSON, transformers ``CLIPTextConfig``
``kiln.scheduler_config``   JSON, the DDPM schedule used in training (``clip_sample: false``)
``kiln.tokenizer_vocab``    the tokenizer's ``vocab.json`` text
``kiln.tokenizer_merges``   the tokenizer's ``merges.txt`` text
==========================  =====================================================================

The conversion is written here from the layouts' structure; :func:`check_round_trip` converts the result
back with diffusers' own single-file converters and requires every tensor to come back bit-identical.

    python -m kiln.training.export --run runs/shapes --out models/checkpoints/kiln-shapes.safetensors
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_tail(tail: str) -> str:
    for new, old in _UNET_RESNET:
        if tail.startswith(new + "."):
            return old + tail[len(new):]
    raise KeyError(f"unexpected resnet parameter {tail!r}")


def unet_key_to_ldm(key: str, config: dict) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM ``model.diffusion_model.*`` name."""
    lpb = config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return UNET_PREFIX + old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, i, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (lpb + 1) + i
        if kind == "resnets":
            return f"{UNET_PREFIX}input_blocks.{idx}.0.{_resnet_tail(tail)}"
        return f"{UNET_PREFIX}input_blocks.{idx}.1.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"{UNET_PREFIX}input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, i, tail = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"{UNET_PREFIX}middle_block.{2 * i}.{_resnet_tail(tail)}"
        return f"{UNET_PREFIX}middle_block.1.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, i, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * (lpb + 1) + i
        if kind == "resnets":
            return f"{UNET_PREFIX}output_blocks.{idx}.0.{_resnet_tail(tail)}"
        return f"{UNET_PREFIX}output_blocks.{idx}.1.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if up_has_attn[b] else 1
        return f"{UNET_PREFIX}output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet parameter {key!r}")


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_key_to_ldm(key: str, config: dict) -> str:
    n_up = len(config["up_block_types"])
    fixed = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return VAE_PREFIX + old + key[len(new):]
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{VAE_PREFIX}{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        tail = m[2]
        for new, old in _VAE_ATTN:
            if tail.startswith(new + "."):
                tail = old + tail[len(new):]
                break
        return f"{VAE_PREFIX}{m[1]}.mid.attn_1.{tail}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"{VAE_PREFIX}encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"{VAE_PREFIX}encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return (f"{VAE_PREFIX}decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}."
                f"{m[3].replace('conv_shortcut', 'nin_shortcut')}")
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"{VAE_PREFIX}decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|(post_)?quant_conv\.", key):
        return VAE_PREFIX + key
    raise KeyError(f"no LDM name for VAE parameter {key!r}")


def text_key_to_ldm(key: str) -> str:
    """transformers 5's ``CLIPTextModel`` has no ``text_model.`` level; SD files (and transformers 4) do."""
    return key if key.startswith("text_model.") else "text_model." + key


def text_key_from_ldm(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def to_ldm(unet_sd: dict, unet_config: dict, vae_sd: dict, vae_config: dict, text_sd: dict) -> dict:
    out: dict[str, torch.Tensor] = {}
    for k, v in unet_sd.items():
        out[unet_key_to_ldm(k, unet_config)] = v
    for k, v in vae_sd.items():
        name = vae_key_to_ldm(k, vae_config)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out[name] = v
    for k, v in text_sd.items():
        if k.endswith("position_ids"):
            continue
        out[CLIP_PREFIX + text_key_to_ldm(k)] = v
    if len(out) != len(unet_sd) + len(vae_sd) + sum(not k.endswith("position_ids") for k in text_sd):
        raise RuntimeError("two parameters mapped to the same LDM key")
    return out


def from_ldm(sd: dict, unet_config: dict, vae_config: dict) -> tuple[dict, dict, dict]:
    """diffusers' own converters, LDM -> (unet, vae, text encoder) diffusers state dicts."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet = convert_ldm_unet_checkpoint(sd, unet_config)
    vae = convert_ldm_vae_checkpoint(sd, vae_config)
    text = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)})
    return unet, vae, text


def check_round_trip(ldm: dict, unet_sd: dict, unet_config: dict, vae_sd: dict, vae_config: dict,
                     text_sd: dict) -> None:
    """Raise unless diffusers' converters give back exactly ``unet_sd``, ``vae_sd`` and ``text_sd``."""
    unet, vae, text = from_ldm(ldm, unet_config, vae_config)
    text_sd = {text_key_to_ldm(k): v for k, v in text_sd.items() if not k.endswith("position_ids")}
    for name, want, got in (("unet", unet_sd, unet), ("vae", vae_sd, vae), ("text encoder", text_sd, text)):
        if set(want) != set(got):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise AssertionError(f"{name}: keys differ; missing {missing[:5]}, extra {extra[:5]}")
        for k in want:
            if want[k].shape != got[k].shape or not torch.equal(want[k], got[k]):
                raise AssertionError(f"{name}: tensor {k} differs after the round trip")


def metadata(unet_config: dict, vae_config: dict, text_config: dict, scheduler_config: dict,
             tokenizer_dir: Path) -> dict[str, str]:
    return {
        "kiln.format": "1",
        "kiln.model_family": "kiln-shapes",
        "kiln.unet_config": json.dumps(unet_config, sort_keys=True),
        "kiln.vae_config": json.dumps(vae_config, sort_keys=True),
        "kiln.text_encoder_config": json.dumps(text_config, sort_keys=True),
        "kiln.scheduler_config": json.dumps(scheduler_config, sort_keys=True),
        "kiln.tokenizer_vocab": (tokenizer_dir / "vocab.json").read_text(),
        "kiln.tokenizer_merges": (tokenizer_dir / "merges.txt").read_text(),
    }


def _plain(config) -> dict:
    """A diffusers FrozenDict / transformers config -> JSON-able dict without private entries."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version",)}


def export_run(run: Path, out: Path, dtype: torch.dtype = torch.float16, ema: bool = True) -> dict:
    from kiln.training import sample

    pipe = sample.Pipeline.from_run(run, ema=ema)
    unet_cfg, vae_cfg = _plain(pipe.unet.config), _plain(pipe.vae.config)
    text_cfg = _plain(pipe.text_encoder.config)
    unet_sd = {k: v.detach().to(dtype).contiguous() for k, v in pipe.unet.state_dict().items()}
    vae_sd = {k: v.detach().to(dtype).contiguous() for k, v in pipe.vae.state_dict().items()}
    text_sd = {k: v.detach().contiguous() if k.endswith("position_ids") else v.detach().to(dtype).contiguous()
               for k, v in pipe.text_encoder.state_dict().items()}
    ldm = to_ldm(unet_sd, unet_cfg, vae_sd, vae_cfg, text_sd)
    check_round_trip(ldm, unet_sd, unet_cfg, vae_sd, vae_cfg, text_sd)
    meta = metadata(unet_cfg, vae_cfg, text_cfg, pipe.scheduler_config, run / "tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm, str(out), metadata=meta)
    return meta


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    """Read an exported file back into a :class:`training.sample.Pipeline` (the loader's contract, in
    miniature: configs from ``kiln.*`` metadata, weights through diffusers' converters)."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from kiln.training import sample

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k).to(dtype) for k in f.keys()}
    if meta.get("kiln.format") != "1":
        raise ValueError(f"{path}: not a kiln single-file checkpoint (kiln.format is {meta.get('kiln.format')!r})")
    unet_cfg, vae_cfg = json.loads(meta["kiln.unet_config"]), json.loads(meta["kiln.vae_config"])
    unet_sd, vae_sd, text_sd = from_ldm(sd, unet_cfg, vae_cfg)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.load_state_dict(unet_sd)
    vae = AutoencoderKL.from_config(vae_cfg)
    vae.load_state_dict(vae_sd)
    te = CLIPTextModel(CLIPTextConfig(**json.loads(meta["kiln.text_encoder_config"])))
    te.load_state_dict({text_key_from_ldm(k): v for k, v in text_sd.items()}, strict=False)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(meta["kiln.tokenizer_vocab"])
        Path(d, "merges.txt").write_text(meta["kiln.tokenizer_merges"])
        from kiln.training.tokenizer import MAX_LENGTH

        tok = CLIPTokenizer.from_pretrained(d, model_max_length=MAX_LENGTH)
    return sample.Pipeline(tok, te.eval(), unet.eval(), vae.eval(), json.loads(meta["kiln.scheduler_config"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/shapes"))
    p.add_argument("--out", type=Path, default=Path("models/checkpoints/kiln-shapes.safetensors"))
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--no-ema", action="store_true")
    args = p.parse_args(argv)
    export_run(args.run, args.out, torch.float32 if args.fp32 else torch.float16, ema=not args.no_ema)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); round trip through diffusers' "
          "converters is exact")


if __name__ == "__main__":
    main()
