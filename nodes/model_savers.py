"""Model savers: whole checkpoints, text encoders, VAEs and diffusion models as ``.safetensors`` files.

Files go to the output folder under the prefix's subfolder with ComfyUI's counter
(``output/checkpoints/ComfyUI_00001_.safetensors``), in the layouts other tools read: the LDM single-file
layout for checkpoints (SD1: ``cond_stage_model.transformer.``; SDXL: ``conditioner.embedders.0/1``),
``model.diffusion_model.*`` for a diffusion model, bare LDM names (``encoder.down...``) for a VAE, and
``text_model.*`` for each text encoder. The header carries ComfyUI's metadata (``prompt`` and one entry per
``extra_pnginfo`` key, e.g. ``workflow``; ``modelspec.*`` for SDXL) plus Kiln's exact configs
(``kiln.*_config``), so Kiln reloads what it saved bit for bit while other tools read the weights alone.

Weight patches (LoRA) are applied while saving: the file holds what the handle computes with. Run-time
model patches (hypernetworks, FreeU, ...) change how a model runs, not its weights, and are not saved.
Each file is written to a temporary name in its folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Hidden, NodeError, NodeResult, Socket, String, UnsafePath
from kiln.nodes.sd import ldm_keys
from kiln.nodes.sd.checkpoint import (
    checkpoint_state_dict,
    clip_state_dict,
    plain_config,
    save_safetensors,
    text_encoder_config,
    unet_ldm_state_dict,
    vae_ldm_state_dict,
)
from kiln.nodes.sd.manager import folders
from kiln.nodes.sd.tokenizer import standard_vocab, tokenizer_to_text


def output_file(filename_prefix: str, suffix: str = ".safetensors") -> tuple[Path, int]:
    """The next free ``<prefix>_NNNNN_<suffix>`` in the output folder (ComfyUI's counter: one past the
    highest number already there), and that number."""
    f = folders()
    sub, _, base = filename_prefix.replace("\\", "/").rpartition("/")
    if not base:
        raise NodeError("filename_prefix must end with a file name", input_name="filename_prefix")
    try:
        folder = f.safe_path("output", sub) if sub else f.output_dir
    except UnsafePath as exc:
        raise NodeError(
            f"filename_prefix {filename_prefix!r} would save outside the output folder ({exc})",
            input_name="filename_prefix",
            hint="use a relative prefix such as 'checkpoints/my_merge'",
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(base) + r"_(\d+)_")
    counter = 1 + max((int(m[1]) for name in os.listdir(folder) if (m := pattern.match(name))), default=0)
    while (folder / f"{base}_{counter:05d}_{suffix}").exists():
        counter += 1
    return folder / f"{base}_{counter:05d}_{suffix}", counter


def comfy_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """ComfyUI's header entries: ``prompt`` (the API graph as JSON, empty when unknown) and one JSON
    entry per ``extra_pnginfo`` key (the editor's ``workflow``)."""
    meta = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    for k, v in (extra_pnginfo or {}).items():
        meta[str(k)] = json.dumps(v)
    return meta


def _tokenizer_metadata(tokenizer: Any) -> dict[str, str]:
    """The tokenizer, when it is not the standard CLIP one (Kiln's own small models)."""
    if tokenizer is None or len(tokenizer) == len(standard_vocab()[0]):
        return {}
    vocab, merges = tokenizer_to_text(tokenizer)
    return {"kiln.tokenizer_vocab": vocab, "kiln.tokenizer_merges": merges}


def _model_metadata(model: Any, title: str) -> dict[str, str]:
    prediction = model.scheduler_config.get("prediction_type", "epsilon")
    meta = {
        "kiln.model_family": model.family,
        "kiln.unet_config": json.dumps(plain_config(model.unet.config)),
        "kiln.scheduler_config": json.dumps(plain_config(model.scheduler_config)),
        "modelspec.predict_key": "v" if prediction == "v_prediction" else "epsilon",
    }
    if model.family == "sdxl":
        meta.update(
            {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "modelspec.implementation": "sgm",
                "modelspec.title": title,
            }
        )
    return meta


def _clip_metadata(clip: Any) -> dict[str, str]:
    meta = {"kiln.text_encoder_config": json.dumps(text_encoder_config(clip.text_encoders[0]))}
    if len(clip.text_encoders) > 1:
        meta["kiln.text_encoder_2_config"] = json.dumps(text_encoder_config(clip.text_encoders[1]))
    meta.update(_tokenizer_metadata(clip.tokenizers[0] if clip.tokenizers else None))
    return meta


def _patched(handle: Any) -> contextlib.AbstractContextManager:
    return handle.patched() if handle is not None else contextlib.nullcontext()


def _v_pred_keys(model: Any) -> dict[str, torch.Tensor]:
    """ComfyUI marks v-prediction models with an empty ``v_pred`` tensor in the file."""
    return {"v_pred": torch.tensor([])} if model.scheduler_config.get("prediction_type") == "v_prediction" else {}


class CheckpointSave(engine.Node):
    """Saves model, CLIP and VAE as one LDM single-file checkpoint (loads in Kiln, ComfyUI and A1111),
    with LoRAs applied."""

    display_name = "Save Checkpoint"
    category = "advanced/model_merging"
    output_node = True

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        clip: Annotated[Any, Socket("CLIP")],
        vae: Annotated[Any, Socket("VAE")],
        filename_prefix: Annotated[str, String()] = "checkpoints/ComfyUI",
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ):
        if model.family == "sdxl" and len(clip.text_encoders) != 2:
            raise NodeError(
                "an SDXL model needs SDXL's CLIP (two text encoders) in the same checkpoint",
                input_name="clip",
                hint="connect the CLIP from the SDXL checkpoint or a DualCLIPLoader (type sdxl)",
            )
        if len(clip.text_encoders) not in (1, 2):
            raise NodeError(f"cannot save a CLIP with {len(clip.text_encoders)} text encoders", input_name="clip")
        path, counter = output_file(filename_prefix)
        meta = comfy_metadata(prompt, extra_pnginfo)
        meta.update(_model_metadata(model, f"{path.name.rsplit('_', 2)[0]} {counter}"))
        meta.update(_clip_metadata(clip))
        meta["kiln.vae_config"] = json.dumps(plain_config(vae.vae.config))
        with _patched(model), _patched(clip):
            sd = checkpoint_state_dict(model.unet, vae.vae, list(clip.text_encoders))
            sd.update(_v_pred_keys(model))
            save_safetensors(sd, path, meta)
        return NodeResult(ui={})


class CLIPSave(engine.Node):
    """Saves each text encoder of a CLIP to its own file (``<prefix>_clip_l_00001_``, ``_clip_g_``), in
    ``text_model.*`` names, with LoRAs applied."""

    display_name = "CLIPSave"
    category = "advanced/model_merging"
    output_node = True

    def run(
        self,
        clip: Annotated[Any, Socket("CLIP")],
        filename_prefix: Annotated[str, String()] = "clip/ComfyUI",
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ):
        names = ["clip_l"] if len(clip.text_encoders) == 1 else ["clip_l", "clip_g"]
        if len(clip.text_encoders) > 2:
            names = [f"te{i}" for i in range(len(clip.text_encoders))]
        meta = {"format": "pt", **comfy_metadata(prompt, extra_pnginfo)}
        with _patched(clip):
            for i, (name, te) in enumerate(zip(names, clip.text_encoders)):
                path, _ = output_file(f"{filename_prefix}_{name}")
                own = {"kiln.text_encoder_config": json.dumps(text_encoder_config(te))}
                if i < len(clip.tokenizers):
                    own.update(_tokenizer_metadata(clip.tokenizers[i]))
                save_safetensors(clip_state_dict(te), path, {**meta, **own})
        return NodeResult(ui={})


class VAESave(engine.Node):
    """Saves a VAE in the bare LDM layout (``encoder.down.0...``), as VAELoader and other tools read it."""

    display_name = "VAESave"
    category = "advanced/model_merging"
    output_node = True

    def run(
        self,
        vae: Annotated[Any, Socket("VAE")],
        filename_prefix: Annotated[str, String()] = "vae/ComfyUI_vae",
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ):
        path, _ = output_file(filename_prefix)
        meta = comfy_metadata(prompt, extra_pnginfo)
        meta["kiln.vae_config"] = json.dumps(plain_config(vae.vae.config))
        sd = {k: v.detach().cpu() for k, v in vae_ldm_state_dict(vae.vae, prefix="").items()}
        save_safetensors(sd, path, meta)
        return NodeResult(ui={})


class ModelSave(engine.Node):
    """Saves the diffusion model alone (``model.diffusion_model.*``), with LoRAs applied; UNETLoader reads it."""

    display_name = "ModelSave"
    category = "advanced/model_merging"
    output_node = True

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        filename_prefix: Annotated[str, String()] = "diffusion_models/ComfyUI",
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ):
        path, counter = output_file(filename_prefix)
        meta = comfy_metadata(prompt, extra_pnginfo)
        meta.update(_model_metadata(model, f"{path.name.rsplit('_', 2)[0]} {counter}"))
        with _patched(model):
            sd = {k: v.detach().cpu() for k, v in unet_ldm_state_dict(model.unet, ldm_keys.UNET_PREFIX).items()}
            sd.update(_v_pred_keys(model))
            save_safetensors(sd, path, meta)
        return NodeResult(ui={})


NODES = [CheckpointSave, CLIPSave, VAESave, ModelSave]
