"""Model loaders: checkpoints, VAEs, LoRAs, ControlNets; CLIP layer selection.

Files are found in ComfyUI's folders (``models/checkpoints`` ...; ``extra_model_paths.yaml`` adds more)
and loaded once by the model manager. LoRAs return new handles; the loaded base model is never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from kiln import engine
from kiln.engine import Combo, Float, Int, NodeError, Output, Socket
from kiln.nodes.sd.checkpoint import CheckpointError, load_checkpoint, load_vae_file, read_state_dict
from kiln.nodes.sd.controlnet import load_controlnet
from kiln.nodes.sd.handles import ClipHandle, ControlNetHandle, ModelHandle, VaeHandle, WeightPatch
from kiln.nodes.sd.lora import parse_lora
from kiln.nodes.sd.manager import file_identity, folders, get_manager


def _choices(kind: str, dirs: bool = False):
    return lambda: folders().list_models(kind, include_dirs=dirs)


def _find(kind: str, name: str, input_name: str) -> Path:
    try:
        path = folders().find_model(kind, name)
    except engine.UnsafePath as exc:
        raise NodeError(str(exc), input_name=input_name) from exc
    if path is None:
        dirs = ", ".join(str(d) for d in folders().model_dirs(kind))
        raise NodeError(
            f"{name!r} was not found in the {kind} folders ({dirs})",
            input_name=input_name,
            hint=f"put the file in models/{kind}/ or add its folder to extra_model_paths.yaml",
        )
    return path


def _identity(kind: str, name: str) -> str:
    try:
        path = folders().find_model(kind, name) if name else None
    except engine.UnsafePath:
        path = None
    if path is None:
        return f"missing:{name}"
    return "|".join(str(x) for x in file_identity(path))


def _load(kind: str, path: Path, loader: Callable[[Path, Any, Any], Any], input_name: str) -> Any:
    """``get_manager().get(kind, path, loader)``. The file code serves every loader and cannot know which
    node input named the file, so a CheckpointError it raises is given ``input_name`` here."""
    try:
        return get_manager().get(kind, path, loader)
    except CheckpointError as exc:
        if exc.input_name is None:
            exc.input_name = input_name
        raise


def _source(path: Path) -> str:
    m = get_manager()
    return "|".join(str(x) for x in (*file_identity(path), m.dtype, m.device))


class _Loaded:
    """What the manager keeps per checkpoint: the handles, so previews fitted once stay fitted."""

    def __init__(self, comps: Any, source: str, name: str):
        self.comps = comps
        self.vae = VaeHandle(comps.vae, source, name)
        self.model = ModelHandle(
            comps.unet, comps.scheduler_config, comps.family, source, preview_vae=self.vae, name=name
        )
        self.clip = ClipHandle(comps.text_encoders, comps.tokenizers, comps.family, source, name=name)


def load_checkpoint_handles(path: Path, name: str) -> _Loaded:
    source = _source(path)
    return _load("checkpoint", path, lambda p, dt, dev: _Loaded(load_checkpoint(p, dt, dev), source, name), "ckpt_name")


class CheckpointLoaderSimple(engine.Node):
    """Loads a Stable Diffusion checkpoint (LDM single file or diffusers folder): the diffusion model, the
    text encoder and the VAE."""

    display_name = "Load Checkpoint"
    category = "loaders"
    outputs = [
        Output("MODEL", tooltip="The model used for denoising latents."),
        Output("CLIP", tooltip="The CLIP model used for encoding text prompts."),
        Output("VAE", tooltip="The VAE model used for encoding and decoding images to and from latent space."),
    ]

    def run(
        self,
        ckpt_name: Annotated[
            str, Combo(_choices("checkpoints", dirs=True), tooltip="The name of the checkpoint (model) to load.")
        ],
    ):
        loaded = load_checkpoint_handles(_find("checkpoints", ckpt_name, "ckpt_name"), ckpt_name)
        return loaded.model, loaded.clip, loaded.vae

    @classmethod
    def fingerprint(cls, ckpt_name: str = "", **_: Any) -> str:
        return _identity("checkpoints", ckpt_name)


class VAELoader(engine.Node):
    """Loads a standalone VAE (LDM or diffusers layout) from models/vae."""

    display_name = "Load VAE"
    category = "loaders"
    outputs = ("VAE",)

    def run(self, vae_name: Annotated[str, Combo(_choices("vae", dirs=True))]):
        path = _find("vae", vae_name, "vae_name")
        vae, _ = _load("vae", path, load_vae_file, "vae_name")
        return VaeHandle(vae, _source(path), vae_name)

    @classmethod
    def fingerprint(cls, vae_name: str = "", **_: Any) -> str:
        return _identity("vae", vae_name)


class CLIPSetLastLayer(engine.Node):
    """Reads the text encoding from an earlier CLIP layer (-1 = last, -2 = "clip skip 2")."""

    display_name = "CLIP Set Last Layer"
    category = "conditioning"
    outputs = ("CLIP",)

    def run(
        self,
        clip: Annotated[Any, Socket("CLIP")],
        stop_at_clip_layer: Annotated[int, Int(min=-24, max=-1, step=1)] = -1,
    ):
        n = min(te.config.num_hidden_layers for te in clip.text_encoders)
        if -stop_at_clip_layer > n:
            raise NodeError(
                f"stop_at_clip_layer {stop_at_clip_layer} is deeper than this CLIP's {n} layers",
                input_name="stop_at_clip_layer",
                hint=f"use a value between -{n} and -1",
            )
        return clip.with_layer(stop_at_clip_layer)


def _load_lora_file(path: Path, dtype: Any, device: Any) -> dict:
    sd, _ = read_state_dict(path)
    return sd


def _lora_patches(
    lora_name: str, model: ModelHandle | None, clip: ClipHandle | None, strength_model: float, strength_clip: float
) -> tuple[WeightPatch | None, WeightPatch | None]:
    path = _find("loras", lora_name, "lora_name")
    sd = _load("lora", path, _load_lora_file, "lora_name")
    unet = model.unet if model is not None and strength_model != 0 else None
    encoders = clip.text_encoders if clip is not None and strength_clip != 0 else []
    family = (model or clip).family
    parsed = parse_lora(sd, unet, encoders, family)  # a LoraError names lora_name itself
    if parsed.unmatched:
        shown = ", ".join(parsed.unmatched[:5]) + (
            f" and {len(parsed.unmatched) - 5} more" if len(parsed.unmatched) > 5 else ""
        )
        raise NodeError(
            f"{len(parsed.unmatched)} LoRA keys match no layer of this {family} model: {shown}",
            input_name="lora_name",
            hint="the LoRA was made for another architecture (e.g. SDXL vs SD1.5); use one trained for this checkpoint",
        )
    if not parsed.unet and not parsed.clip and (unet is not None or encoders):
        raise NodeError(
            f"{lora_name} contains no LoRA weights Kiln recognises",
            input_name="lora_name",
            hint="supported: kohya/A1111 (lora_unet_*, lora_te_*) and diffusers/PEFT (lora_A/lora_B) files",
        )
    src = "|".join(str(x) for x in file_identity(path))
    mp = WeightPatch(src, float(strength_model), parsed.unet) if parsed.unet and unet is not None else None
    cp = WeightPatch(src, float(strength_clip), parsed.clip) if parsed.clip and encoders else None
    return mp, cp


class LoraLoader(engine.Node):
    """Applies a LoRA to the model and the CLIP. The loaded base model is never modified: removing this
    node gives exactly the output of a graph that never had it."""

    display_name = "Load LoRA"
    category = "loaders"
    outputs = [
        Output("MODEL", tooltip="The modified diffusion model."),
        Output("CLIP", tooltip="The modified CLIP model."),
    ]

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        clip: Annotated[Any, Socket("CLIP")],
        lora_name: Annotated[str, Combo(_choices("loras"))],
        strength_model: Annotated[float, Float(min=-100.0, max=100.0, step=0.01)] = 1.0,
        strength_clip: Annotated[float, Float(min=-100.0, max=100.0, step=0.01)] = 1.0,
    ):
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        mp, cp = _lora_patches(lora_name, model, clip, strength_model, strength_clip)
        return (model.with_patch(mp) if mp else model), (clip.with_patch(cp) if cp else clip)

    @classmethod
    def fingerprint(cls, lora_name: str = "", **_: Any) -> str:
        return _identity("loras", lora_name)


class LoraLoaderModelOnly(engine.Node):
    """Applies a LoRA to the diffusion model only."""

    display_name = "LoraLoaderModelOnly"
    category = "loaders"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        lora_name: Annotated[str, Combo(_choices("loras"))],
        strength_model: Annotated[float, Float(min=-100.0, max=100.0, step=0.01)] = 1.0,
    ):
        if strength_model == 0:
            return model
        mp, _ = _lora_patches(lora_name, model, None, strength_model, 0.0)
        return model.with_patch(mp) if mp else model

    @classmethod
    def fingerprint(cls, lora_name: str = "", **_: Any) -> str:
        return _identity("loras", lora_name)


class ControlNetLoader(engine.Node):
    """Loads a ControlNet (diffusers or LDM layout) from models/controlnet."""

    display_name = "Load ControlNet Model"
    category = "loaders"
    outputs = ("CONTROL_NET",)

    def run(self, control_net_name: Annotated[str, Combo(_choices("controlnet", dirs=True))]):
        path = _find("controlnet", control_net_name, "control_net_name")
        model = _load("controlnet", path, load_controlnet, "control_net_name")
        return ControlNetHandle(model, _source(path), control_net_name)

    @classmethod
    def fingerprint(cls, control_net_name: str = "", **_: Any) -> str:
        return _identity("controlnet", control_net_name)


NODES = [CheckpointLoaderSimple, VAELoader, CLIPSetLastLayer, LoraLoader, LoraLoaderModelOnly, ControlNetLoader]
