"""Text conditioning and ControlNet application."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Float, NodeError, Output, Socket, String
from kiln.nodes.common import check_image
from kiln.nodes.sd.guidance import Control
from kiln.nodes.sd.manager import folders
from kiln.nodes.sd.prompt import PromptError, encode_weighted, load_embedding

_EMB_EXTS = ("", ".safetensors", ".pt", ".bin", ".pth")


def _embedding_finder(dim: int, key: str | None):
    def find(name: str) -> torch.Tensor:
        f = folders()
        for ext in _EMB_EXTS:
            p = f.find_model("embeddings", name + ext)
            if p is not None and p.is_file():
                return load_embedding(Path(p), dim, key)
        raise PromptError(
            f"embedding {name!r} was not found in the embeddings folders",
            hint=f"put {name}.safetensors (or .pt) in models/embeddings/, or remove 'embedding:{name}'",
        )

    return find


def encode_prompt(clip: Any, text: str) -> list:
    """CONDITIONING ``[[cond, {"pooled_output": pooled}]]`` for a CLIP handle and a prompt."""
    sdxl = clip.family == "sdxl"
    conds, pooled = [], None
    with clip.patched() as encoders:
        for i, (te, tok) in enumerate(zip(encoders, clip.tokenizers)):
            if sdxl:
                layer, norm = (-2 if clip.layer == -1 else clip.layer), False
                key = "clip_l" if i == 0 else "clip_g"
                pad = 0 if i == 1 else None
            else:
                layer, norm, key, pad = clip.layer, True, "clip_l", None
            cond, pool = encode_weighted(
                te, tok, text, layer, norm, _embedding_finder(te.config.hidden_size, key), pad_id=pad
            )
            conds.append(cond)
            pooled = pool
    if len(conds) > 1:
        n = max(c.shape[1] for c in conds)
        conds = [c.repeat(1, n // c.shape[1], 1) for c in conds]
    cond = torch.cat(conds, dim=-1)
    return [[cond, {"pooled_output": pooled}]]


class CLIPTextEncode(engine.Node):
    """Encodes a prompt with ComfyUI's syntax: (word:1.2), (word), [word], escaped brackets, prompts of any
    length (in 75-token chunks), embedding:name for textual inversion."""

    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    outputs = [
        Output("CONDITIONING", tooltip="A conditioning containing the embedded text used to guide the diffusion model.")
    ]

    def run(
        self,
        text: Annotated[str, String(multiline=True, dynamic_prompts=True, tooltip="The text to be encoded.")],
        clip: Annotated[Any, Socket("CLIP", tooltip="The CLIP model used for encoding the text.")],
    ):
        if clip is None:
            raise NodeError(
                "clip input is None",
                input_name="clip",
                hint="the checkpoint has no text encoder; connect the CLIP output of a checkpoint loader",
            )
        return encode_prompt(clip, text)  # a PromptError names the text input itself


def _apply(conditioning: list, make) -> list:
    """A copy of ``conditioning`` whose entries carry ``make(previous control)``."""
    out = []
    for emb, opts in conditioning:
        o = dict(opts)
        o["control"] = make(opts.get("control"))
        out.append([emb, o])
    return out


def _check_hint(image: Any) -> torch.Tensor:
    image = check_image(image, "ControlNetApply", "image")
    if image.shape[-1] != 3:
        image = image[..., :3] if image.shape[-1] == 4 else image.repeat(1, 1, 1, 3)
    return image


class ControlNetApply(engine.Node):
    """Applies a ControlNet to one conditioning (the older node; ControlNetApplyAdvanced does both)."""

    display_name = "Apply ControlNet (OLD)"
    category = "conditioning/controlnet"
    deprecated = True
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning: Annotated[Any, Socket("CONDITIONING")],
        control_net: Annotated[Any, Socket("CONTROL_NET")],
        image: Annotated[Any, Socket("IMAGE")],
        strength: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 1.0,
    ):
        if strength == 0:
            return conditioning
        hint = _check_hint(image)
        return _apply(conditioning, lambda prev: Control(control_net, hint, float(strength), 0.0, 1.0, prev))


class ControlNetApplyAdvanced(engine.Node):
    """Applies a ControlNet to positive and negative conditioning between start_percent and end_percent of
    the denoising."""

    display_name = "Apply ControlNet"
    category = "conditioning/controlnet"
    outputs = {"positive": "CONDITIONING", "negative": "CONDITIONING"}

    def run(
        self,
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        control_net: Annotated[Any, Socket("CONTROL_NET")],
        image: Annotated[Any, Socket("IMAGE")],
        strength: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 1.0,
        start_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.0,
        end_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 1.0,
        vae: Annotated[Any, Socket("VAE")] = None,
    ):
        if start_percent > end_percent:
            raise NodeError(
                f"start_percent {start_percent} is after end_percent {end_percent}",
                input_name="start_percent",
                hint="start_percent must be <= end_percent",
            )
        if strength == 0:
            return positive, negative
        hint = _check_hint(image)

        def make(prev: Any) -> Control:
            return Control(control_net, hint, float(strength), float(start_percent), float(end_percent), prev)

        return _apply(positive, make), _apply(negative, make)


NODES = [CLIPTextEncode, ControlNetApply, ControlNetApplyAdvanced]
