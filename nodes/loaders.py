"""Model loaders: checkpoints (single files, diffusers folders, with a config), diffusion models, text
encoders, VAEs, LoRAs, ControlNets (full and diff), hypernetworks; CLIP layer selection.

Files are found in ComfyUI's folders (``models/checkpoints``, ``models/diffusion_models`` (and ``unet``),
``models/text_encoders`` (and ``clip``) ...; ``extra_model_paths.yaml`` adds more) and loaded once by the
model manager. LoRAs and hypernetworks return new handles; the loaded base model is never changed.
The savers are in ``model_savers.py``.

One file over 400 lines: every loader shares the lookup, caching and error-naming helpers at the top,
and each loader is a thin node over ``nodes/sd/checkpoint.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Combo, Float, Int, NodeError, Output, Socket
from kiln.nodes.sd.checkpoint import (
    CheckpointError,
    TextEncoderFile,
    load_checkpoint,
    load_diffusers_folder,
    load_text_encoder_file,
    load_unet_file,
    load_vae_file,
    read_state_dict,
)
from kiln.nodes.sd.controlnet import load_controlnet
from kiln.nodes.sd.handles import ClipHandle, ControlNetHandle, ModelHandle, VaeHandle, WeightPatch
from kiln.nodes.sd.lora import parse_lora
from kiln.nodes.sd.manager import file_identity, folders, get_manager
from kiln.nodes.sd.model_patch import ModelPatch


class _FolderChoices:
    """The files in a model folder kind, read afresh each time; ``where()`` names the folders searched, so
    an empty list is reported with the place to put files (validation reads it)."""

    def __init__(self, kind: str, dirs: bool = False):
        self.kind, self.dirs = kind, dirs

    def __call__(self) -> list[str]:
        return folders().list_models(self.kind, include_dirs=self.dirs)

    def where(self) -> str:
        return ", ".join(str(d) for d in folders().model_dirs(self.kind)) or f"the {self.kind} folder"


def _choices(kind: str, dirs: bool = False) -> _FolderChoices:
    return _FolderChoices(kind, dirs)


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


def _load(kind: str, path: Path, loader: Callable[[Path, Any, Any], Any], input_name: str, device: Any = None) -> Any:
    """``get_manager().get(kind, path, loader)``. The file code serves every loader and cannot know which
    node input named the file, so a CheckpointError it raises is given ``input_name`` here."""
    try:
        return get_manager().get(kind, path, loader, device=device)
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


def load_checkpoint_handles(path: Path, name: str, input_name: str = "ckpt_name") -> _Loaded:
    source = _source(path)
    return _load("checkpoint", path, lambda p, dt, dev: _Loaded(load_checkpoint(p, dt, dev), source, name), input_name)


class CheckpointLoaderSimple(engine.Node):
    """Loads a Stable Diffusion checkpoint (LDM single file or diffusers folder): the diffusion model, the
    text encoder and the VAE."""

    display_name = "Load Checkpoint"
    category = "loaders"
    outputs = [
        Output("MODEL", tooltip="Diffusion UNet that predicts the noise."),
        Output("CLIP", tooltip="Text encoder(s) for CLIPTextEncode."),
        Output("VAE", tooltip="Autoencoder between pixels and latents."),
    ]

    def run(
        self,
        ckpt_name: Annotated[
            str,
            Combo(
                _choices("checkpoints", dirs=True),
                tooltip="Checkpoint file (or diffusers folder) under models/checkpoints.",
            ),
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
        Output("MODEL", tooltip="The UNet with the LoRA applied."),
        Output("CLIP", tooltip="The text encoder with the LoRA applied."),
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


# -- checkpoints with a config, diffusers folders -------------------------------------------------------


def _yaml_choices(kind: str):
    return lambda: folders().list_models(kind, extensions=(".yaml", ".yml"))


def _ldm_config_options(path: Path) -> dict:
    """What Kiln takes from an LDM inference config (the rest it reads from the weights):
    ``parameterization: v`` and the CLIP layer (``layer: penultimate`` = CLIP skip 2)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        params = (data.get("model") or {}).get("params") or {}
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise NodeError(
            f"{path.name} is not a readable LDM config ({exc})",
            input_name="config_name",
            hint="use one of the inference configs that ship with Stable Diffusion (v1-inference.yaml)",
        ) from exc
    cond = ((params.get("cond_stage_config") or {}).get("params")) or {}
    return {
        "v": params.get("parameterization") == "v",
        "layer": -2 if cond.get("layer") == "penultimate" else -1,
    }


class CheckpointLoader(engine.Node):
    """Loads a checkpoint with an LDM inference config (deprecated: CheckpointLoaderSimple reads everything
    from the file). The architecture still comes from the weights; the config sets v-prediction and the
    CLIP layer (``penultimate`` = CLIP skip 2)."""

    display_name = "Load Checkpoint With Config (DEPRECATED)"
    category = "advanced/loaders"
    deprecated = True
    outputs = ("MODEL", "CLIP", "VAE")

    def run(
        self,
        config_name: Annotated[str, Combo(_yaml_choices("configs"))],
        ckpt_name: Annotated[str, Combo(_choices("checkpoints", dirs=True))],
    ):
        opts = _ldm_config_options(_find("configs", config_name, "config_name"))
        loaded = load_checkpoint_handles(_find("checkpoints", ckpt_name, "ckpt_name"), ckpt_name)
        model, clip = loaded.model, loaded.clip
        if opts["v"]:
            sched = {**model.scheduler_config, "prediction_type": "v_prediction"}
            model = ModelHandle(
                model.unet, sched, model.family, model.source + "|v", preview_vae=model.preview_vae, name=model.name
            )
        if opts["layer"] != -1:
            clip = clip.with_layer(opts["layer"])
        return model, clip, loaded.vae

    @classmethod
    def fingerprint(cls, config_name: str = "", ckpt_name: str = "", **_: Any) -> str:
        return _identity("configs", config_name) + "+" + _identity("checkpoints", ckpt_name)


def _diffusers_choices() -> list[str]:
    return [n for n in folders().list_models("diffusers", extensions=(), include_dirs=True)]


class DiffusersLoader(engine.Node):
    """Loads a diffusers model folder (``model_index.json``, unet/, vae/, text_encoder/...) from
    models/diffusers."""

    display_name = "DiffusersLoader"
    category = "advanced/loaders/deprecated"
    outputs = ("MODEL", "CLIP", "VAE")

    def run(self, model_path: Annotated[str, Combo(_diffusers_choices)]):
        path = _find("diffusers", model_path, "model_path")
        if not (path / "model_index.json").is_file():
            raise NodeError(
                f"{model_path} is not a diffusers model folder (no model_index.json)",
                input_name="model_path",
                hint="pick a folder saved by diffusers' save_pretrained",
            )
        source = _source(path)
        loaded = _load(
            "checkpoint",
            path,
            lambda p, dt, dev: _Loaded(load_diffusers_folder(p, dt, dev), source, model_path),
            "model_path",
        )
        return loaded.model, loaded.clip, loaded.vae

    @classmethod
    def fingerprint(cls, model_path: str = "", **_: Any) -> str:
        return _identity("diffusers", model_path)


# -- a diffusion model or text encoders on their own -------------------------------------------------------

_FP8 = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def _round_through(unet: torch.nn.Module, fp8: torch.dtype) -> torch.nn.Module:
    """Round every Linear/Conv weight and bias to ``fp8`` and back: the values ComfyUI computes with when
    it stores weights in fp8. Kiln keeps them in the compute dtype (CPUs have no fp8 arithmetic), so this
    changes the numbers as fp8 would but does not save memory."""
    with torch.no_grad():
        for mod in unet.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                for p in mod.parameters(recurse=False):
                    p.data = p.data.to(fp8).to(p.dtype)
    return unet


class UNETLoader(engine.Node):
    """Loads a diffusion model (UNet) on its own from models/diffusion_models (or models/unet). Its
    architecture is read from the weights; the noise schedule is its family's (SD1 or SDXL).

    ``weight_dtype`` fp8 choices round the weights through that format, as ComfyUI stores them; the
    computation stays in the model manager's dtype (CPUs have no fp8 arithmetic), so memory is not reduced.
    ``fp8_e4m3fn_fast`` (fp8 matrix products on recent GPUs) computes as ``fp8_e4m3fn`` here."""

    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    outputs = ("MODEL",)

    def run(
        self,
        unet_name: Annotated[str, Combo(_choices("diffusion_models"))],
        weight_dtype: Annotated[str, Combo(["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])],
    ):
        path = _find("diffusion_models", unet_name, "unet_name")
        fp8 = _FP8.get(weight_dtype)
        if fp8 is None:
            loader = load_unet_file
        else:

            def loader(p: Path, dt: Any, dev: Any) -> Any:
                comps = load_unet_file(p, dt, dev)
                _round_through(comps.unet, fp8)
                return comps

        comps = _load(f"unet:{weight_dtype}", path, loader, "unet_name")
        source = _source(path) + ("" if fp8 is None else f"|{weight_dtype}")
        return ModelHandle(comps.unet, comps.scheduler_config, comps.family, source, name=unet_name)

    @classmethod
    def fingerprint(cls, unet_name: str = "", **_: Any) -> str:
        return _identity("diffusion_models", unet_name)


CLIP_TYPES = [
    "stable_diffusion",
    "stable_cascade",
    "sd3",
    "stable_audio",
    "mochi",
    "ltxv",
    "pixart",
    "cosmos",
    "lumina2",
    "wan",
    "hidream",
    "chroma",
    "ace",
    "omnigen2",
    "qwen_image",
    "hunyuan_image",
]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]


def _text_encoder(name: str, input_name: str, device: str) -> tuple[TextEncoderFile, str]:
    path = _find("text_encoders", name, input_name)
    if device == "cpu":
        dev = torch.device("cpu")
        try:
            te = get_manager().get("text_encoder", path, load_text_encoder_file, dtype=torch.float32, device=dev)
        except CheckpointError as exc:
            exc.input_name = exc.input_name or input_name
            raise
        return te, "|".join(str(x) for x in (*file_identity(path), torch.float32, dev))
    return _load("text_encoder", path, load_text_encoder_file, input_name), _source(path)


def _unsupported_type(node: str, type_: str, runs: str) -> NodeError:
    return NodeError(
        f"{node} type {type_!r} needs text encoders Kiln cannot run (Kiln runs CLIP models for SD1.x and SDXL)",
        input_name="type",
        hint=f"use type {runs}, or run this graph in a tool that supports {type_!r} models",
    )


class CLIPLoader(engine.Node):
    """Loads one CLIP text encoder from models/text_encoders (or models/clip): an SD1.x CLIP-L, for
    ``type`` stable_diffusion. ``device`` cpu keeps it on the CPU in fp32."""

    display_name = "Load CLIP"
    category = "advanced/loaders"
    outputs = ("CLIP",)

    def run(
        self,
        clip_name: Annotated[str, Combo(_choices("text_encoders"))],
        type: Annotated[str, Combo(CLIP_TYPES)],
        device: Annotated[str, Combo(["default", "cpu"], optional=True, extra={"advanced": True})] = "default",
    ):
        if type != "stable_diffusion":
            raise _unsupported_type("CLIPLoader", type, "'stable_diffusion' (CLIP-L), or DualCLIPLoader 'sdxl'")
        te, source = _text_encoder(clip_name, "clip_name", device or "default")
        if te.config.get("hidden_size") == 1280:
            raise NodeError(
                f"{clip_name} is an OpenCLIP-G text encoder (SDXL's second); alone it fits no model Kiln runs",
                input_name="clip_name",
                hint="load it with DualCLIPLoader (type sdxl) together with a CLIP-L",
            )
        return ClipHandle([te.model], [te.tokenizer], "sd15", source, name=clip_name)

    @classmethod
    def fingerprint(cls, clip_name: str = "", **_: Any) -> str:
        return _identity("text_encoders", clip_name)


class DualCLIPLoader(engine.Node):
    """Loads SDXL's two text encoders (CLIP-L and OpenCLIP-G, in either order) from two files as one CLIP."""

    display_name = "DualCLIPLoader"
    category = "advanced/loaders"
    outputs = ("CLIP",)

    def run(
        self,
        clip_name1: Annotated[str, Combo(_choices("text_encoders"))],
        clip_name2: Annotated[str, Combo(_choices("text_encoders"))],
        type: Annotated[str, Combo(DUAL_CLIP_TYPES)],
        device: Annotated[str, Combo(["default", "cpu"], optional=True, extra={"advanced": True})] = "default",
    ):
        if type != "sdxl":
            raise _unsupported_type("DualCLIPLoader", type, "'sdxl' (CLIP-L + CLIP-G)")
        a, sa = _text_encoder(clip_name1, "clip_name1", device or "default")
        b, sb = _text_encoder(clip_name2, "clip_name2", device or "default")
        pair = sorted(
            [(a, sa, clip_name1), (b, sb, clip_name2)],
            key=lambda x: (x[0].projection, x[0].config.get("hidden_size", 0)),
        )
        (l_te, l_src, l_name), (g_te, g_src, g_name) = pair
        if l_te.projection or not g_te.projection:
            which = "clip_name2" if l_te.projection else "clip_name1"
            raise NodeError(
                "SDXL needs one CLIP-L and one OpenCLIP-G text encoder (the G with its text projection); "
                f"{'both have' if l_te.projection else 'neither has'} a projection",
                input_name=which,
                hint="pick clip_l.safetensors and clip_g.safetensors (from an SDXL model)",
            )
        return ClipHandle(
            [l_te.model, g_te.model], [l_te.tokenizer, g_te.tokenizer], "sdxl", f"{l_src}+{g_src}", name=g_name
        )

    @classmethod
    def fingerprint(cls, clip_name1: str = "", clip_name2: str = "", **_: Any) -> str:
        return _identity("text_encoders", clip_name1) + "+" + _identity("text_encoders", clip_name2)


# -- ControlNet differences, hypernetworks -----------------------------------------------------------------


def _controlnet_from_diff(model: ModelHandle, diff: dict, name: str) -> torch.nn.Module:
    """A ControlNet stored as its difference from the model it was trained on (``difference`` key): its
    weights are the file's plus the model's (patched) weights of the same LDM name."""
    from diffusers import ControlNetModel

    from kiln.nodes.sd import ldm_keys
    from kiln.nodes.sd.checkpoint import materialise, unet_ldm_state_dict

    cn_prefix = "control_model." if any(k.startswith("control_model.") for k in diff) else ""
    with model.patched():
        base = unet_ldm_state_dict(model.unet, prefix="")
        full = {}
        for k, t in diff.items():
            if not k.startswith(cn_prefix) or k == "difference":
                continue
            rest = k[len(cn_prefix) :]
            w = base.get(rest)
            full[k] = t + w.to(t.dtype) if w is not None and w.shape == t.shape else t
    hint = sorted(
        int(k[len(cn_prefix) :].split(".")[1])
        for k in full
        if k.startswith(cn_prefix + "input_hint_block.") and k.endswith(".weight")
    )
    outs = [full[f"{cn_prefix}input_hint_block.{i}.weight"].shape[0] for i in hint[:-1]]
    if not outs:
        raise NodeError(f"{name} has no ControlNet hint encoder", input_name="control_net_name")
    chs = tuple([outs[0], *outs[2::2]])
    with torch.device("meta"):
        cn = ControlNetModel.from_unet(
            model.unet, conditioning_embedding_out_channels=chs, load_weights_from_unet=False
        )
    mapping = ldm_keys.controlnet_map(cn.state_dict(), ldm_keys.UnetLayout(dict(cn.config)), prefix=cn_prefix)
    sd = {k: full[v] for k, v in mapping.items() if v in full}
    return materialise(cn, sd, "ControlNet", model.dtype, model.device)


class DiffControlNetLoader(engine.Node):
    """Loads a "diff" ControlNet: one stored as its difference from the model it was trained on, added to
    ``model``'s weights (LoRAs applied to the model included). An ordinary ControlNet file loads as
    ControlNetLoader does."""

    display_name = "Load ControlNet Model (diff)"
    category = "loaders"
    outputs = ("CONTROL_NET",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        control_net_name: Annotated[str, Combo(_choices("controlnet", dirs=True))],
    ):
        path = _find("controlnet", control_net_name, "control_net_name")
        if path.is_dir():
            return ControlNetLoader().run(control_net_name)
        sd = _load("controlnet-file", path, _load_lora_file, "control_net_name")
        if "difference" not in sd:
            return ControlNetLoader().run(control_net_name)
        try:
            cn = _controlnet_from_diff(model, sd, control_net_name)
        except CheckpointError as exc:
            raise NodeError(
                f"{control_net_name} does not fit this model: {exc.message}",
                input_name="control_net_name",
                hint="a diff ControlNet only works with the model family it was made from",
            ) from exc
        source = _source(path) + "|diff:" + model.__kiln_fingerprint__().hex()
        return ControlNetHandle(cn, source, control_net_name)

    @classmethod
    def fingerprint(cls, control_net_name: str = "", **_: Any) -> str:
        return _identity("controlnet", control_net_name)


_ACTIVATIONS: dict[str, Callable[[], torch.nn.Module]] = {
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}


def parse_hypernetwork(obj: Any, name: str) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """{width: (net for keys, net for values)} from an A1111 hypernetwork file's contents: per width, two
    stacks of Linear layers (optionally with LayerNorm and an activation between them). Dropout layers
    are left out: they do nothing at inference."""
    if not isinstance(obj, dict):
        raise NodeError(f"{name} does not hold a hypernetwork", input_name="hypernetwork_name")
    act = obj.get("activation_func", "linear") or "linear"
    if act not in _ACTIVATIONS:
        raise NodeError(
            f"{name} uses activation {act!r}, which hypernetworks in ComfyUI and Kiln do not support",
            input_name="hypernetwork_name",
            hint=f"supported: {', '.join(_ACTIVATIONS)}",
        )
    layer_norm = bool(obj.get("is_layer_norm", False))
    activate_output = bool(obj.get("activate_output", False))
    nets: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
    for key, pair in obj.items():
        try:
            width = int(key)
        except (TypeError, ValueError):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) < 2:
            raise NodeError(f"{name}: entry {key} is not a pair of layer stacks", input_name="hypernetwork_name")
        stacks = []
        for sd in pair[:2]:
            names = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
            layers: list[torch.nn.Module] = []
            i = 0
            while i < len(names):
                w, b = sd[names[i] + ".weight"], sd[names[i] + ".bias"]
                lin = torch.nn.Linear(w.shape[1], w.shape[0])
                lin.load_state_dict({"weight": w.float(), "bias": b.float()})
                layers.append(lin)
                last = i == len(names) - (2 if layer_norm else 1)
                if act != "linear" and (not last or activate_output):
                    layers.append(_ACTIVATIONS[act]())
                if layer_norm:
                    i += 1
                    lw, lb = sd[names[i] + ".weight"], sd[names[i] + ".bias"]
                    ln = torch.nn.LayerNorm(lw.shape[0])
                    ln.load_state_dict({"weight": lw.float(), "bias": lb.float()})
                    layers.append(ln)
                i += 1
            stacks.append(torch.nn.Sequential(*layers).eval().requires_grad_(False))
        nets[width] = (stacks[0], stacks[1])
    if not nets:
        raise NodeError(f"{name} holds no hypernetwork layers", input_name="hypernetwork_name")
    return nets


class HypernetworkPatch(ModelPatch):
    """Adds ``strength * net(x)`` to the inputs of every attention's key and value projections (self- and
    cross-attention), choosing the net by the input's width; queries are untouched. Installed as forward
    pre-hooks for the sampling run only, so it works with any weights and attention implementation."""

    def __init__(self, source: str, strength: float, nets: dict[int, tuple[torch.nn.Module, torch.nn.Module]]):
        self.source = source
        self.strength = float(strength)
        self.nets = nets

    def token(self) -> str:
        return f"hypernetwork:{self.source}@{self.strength!r}"

    def _hook(self, which: int) -> Callable:
        def pre(module: torch.nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            pair = self.nets.get(int(x.shape[-1]))
            if pair is None:
                return None
            net = pair[which]
            first = next(net.parameters())
            if first.device != x.device:
                net.to(x.device)
            return (x + (net(x.float()) * self.strength).to(x.dtype), *args[1:])

        return pre

    def unet_hooks(self, unet: torch.nn.Module, state: Any) -> contextlib.AbstractContextManager:
        return self.installed(unet)

    @contextlib.contextmanager
    def installed(self, unet: torch.nn.Module) -> Iterator[None]:
        handles = []
        try:
            for name, mod in unet.named_modules():
                if name.rsplit(".", 1)[-1] in ("attn1", "attn2") and hasattr(mod, "to_k") and hasattr(mod, "to_v"):
                    handles.append(mod.to_k.register_forward_pre_hook(self._hook(0)))
                    handles.append(mod.to_v.register_forward_pre_hook(self._hook(1)))
            yield
        finally:
            for h in handles:
                h.remove()


def _load_hypernetwork(path: Path, dtype: Any, device: Any) -> Any:
    from kiln.nodes.sd.checkpoint import load_pickled

    if path.suffix.lower() in (".safetensors", ".sft"):
        raise CheckpointError(
            f"{path.name}: hypernetworks are .pt files (A1111's format)", hint="use the .pt hypernetwork file"
        )
    return load_pickled(path)


class HypernetworkLoader(engine.Node):
    """Applies an A1111-style hypernetwork (models/hypernetworks/*.pt) to the model's attention keys and
    values, as ComfyUI does. The loaded base model is never modified."""

    display_name = "HypernetworkLoader"
    category = "loaders"
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        hypernetwork_name: Annotated[str, Combo(_choices("hypernetworks"))],
        strength: Annotated[float, Float(min=-10.0, max=10.0, step=0.01)] = 1.0,
    ):
        path = _find("hypernetworks", hypernetwork_name, "hypernetwork_name")
        obj = _load("hypernetwork", path, _load_hypernetwork, "hypernetwork_name")
        nets = parse_hypernetwork(obj, hypernetwork_name)
        widths = {int(m.to_k.in_features) for n, m in model.unet.named_modules() if n.endswith(("attn1", "attn2"))}
        if widths and not widths & set(nets):
            raise NodeError(
                f"{hypernetwork_name} has layers for widths {sorted(nets)}, this model's attention uses "
                f"{sorted(widths)}",
                input_name="hypernetwork_name",
                hint="the hypernetwork was made for another model family; use one trained for this checkpoint",
            )
        src = "|".join(str(x) for x in file_identity(path))
        return model.with_model_patch(HypernetworkPatch(src, strength, nets))

    @classmethod
    def fingerprint(cls, hypernetwork_name: str = "", **_: Any) -> str:
        return _identity("hypernetworks", hypernetwork_name)


NODES = [
    CheckpointLoaderSimple,
    CheckpointLoader,
    DiffusersLoader,
    UNETLoader,
    CLIPLoader,
    DualCLIPLoader,
    VAELoader,
    CLIPSetLastLayer,
    LoraLoader,
    LoraLoaderModelOnly,
    ControlNetLoader,
    DiffControlNetLoader,
    HypernetworkLoader,
]
