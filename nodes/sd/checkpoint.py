"""Reading and writing Stable Diffusion checkpoints, offline.

Three sources become the same :class:`Components`:

- an LDM single file (``.safetensors``/``.ckpt``): SD1.x or SDXL, recognised from its keys; the size of
  each part (UNet levels and widths, VAE, text encoders) is read from the shapes of its tensors
  (``model_detection``) over the configs that ship in ``configs/``, unless the file carries Kiln's exact
  configs in its header (``kiln.*_config``, written by Kiln's exporters and savers);
- a diffusers folder (``model_index.json``), loaded from disk with ``from_pretrained``.

Parts load on their own too: a diffusion model (:func:`load_unet_file`), a text encoder
(:func:`load_text_encoder_file`), a VAE (:func:`load_vae_file`). Tensors are read one at a time into
aligned memory (:class:`TensorFile`) and become the modules' parameters without another copy.

The writing side (:func:`checkpoint_state_dict`, :func:`export_ldm_checkpoint`, :func:`save_safetensors`)
lives here with the reading side so the two layouts cannot drift apart; that is why this is one file of
more than 400 lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.engine import NodeError

from . import ldm_keys, model_detection
from .tokenizer import CONFIG_DIR, make_tokenizer, standard_vocab, tokenizer_from_text, tokenizer_to_text


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


class TensorFile(Mapping):
    """The tensors of a model file, read one at a time when asked for (safetensors), so a loader reads
    only the parts it uses and holds at most one tensor in a second form (converted) at once.

    ``shapes`` answers from the file header without reading any tensor. ``.ckpt``/``.pt`` files are
    unpickled with ``weights_only=True`` and memory-mapped where torch can.
    """

    def __init__(self, path: Path):
        path = Path(path)
        self.path = path
        suffix = path.suffix.lower()
        self.metadata: dict[str, str] = {}
        self._file: Any = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._fdno: int | None = None
        if suffix in (".safetensors", ".sft"):
            try:
                self._header, self._data_start = _safetensors_header(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{path.name} is not a readable safetensors file ({exc})",
                    hint="the file is corrupt or truncated: download it again",
                ) from exc
            self.metadata = dict(self._header.pop("__metadata__", None) or {})
            self._keys = list(self._header)
            self.shapes = {k: tuple(int(x) for x in v["shape"]) for k, v in self._header.items()}
            self._file = path
            return
        if suffix in (".ckpt", ".pt", ".pth", ".bin"):
            obj = load_pickled(path)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{path.name} does not hold a state dict", hint="use a .safetensors checkpoint")
            self._tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            self._keys = list(self._tensors)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            return
        raise CheckpointError(
            f"{path.name}: unknown model file type {suffix!r}", hint="use a .safetensors file or a diffusers folder"
        )

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._file is None:
            return self._tensors[key]
        info = self._header[key]
        start, end = (int(x) for x in info["data_offsets"])
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path.name}: tensor {key} has unsupported dtype {info['dtype']}")
        # One copy, from the file straight into freshly allocated (aligned) memory, and no mapping of the
        # file that would count in the process's memory beside it. Tensors mapped from the file (what
        # safetensors' own reader gives) sit wherever the file puts them; CPU kernels then sum in another
        # order than for the same weights in aligned memory, so a model's output would depend on its
        # file's header size.
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = os.preadv(self._fd(), [view[got:]], self._data_start + start + got)
            if not n:
                raise CheckpointError(
                    f"{self.path.name} is truncated (tensor {key} ends past the end of the file)",
                    hint="the file is corrupt or truncated: download it again",
                )
            got += n
        t = buf.view(dtype) if end > start else torch.empty(0, dtype=dtype)
        return t.reshape(self.shapes[key])

    def _fd(self) -> int:
        if self._fdno is None:
            self._fdno = os.open(self._file, os.O_RDONLY)
        return self._fdno

    def close(self) -> None:
        if self._fdno is not None:
            os.close(self._fdno)
            self._fdno = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def read(self) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in self._keys}


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data) of a safetensors file; ValueError when it is not one."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("file too short")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size or n > 100 * 2**20:
            raise ValueError(f"header size {n} does not fit a {size}-byte file")
        header = json.loads(fh.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        if not 0 <= b <= e <= data:
            raise ValueError(f"tensor {k} lies outside the file")
    return header, 8 + n


def load_pickled(path: Path) -> Any:
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # old zip format or not a zip: read it whole
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path.name} cannot be read as a PyTorch checkpoint ({exc})",
            hint="Kiln loads pickled checkpoints with weights_only=True; convert it to "
            ".safetensors, or download it again if it is corrupt",
        ) from exc


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a model file; clear errors for corrupt or unknown files."""
    f = TensorFile(path)
    return f.read(), f.metadata


def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: sd[k] for k in sd if k.startswith(prefix)}


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


def detect_family(sd: Mapping[str, Any]) -> str:
    """``sdxl`` or ``sd15`` from the key layout of an LDM checkpoint (any mapping with its keys)."""
    if f"{ldm_keys.UNET_PREFIX}label_emb.0.0.weight" in sd or any(
        k.startswith((ldm_keys.SDXL_CLIP_G_PREFIX, ldm_keys.SDXL_CLIP_L_PREFIX)) for k in sd
    ):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise CheckpointError(
            "this looks like a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder), which Kiln does not load yet",
            hint="use an SD1.5 or SDXL checkpoint",
        )
    if any(k.startswith(ldm_keys.CLIP_PREFIX) for k in sd) and any(k.startswith(ldm_keys.UNET_PREFIX) for k in sd):
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
    """Fill a model built on the meta device with ``sd`` (converted to ``dtype``, in place: pass a dict
    you own), move it to ``device`` and freeze it; a CheckpointError names what does not fit (``what`` is
    the part's name in messages). The tensors become the model's parameters: no further copy."""
    for k in list(sd):  # in place: each original is freed as soon as its copy exists
        v = sd[k]
        if v.is_floating_point() and v.dtype != dtype:
            sd[k] = v.to(dtype)  # the one copy, into fresh (aligned) memory
        elif device.type == "cpu" and v.data_ptr() % 64:
            sd[k] = v.clone()  # mapped from a file (a pickled checkpoint): see TensorFile.__getitem__
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


def meta_unet(config: dict) -> torch.nn.Module:
    """A UNet with no storage (meta device): its structure and key names, built in milliseconds."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def meta_vae(config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(config)


def build_unet(config: dict, sd: dict, dtype: torch.dtype, device: torch.device, model: Any = None):
    return materialise(model if model is not None else meta_unet(config), sd, "UNet", dtype, device)


def build_vae(config: dict, sd: dict, dtype: torch.dtype, device: torch.device, model: Any = None):
    return materialise(model if model is not None else meta_vae(config), sd, "VAE", dtype, device)


def build_text_encoder(config: dict, sd: dict, dtype: torch.dtype, device: torch.device, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(cfg)
    return materialise(model, sd, "text encoder", dtype, device)


def unet_from_ldm(sd: Mapping[str, torch.Tensor], config: dict, model: Any = None, prefix: str | None = None) -> dict:
    """The UNet part of an LDM state dict under diffusers names (``model``: the meta UNet, when built)."""
    keys = list((model if model is not None else meta_unet(config)).state_dict())
    mapping = ldm_keys.build_map(
        keys,
        ldm_keys.unet_key_to_ldm,
        ldm_keys.UNET_PREFIX if prefix is None else prefix,
        layout=ldm_keys.UnetLayout(config),
    )
    return {k: sd[v] for k, v in mapping.items() if v in sd}


def vae_from_ldm(
    sd: Mapping[str, torch.Tensor], config: dict, prefix: str = ldm_keys.VAE_PREFIX, model: Any = None
) -> dict:
    keys = list((model if model is not None else meta_vae(config)).state_dict())
    mapping = ldm_keys.build_map(keys, ldm_keys.vae_key_to_ldm, prefix, n_blocks=len(config["block_out_channels"]))
    out = {}
    for k, v in mapping.items():
        if v in sd:
            t = sd[v]
            out[k] = t.reshape(t.shape[0], t.shape[1]) if ldm_keys.is_vae_attn_linear(v) and t.ndim == 4 else t
    return out


def vae_ldm_prefix(sd: Mapping[str, Any]) -> str | None:
    """Where a VAE lives in a state dict: inside a checkpoint, bare LDM names, or diffusers names."""
    if any(k.startswith(ldm_keys.VAE_PREFIX) for k in sd):
        return ldm_keys.VAE_PREFIX
    if any(k.startswith("encoder.down.") for k in sd):
        return ""
    return None


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    known = getattr(sd, "shapes", None)
    return known if known is not None else {k: tuple(v.shape) for k, v in sd.items()}


class _TokenizerWarmup:
    """Builds the standard CLIP vocabulary (about a second the first time) in a thread while the weights
    are read; ``wait()`` before the first tokenizer is made."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        if standard_vocab.cache_info().currsize == 0:
            self._thread = threading.Thread(target=standard_vocab, name="kiln-clip-vocab", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def not_a_checkpoint(path: Path, kind: str, sd: Mapping[str, Any]) -> CheckpointError:
    where = {
        "lora": "a LoRA: put it in models/loras and use LoraLoader",
        "vae": "a VAE: put it in models/vae and use VAELoader",
        "controlnet": "a ControlNet: put it in models/controlnet and use ControlNetLoader",
        "embedding": "a textual-inversion embedding: put it in models/embeddings and write "
        "embedding:<name> in the prompt",
    }.get(kind)
    return CheckpointError(
        f"{Path(path).name} is not a Stable Diffusion checkpoint"
        + (f"; it is {where.split(':')[0]}" if where else f" (keys: {describe_keys(sd)})"),
        hint=(
            f"this file is {where}"
            if where
            else "CheckpointLoaderSimple needs an LDM single-file checkpoint or a diffusers folder"
        ),
    )


def load_single_file(path: Path, dtype: torch.dtype, device: torch.device) -> Components:
    warmup = _TokenizerWarmup()
    tf = TensorFile(path)
    kind = detect_kind(tf)
    if kind != "checkpoint":
        raise not_a_checkpoint(path, kind, tf)
    return components_from_ldm(tf, tf.metadata, dtype, device, warmup)


def _fits_tokenizer(te_cfg: dict, tokenizer: Any, where: str) -> None:
    if int(te_cfg["vocab_size"]) < len(tokenizer):
        raise CheckpointError(
            f"unknown checkpoint architecture: its {where} has a {te_cfg['vocab_size']}-token vocabulary, "
            f"the CLIP tokenizer has {len(tokenizer)} tokens and the file carries no tokenizer of its own",
            hint="use a checkpoint with a standard CLIP text encoder, or one written by Kiln (it embeds its tokenizer)",
        )


def components_from_ldm(
    sd: Mapping[str, torch.Tensor],
    meta: dict[str, str],
    dtype: torch.dtype,
    device: torch.device,
    warmup: _TokenizerWarmup | None = None,
) -> Components:
    """Build every part of an LDM single-file checkpoint. Each part's architecture comes from the file's
    ``kiln.*_config`` metadata when present, else from the shapes of its tensors laid over the configs Kiln
    ships for the family (``model_detection``)."""
    fmt = meta.get("kiln.format")
    if fmt not in (None, "", "1"):
        raise CheckpointError(f"kiln.format {fmt!r} is newer than this Kiln understands", hint="upgrade Kiln")
    strict = bool(fmt)  # a file that says it is Kiln's must carry its configs
    shapes = _shapes(sd)
    xl = any(k.startswith((ldm_keys.SDXL_CLIP_L_PREFIX, ldm_keys.SDXL_CLIP_G_PREFIX)) for k in shapes) or (
        f"{ldm_keys.UNET_PREFIX}label_emb.0.0.weight" in shapes and not strict
    )
    family = meta.get("kiln.model_family") or detect_family(shapes)
    base = "sdxl" if xl or family == "sdxl" else "sd15"
    unet_cfg = _json_meta(meta, "kiln.unet_config", required=strict)
    if unet_cfg is None:
        unet_cfg = model_detection.unet_config_from_ldm(shapes, shipped_config(base, "unet"))
        if unet_cfg is None:
            raise CheckpointError(
                f"the checkpoint holds no UNet under {ldm_keys.UNET_PREFIX}", hint="the file is incomplete"
            )
        if unet_cfg.get("addition_embed_type") == "text_time":
            proj = shapes.get(ldm_keys.SDXL_CLIP_G_PREFIX + "text_projection")
            unet_cfg["addition_time_embed_dim"] = model_detection.sdxl_time_embed_dim(
                unet_cfg["projection_class_embeddings_input_dim"], proj[1] if proj else None
            )
    vae_cfg = _json_meta(meta, "kiln.vae_config", required=strict)
    if vae_cfg is None:
        vae_cfg = model_detection.vae_config_from_ldm(shapes, shipped_config(base, "vae"))
        if vae_cfg is None:
            raise CheckpointError(
                f"the checkpoint holds no VAE under {ldm_keys.VAE_PREFIX}",
                hint="load the model with UNETLoader and the VAE with VAELoader",
            )
    sched = _json_meta(meta, "kiln.scheduler_config", required=False)
    if sched is None:
        sched = shipped_config(base, "scheduler")
        if "v_pred" in shapes:  # ComfyUI's mark for v-prediction models
            sched["prediction_type"] = "v_prediction"
    te_cfgs = _text_configs(shapes, meta, xl, strict)
    comps = Components(family=family, scheduler_config=sched, unet_config=unet_cfg)
    unet = meta_unet(unet_cfg)
    comps.unet = build_unet(unet_cfg, unet_from_ldm(sd, unet_cfg, unet), dtype, device, unet)
    vae = meta_vae(vae_cfg)
    comps.vae = build_vae(vae_cfg, vae_from_ldm(sd, vae_cfg, model=vae), dtype, device, vae)
    if xl:
        te1 = _sub(sd, ldm_keys.SDXL_CLIP_L_PREFIX)
        comps.text_encoders = [build_text_encoder(te_cfgs[0], te1, dtype, device)]
        del te1
        te2 = ldm_keys.open_clip_to_transformers(sd, ldm_keys.SDXL_CLIP_G_PREFIX)
        comps.text_encoders.append(build_text_encoder(te_cfgs[1], te2, dtype, device, projection=True))
    else:
        comps.text_encoders = [build_text_encoder(te_cfgs[0], _sub(sd, ldm_keys.CLIP_PREFIX), dtype, device)]
    # Last, so building the standard vocabulary (in the warm-up thread) overlaps with reading the weights.
    comps.tokenizers = _tokenizers(meta, warmup, len(te_cfgs))
    for i, (cfg, tok) in enumerate(zip(te_cfgs, comps.tokenizers)):
        _fits_tokenizer(cfg, tok, "text encoder" if len(te_cfgs) == 1 else ("first", "second")[i] + " text encoder")
    return comps


def _text_configs(shapes: dict, meta: dict[str, str], xl: bool, strict: bool) -> list[dict]:
    if xl:
        te1_cfg = _json_meta(meta, "kiln.text_encoder_config", required=False) or (
            model_detection.text_config_from_transformers(
                shapes, shipped_config("sdxl", "text_encoder"), ldm_keys.SDXL_CLIP_L_PREFIX
            )
        )
        te2_cfg = _json_meta(meta, "kiln.text_encoder_2_config", required=False) or (
            model_detection.text_config_from_open_clip(
                shapes, shipped_config("sdxl", "text_encoder_2"), ldm_keys.SDXL_CLIP_G_PREFIX
            )
        )
        if te1_cfg is None or te2_cfg is None:
            raise CheckpointError(
                "the SDXL checkpoint lacks one of its two text encoders (CLIP-L, OpenCLIP-G)",
                hint="load the model with UNETLoader and the text encoders with DualCLIPLoader (type sdxl)",
            )
        return [te1_cfg, te2_cfg]
    te_cfg = _json_meta(meta, "kiln.text_encoder_config", required=strict) or (
        model_detection.text_config_from_transformers(
            shapes, shipped_config("sd15", "text_encoder"), ldm_keys.CLIP_PREFIX
        )
    )
    if te_cfg is None:
        raise CheckpointError(
            f"the checkpoint holds no text encoder under {ldm_keys.CLIP_PREFIX}",
            hint="load the model with UNETLoader and the text encoder with CLIPLoader",
        )
    return [te_cfg]


def _tokenizers(meta: dict[str, str], warmup: _TokenizerWarmup | None, n: int) -> list:
    if "kiln.tokenizer_vocab" in meta and "kiln.tokenizer_merges" in meta:
        tok = tokenizer_from_text(meta["kiln.tokenizer_vocab"], meta["kiln.tokenizer_merges"])
        return [tok] * n
    if warmup is not None:
        warmup.wait()
    return [make_tokenizer()] if n == 1 else [make_tokenizer(), make_tokenizer(pad_token="!")]


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


def _wrong_kind(path: Path, sd: Mapping[str, Any], wanted: str, node: str) -> CheckpointError:
    kind = detect_kind(sd)
    shown = {"checkpoint": "a full checkpoint (use CheckpointLoaderSimple)", "lora": "a LoRA (use LoraLoader)"}.get(
        kind, f"a {kind} file" if kind != "unknown" else f"not {wanted} (keys: {describe_keys(sd)})"
    )
    return CheckpointError(f"{Path(path).name} is {shown}", hint=f"{node} takes {wanted} files")


def load_unet_file(path: Path, dtype: torch.dtype, device: torch.device) -> Components:
    """A diffusion model on its own (UNETLoader): LDM names with or without ``model.diffusion_model.``
    (ComfyUI's ModelSave writes them with it), or diffusers names with the ``config.json`` beside them."""
    path = Path(path)
    tf = TensorFile(path)
    meta, shapes = tf.metadata, tf.shapes
    if any(k.startswith(ldm_keys.UNET_PREFIX) for k in shapes):
        prefix = ldm_keys.UNET_PREFIX
    elif "input_blocks.0.0.weight" in shapes:
        prefix = ""
    elif "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in shapes):
        prefix = None  # diffusers names
    else:
        raise _wrong_kind(path, tf, "diffusion model (UNet)", "UNETLoader")
    cfg = _json_meta(meta, "kiln.unet_config", required=False)
    if cfg is None and prefix is None and (path.parent / "config.json").is_file():
        cfg = json.loads((path.parent / "config.json").read_text())
    xl = (prefix or "") + "label_emb.0.0.weight" in shapes or "add_embedding.linear_1.weight" in shapes
    base = "sdxl" if xl else "sd15"
    if cfg is None:
        if prefix is None:
            raise CheckpointError(
                f"{path.name} names its weights as diffusers does but has no config.json beside it",
                hint="keep the UNet's config.json next to the file (a diffusers unet/ folder), or use an LDM file",
            )
        cfg = model_detection.unet_config_from_ldm(shapes, shipped_config(base, "unet"), prefix)
        assert cfg is not None
        if xl:
            cfg["addition_time_embed_dim"] = model_detection.sdxl_time_embed_dim(
                cfg["projection_class_embeddings_input_dim"], None
            )
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    model = meta_unet(cfg)
    sd = unet_from_ldm(tf, cfg, model, prefix) if prefix is not None else {k: tf[k] for k in tf}
    family = meta.get("kiln.model_family") or base
    sched = _json_meta(meta, "kiln.scheduler_config", required=False) or shipped_config(base, "scheduler")
    comps = Components(family=family, scheduler_config=sched, unet_config=cfg)
    comps.unet = build_unet(cfg, sd, dtype, device, model)
    return comps


@dataclass
class TextEncoderFile:
    """One CLIP text encoder read from its own file (CLIPLoader, DualCLIPLoader)."""

    model: torch.nn.Module
    tokenizer: Any
    config: dict
    projection: bool  # carries a text projection (pooled output for SDXL)


def load_text_encoder_file(path: Path, dtype: torch.dtype, device: torch.device) -> TextEncoderFile:
    """A CLIP text encoder in transformers' names (``text_model.*``, with or without a prefix such as
    ``cond_stage_model.transformer.``; ComfyUI's CLIPSave writes them bare) or OpenCLIP's (``resblocks``)."""
    path = Path(path)
    tf = TensorFile(path)
    shapes, meta = tf.shapes, tf.metadata
    hf = [k for k in shapes if k.endswith("embeddings.token_embedding.weight")]
    oc = [
        k
        for k in shapes
        if k.endswith("token_embedding.weight") and not k.endswith("embeddings.token_embedding.weight")
    ]
    if hf:
        k = hf[0]
        prefix = k[: k.index("text_model.")] if "text_model." in k else k[: -len("embeddings.token_embedding.weight")]
        hidden = shapes[k][1]
        projection = prefix + "text_projection.weight" in shapes
    elif oc and any("transformer.resblocks." in k for k in shapes):
        prefix = oc[0][: -len("token_embedding.weight")]
        hidden = shapes[oc[0]][1]
        projection = prefix + "text_projection" in shapes
    else:
        if any(k.startswith(("encoder.block.", "shared.")) or ".layers.0.self_attn.q_proj" in k for k in shapes):
            raise CheckpointError(
                f"{path.name} is a T5 or LLM text encoder, which Kiln cannot run",
                hint="Kiln runs CLIP text encoders (SD1.x CLIP-L, SDXL CLIP-L and CLIP-G)",
            )
        raise _wrong_kind(path, tf, "CLIP text encoder", "CLIPLoader")
    base = shipped_config("sdxl", "text_encoder_2") if hidden == 1280 else shipped_config("sd15", "text_encoder")
    cfg = _json_meta(meta, "kiln.text_encoder_config", required=False)
    if cfg is None:
        infer = model_detection.text_config_from_transformers if hf else model_detection.text_config_from_open_clip
        cfg = infer(shapes, base, prefix)
    assert cfg is not None
    sd = _sub(tf, prefix) if hf else ldm_keys.open_clip_to_transformers(tf, prefix)
    proj = sd.get("text_projection.weight")
    if (
        proj is not None
        and proj.ndim == 2
        and proj.shape[0] == proj.shape[1]
        and torch.equal(proj, torch.eye(len(proj)))
    ):
        projection = False  # an identity placeholder (ComfyUI stores one with every CLIP-L): a plain CLIP-L
    if not projection:
        sd.pop("text_projection.weight", None)
    (tok,) = _tokenizers(meta, None, 1)
    if projection and hidden == 1280 and "kiln.tokenizer_vocab" not in meta:
        tok = make_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    _fits_tokenizer(cfg, tok, "text encoder")
    model = build_text_encoder(cfg, sd, dtype, device, projection=projection)
    return TextEncoderFile(model, tok, cfg, projection)


def load_vae_file(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A standalone VAE: a diffusers folder/file, a bare LDM VAE file, or a checkpoint's VAE."""
    path = Path(path)
    if path.is_dir():
        from diffusers import AutoencoderKL

        sub = path / "vae" if (path / "vae").is_dir() else path
        vae = AutoencoderKL.from_pretrained(sub, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        return vae, "diffusers"
    sd = TensorFile(path)
    cfg = _json_meta(sd.metadata, "kiln.vae_config", required=False)
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
    family = "sdxl" if "sdxl" in path.name.lower() or any("label_emb" in k for k in sd) else "sd15"
    if cfg is None and prefix is not None:
        cfg = model_detection.vae_config_from_ldm(sd.shapes, shipped_config(family, "vae"), prefix)
    if cfg is None:
        cfg = shipped_config(family, "vae")
    if prefix is None:
        return build_vae(cfg, sd.read(), dtype, device), "diffusers"
    return build_vae(cfg, vae_from_ldm(sd, cfg, prefix), dtype, device), "ldm"


# -- writing ------------------------------------------------------------------------------------------


def unet_ldm_state_dict(unet: torch.nn.Module, prefix: str = ldm_keys.UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under their LDM names."""
    usd = unet.state_dict()
    layout = ldm_keys.UnetLayout(dict(unet.config))
    return {v: usd[k] for k, v in ldm_keys.build_map(usd, ldm_keys.unet_key_to_ldm, prefix, layout=layout).items()}


def vae_ldm_state_dict(vae: torch.nn.Module, prefix: str = ldm_keys.VAE_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under their LDM names (attention as 1x1 convolutions)."""
    vsd = vae.state_dict()
    out = {}
    n = len(vae.config.block_out_channels)
    for k, v in ldm_keys.build_map(vsd, ldm_keys.vae_key_to_ldm, prefix, n_blocks=n).items():
        t = vsd[k]
        out[v] = t[:, :, None, None] if ldm_keys.is_vae_attn_linear(v) and t.ndim == 2 else t
    return out


def clip_state_dict(text_encoder: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights as LDM files and ComfyUI name them (``text_model.*``)."""
    out = {}
    for k, t in text_encoder.state_dict().items():
        if not k.endswith("position_ids"):
            out[prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k)] = t
    return out


def checkpoint_state_dict(unet, vae, text_encoders: list) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict: SD1 layout for one text encoder, SDXL layout (CLIP-L + OpenCLIP-G) for two."""
    out = unet_ldm_state_dict(unet) if unet is not None else {}
    if vae is not None:
        out.update(vae_ldm_state_dict(vae))
    if len(text_encoders) == 1:
        out.update(clip_state_dict(text_encoders[0], ldm_keys.CLIP_PREFIX))
    elif len(text_encoders) == 2:
        out.update(clip_state_dict(text_encoders[0], ldm_keys.SDXL_CLIP_L_PREFIX))
        out.update(ldm_keys.transformers_to_open_clip(text_encoders[1].state_dict(), ldm_keys.SDXL_CLIP_G_PREFIX))
    elif text_encoders:
        raise CheckpointError(f"cannot write {len(text_encoders)} text encoders in the LDM layout")
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """Diffusers/transformers modules as one LDM-layout state dict (SD1 layout)."""
    return checkpoint_state_dict(unet, vae, [text_encoder])


def plain_config(config: Any) -> dict:
    """A diffusers/transformers config as JSON-ready data (tuples as lists, private keys dropped)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def text_encoder_config(text_encoder: torch.nn.Module) -> dict:
    return {k: v for k, v in text_encoder.config.to_dict().items() if k in _CLIP_TEXT_KEYS}


def save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``sd`` to ``path`` atomically: a temporary file in the same folder, renamed into place, so a
    reader never sees half a file and a failed write leaves nothing behind."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    te_cfg = text_encoder_config(text_encoder)
    meta = {
        "kiln.format": "1",
        "kiln.model_family": model_family,
        "kiln.unet_config": json.dumps(plain_config(unet.config)),
        "kiln.vae_config": json.dumps(plain_config(vae.config)),
        "kiln.text_encoder_config": json.dumps(te_cfg),
        "kiln.scheduler_config": json.dumps(plain_config(scheduler_config or shipped_config("sd15", "scheduler"))),
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
