"""Reading and writing Stable Diffusion checkpoints, offline.

Three sources become the same :class:`Components`:

- an LDM single file (``.safetensors``/``.ckpt``) carrying Kiln metadata (``kiln.format`` = "1" plus the
  component configs and tokenizer as JSON/text in the safetensors header);
- an LDM single file without it: SD1.x or SDXL, recognised from its keys, built with the configs that
  ship in ``configs/``;
- a diffusers folder (``model_index.json``), loaded from disk with ``from_pretrained``.

:func:`export_ldm_checkpoint` writes diffusers components as an LDM single file with Kiln metadata;
the tests use it, and any training code may. Reading and writing live together so the two directions
cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.engine import NodeError

from . import ldm_keys
from .tokenizer import CONFIG_DIR, make_tokenizer, tokenizer_from_text, tokenizer_to_text


class CheckpointError(NodeError):
    """A model file cannot be used; ``hint`` says what to do instead.

    The file code serves every loader node, so it rarely knows which input named the file: the loader
    fills in ``input_name`` (see ``kiln.nodes.loaders``) before the error reaches the executor.
    """

    def __init__(self, message: str, hint: str | None = None, *, input_name: str | None = None):
        super().__init__(message, input_name=input_name, hint=hint)


@dataclass
class Components:
    family: str  # "sd15", "sdxl", "kiln-shapes", ...
    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    scheduler_config: dict = field(default_factory=dict)
    unet_config: dict = field(default_factory=dict)


# -- reading files -------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a model file; clear errors for corrupt or unknown files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path)), meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path.name} is not a readable safetensors file ({exc})",
                hint="the file is corrupt or truncated: download it again",
            ) from exc
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path.name} cannot be read as a PyTorch checkpoint ({exc})",
                hint="Kiln loads pickled checkpoints with weights_only=True; convert it to "
                ".safetensors, or download it again if it is corrupt",
            ) from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path.name} does not hold a state dict", hint="use a .safetensors checkpoint")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise CheckpointError(
        f"{path.name}: unknown model file type {suffix!r}", hint="use a .safetensors file or a diffusers folder"
    )


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _json_meta(meta: dict, key: str, required: bool = True) -> dict | None:
    if key not in meta:
        if required:
            raise CheckpointError(
                f"the checkpoint declares kiln.format but lacks {key!r} metadata",
                hint="re-export it with nodes.sd.checkpoint.export_ldm_checkpoint",
            )
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata {key!r} is not valid JSON ({exc})") from exc


def shipped_config(family: str, part: str) -> dict:
    """The diffusers config Kiln ships for one part (``unet``, ``vae``, ``text_encoder``, ``scheduler``...)
    of a model family (``sd15``, ``sdxl``), for files that carry no config of their own."""
    f = CONFIG_DIR / family / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    return json.loads(f.read_text())


def describe_keys(sd: dict) -> str:
    heads = sorted({".".join(k.split(".")[:2]) for k in sd})[:6]
    return ", ".join(heads) + (", ..." if len(sd) > 6 else "")


def detect_kind(sd: dict[str, torch.Tensor]) -> str:
    """What a model file holds: checkpoint, lora, vae, controlnet, embedding, or unknown."""
    keys = list(sd)
    if any(k.startswith(ldm_keys.UNET_PREFIX) for k in keys):
        return "checkpoint"
    if any(
        k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_"))
        or ".lora_" in k
        or "lora.down" in k
        or "lora_A" in k
        for k in keys
    ):
        return "lora"
    if any(
        k.startswith(("control_model.", "zero_convs.", "input_hint_block.", "controlnet_cond_embedding.")) for k in keys
    ):
        return "controlnet"
    if any(
        k.startswith(
            ("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "first_stage_model.encoder")
        )
        for k in keys
    ):
        return "vae"
    if any(
        k in ("emb_params", "string_to_param.*", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys
    ):
        return "embedding"
    return "unknown"


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    if f"{ldm_keys.UNET_PREFIX}label_emb.0.0.weight" in sd or any(
        k.startswith(ldm_keys.SDXL_CLIP_G_PREFIX) for k in sd
    ):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise CheckpointError(
            "this looks like a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder), which Kiln does not load yet",
            hint="use an SD1.5 or SDXL checkpoint",
        )
    probe = f"{ldm_keys.UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe in sd and sd[probe].shape[1] == 768 and any(k.startswith(ldm_keys.CLIP_PREFIX) for k in sd):
        return "sd15"
    raise CheckpointError(
        f"unknown checkpoint architecture (keys: {describe_keys(sd)})",
        hint="Kiln loads SD1.5 and SDXL LDM checkpoints, diffusers folders, and files with kiln.* metadata",
    )


# -- building modules ------------------------------------------------------------------------------------


def align_text_model_prefix(sd: dict[str, torch.Tensor], own_keys) -> dict[str, torch.Tensor]:
    """CLIP text weights named ``text_model.*`` (checkpoints, transformers 4) or without it (transformers 5):
    rename them to whatever the model at hand uses."""
    own_keys = list(own_keys)
    wants = any(k.startswith("text_model.") for k in own_keys)
    has = any(k.startswith("text_model.") for k in sd)
    if wants == has:
        return sd
    if has:
        return {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    return {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sd.items()}


def materialise(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """Fill a model built on the meta device with ``sd`` (converted to ``dtype``), move it to ``device``
    and freeze it; a CheckpointError names what does not fit (``what`` is the part's name in messages)."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    own = model.state_dict()
    if what == "text encoder":
        sd = align_text_model_prefix(sd, own)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(
            f"the {what} weights do not fit its config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
            hint="the file is damaged or its architecture is not the one its metadata/keys suggest",
        )
    for k in missing + unexpected:
        sd.pop(k, None)
    bad = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"the {what} weight {k} has shape {tuple(sd[k].shape)}, its config wants {tuple(own[k].shape)}",
            hint="the checkpoint does not match this architecture",
        )
    model.load_state_dict(sd, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if name.endswith("position_ids"):
                mod = model.get_submodule(name.rsplit(".", 1)[0])
                mod.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand((1, -1)), persistent=False)
            else:
                raise CheckpointError(f"the {what} has no value for buffer {name}")
    return model.to(device=device).eval().requires_grad_(False)


def build_unet(config: dict, sd: dict, dtype: torch.dtype, device: torch.device):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    return materialise(model, sd, "UNet", dtype, device)


def build_vae(config: dict, sd: dict, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    return materialise(model, sd, "VAE", dtype, device)


def build_text_encoder(config: dict, sd: dict, dtype: torch.dtype, device: torch.device, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(cfg)
    return materialise(model, sd, "text encoder", dtype, device)


def unet_from_ldm(sd: dict, config: dict) -> dict:
    """The UNet part of an LDM state dict under diffusers names."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        keys = list(UNet2DConditionModel.from_config(config).state_dict())
    mapping = ldm_keys.build_map(
        keys, ldm_keys.unet_key_to_ldm, ldm_keys.UNET_PREFIX, layout=ldm_keys.UnetLayout(config)
    )
    return {k: sd[v] for k, v in mapping.items() if v in sd}


def vae_from_ldm(sd: dict, config: dict, prefix: str = ldm_keys.VAE_PREFIX) -> dict:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        keys = list(AutoencoderKL.from_config(config).state_dict())
    mapping = ldm_keys.build_map(keys, ldm_keys.vae_key_to_ldm, prefix, n_blocks=len(config["block_out_channels"]))
    out = {}
    for k, v in mapping.items():
        if v in sd:
            t = sd[v]
            out[k] = t.reshape(t.shape[0], t.shape[1]) if ldm_keys.is_vae_attn_linear(v) and t.ndim == 4 else t
    return out


def vae_ldm_prefix(sd: dict) -> str | None:
    """Where a VAE lives in a state dict: inside a checkpoint, bare LDM names, or diffusers names."""
    if any(k.startswith(ldm_keys.VAE_PREFIX) for k in sd):
        return ldm_keys.VAE_PREFIX
    if any(k.startswith("encoder.down.") for k in sd):
        return ""
    return None


def load_single_file(path: Path, dtype: torch.dtype, device: torch.device) -> Components:
    sd, meta = read_state_dict(path)
    kind = detect_kind(sd)
    if kind != "checkpoint":
        where = {
            "lora": "a LoRA: put it in models/loras and use LoraLoader",
            "vae": "a VAE: put it in models/vae and use VAELoader",
            "controlnet": "a ControlNet: put it in models/controlnet and use ControlNetLoader",
            "embedding": "a textual-inversion embedding: put it in models/embeddings and write "
            "embedding:<name> in the prompt",
        }.get(kind)
        raise CheckpointError(
            f"{Path(path).name} is not a Stable Diffusion checkpoint"
            + (f"; it is {where.split(':')[0]}" if where else f" (keys: {describe_keys(sd)})"),
            hint=(
                f"this file is {where}"
                if where
                else "CheckpointLoaderSimple needs an LDM single-file checkpoint or a diffusers folder"
            ),
        )
    if meta.get("kiln.format"):
        return _load_kiln(sd, meta, dtype, device)
    family = detect_family(sd)
    unet_cfg = shipped_config(family, "unet")
    vae_cfg = shipped_config(family, "vae")
    comps = Components(family=family, scheduler_config=shipped_config(family, "scheduler"), unet_config=unet_cfg)
    comps.unet = build_unet(unet_cfg, unet_from_ldm(sd, unet_cfg), dtype, device)
    comps.vae = build_vae(vae_cfg, vae_from_ldm(sd, vae_cfg), dtype, device)
    if family == "sd15":
        te = _sub(sd, ldm_keys.CLIP_PREFIX)
        comps.text_encoders = [build_text_encoder(shipped_config(family, "text_encoder"), te, dtype, device)]
        comps.tokenizers = [make_tokenizer()]
    else:
        te1 = _sub(sd, ldm_keys.SDXL_CLIP_L_PREFIX)
        te2 = ldm_keys.open_clip_to_transformers(sd, ldm_keys.SDXL_CLIP_G_PREFIX)
        comps.text_encoders = [
            build_text_encoder(shipped_config(family, "text_encoder"), te1, dtype, device),
            build_text_encoder(shipped_config(family, "text_encoder_2"), te2, dtype, device, projection=True),
        ]
        comps.tokenizers = [make_tokenizer(), make_tokenizer(pad_token="!")]
    return comps


def _load_kiln(sd: dict, meta: dict, dtype: torch.dtype, device: torch.device) -> Components:
    if meta.get("kiln.format") != "1":
        raise CheckpointError(
            f"kiln.format {meta.get('kiln.format')!r} is newer than this Kiln understands", hint="upgrade Kiln"
        )
    unet_cfg = _json_meta(meta, "kiln.unet_config")
    vae_cfg = _json_meta(meta, "kiln.vae_config")
    te_cfg = _json_meta(meta, "kiln.text_encoder_config")
    sched = _json_meta(meta, "kiln.scheduler_config", required=False) or shipped_config("sd15", "scheduler")
    comps = Components(family=meta.get("kiln.model_family", "kiln"), scheduler_config=sched, unet_config=unet_cfg)
    comps.unet = build_unet(unet_cfg, unet_from_ldm(sd, unet_cfg), dtype, device)
    comps.vae = build_vae(vae_cfg, vae_from_ldm(sd, vae_cfg), dtype, device)
    comps.text_encoders = [build_text_encoder(te_cfg, _sub(sd, ldm_keys.CLIP_PREFIX), dtype, device)]
    if "kiln.tokenizer_vocab" in meta and "kiln.tokenizer_merges" in meta:
        comps.tokenizers = [tokenizer_from_text(meta["kiln.tokenizer_vocab"], meta["kiln.tokenizer_merges"])]
    else:
        comps.tokenizers = [make_tokenizer()]
    return comps


def load_diffusers_folder(path: Path, dtype: torch.dtype, device: torch.device) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (path / p).is_dir()]
    if missing:
        raise CheckpointError(
            f"diffusers folder {path.name} lacks {missing}",
            hint="a Stable Diffusion folder needs unet, vae, text_encoder, tokenizer, scheduler",
        )
    kw = {"torch_dtype": dtype}
    comps = Components(family="sdxl" if (path / "text_encoder_2").is_dir() else "sd15")
    comps.unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw).to(device).eval().requires_grad_(False)
    comps.unet_config = dict(comps.unet.config)
    comps.vae = AutoencoderKL.from_pretrained(path / "vae", **kw).to(device).eval().requires_grad_(False)
    comps.text_encoders = [
        CLIPTextModel.from_pretrained(path / "text_encoder", **kw).to(device).eval().requires_grad_(False)
    ]
    comps.tokenizers = [CLIPTokenizer.from_pretrained(path / "tokenizer")]
    if comps.family == "sdxl":
        comps.text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw)
            .to(device)
            .eval()
            .requires_grad_(False)
        )
        comps.tokenizers.append(CLIPTokenizer.from_pretrained(path / "tokenizer_2"))
    sched = path / "scheduler" / "scheduler_config.json"
    comps.scheduler_config = json.loads(sched.read_text()) if sched.is_file() else shipped_config("sd15", "scheduler")
    comps.family = index.get("kiln_model_family", comps.family)
    return comps


def load_checkpoint(path: Path, dtype: torch.dtype, device: torch.device) -> Components:
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"folder {path.name} is not a diffusers model (no model_index.json)")
        return load_diffusers_folder(path, dtype, device)
    return load_single_file(path, dtype, device)


def load_vae_file(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A standalone VAE: a diffusers folder/file, a bare LDM VAE file, or a checkpoint's VAE."""
    path = Path(path)
    if path.is_dir():
        from diffusers import AutoencoderKL

        sub = path / "vae" if (path / "vae").is_dir() else path
        vae = AutoencoderKL.from_pretrained(sub, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        return vae, "diffusers"
    sd, meta = read_state_dict(path)
    cfg = _json_meta(meta, "kiln.vae_config", required=False)
    kind = detect_kind(sd)
    prefix = vae_ldm_prefix(sd)
    if kind not in ("vae", "checkpoint") or (
        prefix is None and not any(k.startswith("encoder.down_blocks.") for k in sd)
    ):
        raise CheckpointError(
            f"{path.name} is not a VAE (keys: {describe_keys(sd)})",
            hint="VAELoader takes files from models/vae (e.g. vae-ft-mse-840000-ema-pruned)",
        )
    if cfg is None and (path.parent / "config.json").is_file():  # a file inside a diffusers vae/ folder
        cfg = json.loads((path.parent / "config.json").read_text())
    if cfg is None:
        cfg = shipped_config("sdxl" if "sdxl" in path.name.lower() else "sd15", "vae")
    if prefix is None:
        return build_vae(cfg, sd, dtype, device), "diffusers"
    return build_vae(cfg, vae_from_ldm(sd, cfg, prefix), dtype, device), "ldm"


# -- writing ------------------------------------------------------------------------------------------


def _plain(config: Any) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """Diffusers/transformers modules as one LDM-layout state dict (SD1 layout)."""
    out: dict[str, torch.Tensor] = {}
    usd = unet.state_dict()
    for k, v in ldm_keys.build_map(
        usd, ldm_keys.unet_key_to_ldm, ldm_keys.UNET_PREFIX, layout=ldm_keys.UnetLayout(dict(unet.config))
    ).items():
        out[v] = usd[k]
    vsd = vae.state_dict()
    for k, v in ldm_keys.build_map(
        vsd, ldm_keys.vae_key_to_ldm, ldm_keys.VAE_PREFIX, n_blocks=len(vae.config.block_out_channels)
    ).items():
        t = vsd[k]
        out[v] = t[:, :, None, None] if ldm_keys.is_vae_attn_linear(v) and t.ndim == 2 else t
    for k, t in text_encoder.state_dict().items():  # LDM files name CLIP weights text_model.*
        if not k.endswith("position_ids"):
            out[ldm_keys.CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = t
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def export_ldm_checkpoint(
    path: str | Path,
    unet,
    vae,
    text_encoder,
    tokenizer=None,
    scheduler_config: dict | None = None,
    model_family: str = "kiln",
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write diffusers components as an LDM single-file ``.safetensors`` with ``kiln.*`` metadata.

    ``tokenizer`` is a fast CLIP tokenizer (its vocabulary and merges are embedded), or None for the
    standard CLIP vocabulary. ``dtype`` converts floating-point weights (e.g. torch.float16).
    """
    from safetensors.torch import save_file

    sd = ldm_state_dict(unet, vae, text_encoder)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    te_cfg = text_encoder.config.to_dict()
    te_cfg = {k: v for k, v in te_cfg.items() if k in _CLIP_TEXT_KEYS}
    meta = {
        "kiln.format": "1",
        "kiln.model_family": model_family,
        "kiln.unet_config": json.dumps(_plain(unet.config)),
        "kiln.vae_config": json.dumps(_plain(vae.config)),
        "kiln.text_encoder_config": json.dumps(te_cfg),
        "kiln.scheduler_config": json.dumps(_plain(scheduler_config or shipped_config("sd15", "scheduler"))),
    }
    if tokenizer is not None:
        meta["kiln.tokenizer_vocab"], meta["kiln.tokenizer_merges"] = tokenizer_to_text(tokenizer)
    meta.update(extra_metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return path


_CLIP_TEXT_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
}
