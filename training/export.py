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

The key names come from :mod:`kiln.nodes.sd.ldm_keys`, the map the checkpoint loader inverts, so there is one
definition of the layout; :func:`check_round_trip` converts the result back with diffusers' own single-file
converters and requires every tensor to come back bit-identical.

    python -m kiln.training.export --run runs/shapes --out models/checkpoints/kiln-shapes.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.nodes.sd import ldm_keys

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, ldm_keys.CLIP_PREFIX


def text_key_to_ldm(key: str) -> str:
    """transformers 5's ``CLIPTextModel`` has no ``text_model.`` level; SD files (and transformers 4) do."""
    return key if key.startswith("text_model.") else "text_model." + key


def text_key_from_ldm(key: str) -> str:
    return key[len("text_model.") :] if key.startswith("text_model.") else key


def to_ldm(unet_sd: dict, unet_config: dict, vae_sd: dict, vae_config: dict, text_sd: dict) -> dict:
    """diffusers/transformers state dicts -> one LDM state dict, through the key map the loader inverts
    (:mod:`kiln.nodes.sd.ldm_keys`)."""
    out: dict[str, torch.Tensor] = {}
    for k, name in ldm_keys.build_map(
        unet_sd, ldm_keys.unet_key_to_ldm, UNET_PREFIX, layout=ldm_keys.UnetLayout(unet_config)
    ).items():
        out[name] = unet_sd[k]
    for k, name in ldm_keys.build_map(
        vae_sd, ldm_keys.vae_key_to_ldm, VAE_PREFIX, n_blocks=len(vae_config["block_out_channels"])
    ).items():
        v = vae_sd[k]
        if ldm_keys.is_vae_attn_linear(name) and v.ndim == 2:
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


def check_round_trip(
    ldm: dict, unet_sd: dict, unet_config: dict, vae_sd: dict, vae_config: dict, text_sd: dict
) -> None:
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


def metadata(
    unet_config: dict, vae_config: dict, text_config: dict, scheduler_config: dict, tokenizer_dir: Path
) -> dict[str, str]:
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


def export_run(
    run: Path, out: Path, dtype: torch.dtype = torch.float16, ema: bool = True, phase: str | None = None
) -> dict:
    """``phase``: the UNet checkpoint folder (default: ``unet-v`` once it exists, as ``Pipeline.from_run``;
    ``unet-v2`` for the partial-caption fine-tune)."""
    from kiln.training import sample

    pipe = sample.Pipeline.from_run(run, ema=ema, phase=phase)
    unet_cfg, vae_cfg = _plain(pipe.unet.config), _plain(pipe.vae.config)
    text_cfg = _plain(pipe.text_encoder.config)
    unet_sd = {k: v.detach().to(dtype).contiguous() for k, v in pipe.unet.state_dict().items()}
    vae_sd = {k: v.detach().to(dtype).contiguous() for k, v in pipe.vae.state_dict().items()}
    text_sd = {
        k: v.detach().contiguous() if k.endswith("position_ids") else v.detach().to(dtype).contiguous()
        for k, v in pipe.text_encoder.state_dict().items()
    }
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
    p.add_argument("--phase", default=None, help="UNet checkpoint folder: unet-v (default) or unet-v2")
    args = p.parse_args(argv)
    export_run(args.run, args.out, torch.float32 if args.fp32 else torch.float16, ema=not args.no_ema, phase=args.phase)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); round trip through diffusers' converters is exact"
    )


if __name__ == "__main__":
    main()
