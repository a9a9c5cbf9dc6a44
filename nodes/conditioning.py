"""Text conditioning and ControlNet application."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import MAX_RESOLUTION, Float, Int, NodeError, NodeResult, Output, Socket, String
from kiln.nodes.common import check_image
from kiln.nodes.sd.conds import batch_to, check_conditioning
from kiln.nodes.sd.guidance import Control
from kiln.nodes.sd.manager import folders
from kiln.nodes.sd.prompt import PromptError, encode_weighted, load_embedding, unknown_words_warning

log = logging.getLogger(__name__)

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


def encode_prompt(clip: Any, text: str | Sequence[str], options: dict | None = None) -> list:
    """CONDITIONING ``[[cond, {"pooled_output": pooled, **options}]]`` for a CLIP handle and a prompt (or one
    prompt per text encoder, in the handle's order: SDXL's clip_l then clip_g).

    Encoders whose prompts give different numbers of chunks are evened out with chunks of the empty prompt,
    and their outputs are joined along the feature axis; the pooled output is the last encoder's.
    """
    sdxl = clip.family == "sdxl"
    n = len(clip.tokenizers)
    texts = [text] * n if isinstance(text, str) else list(text)
    conds, empties, pooled = [], [], None
    with clip.patched():
        for i, (te, tok) in enumerate(zip(clip.text_encoders, clip.tokenizers)):
            if sdxl:
                layer, norm = (-2 if clip.layer == -1 else clip.layer), False
                key = "clip_l" if i == 0 else "clip_g"
                pad = 0 if i == 1 else None
            else:
                layer, norm, key, pad = clip.layer, True, "clip_l", None
            find = _embedding_finder(te.config.hidden_size, key)
            cond, pool = encode_weighted(te, tok, texts[i], layer, norm, find, pad_id=pad)
            conds.append(cond)
            pooled = pool
            if len(set(texts)) > 1:
                empties.append(encode_weighted(te, tok, "", layer, norm, find, pad_id=pad)[0])
    if len(conds) > 1:
        longest = max(c.shape[1] for c in conds)
        if empties:
            conds = [_pad_with(c, e, longest) for c, e in zip(conds, empties)]
        conds = [c.repeat(1, longest // c.shape[1], 1) if c.shape[1] != longest else c for c in conds]
    cond = torch.cat(conds, dim=-1)
    return [[cond, {"pooled_output": pooled, **(options or {})}]]


def _pad_with(cond: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    """``cond`` followed by empty-prompt chunks up to ``length`` tokens (when whole chunks fit)."""
    missing = length - cond.shape[1]
    if missing <= 0 or missing % empty.shape[1] != 0:
        return cond
    return torch.cat([cond, empty.repeat(1, missing // empty.shape[1], 1)], dim=1)


def _check_clip(clip: Any) -> Any:
    if clip is None or not hasattr(clip, "text_encoders"):
        raise NodeError(
            "clip input is None" if clip is None else "clip is not a CLIP",
            input_name="clip",
            hint="the checkpoint has no text encoder; connect the CLIP output of a checkpoint loader",
        )
    return clip


class CLIPTextEncode(engine.Node):
    """Encodes a prompt with ComfyUI's syntax: (word:1.2), (word), [word], escaped brackets, prompts of any
    length (in 75-token chunks), embedding:name for textual inversion. Words a closed-vocabulary model (the
    shipped kiln-shapes) does not know are named in a warning (ui ``warnings`` and the log), never an error."""

    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    outputs = [Output("CONDITIONING", tooltip="Prompt embeddings that steer sampling.")]

    def run(
        self,
        text: Annotated[
            str,
            String(
                multiline=True,
                dynamic_prompts=True,
                tooltip="Prompt text; supports (word:1.2) weighting and embedding:name.",
            ),
        ],
        clip: Annotated[Any, Socket("CLIP", tooltip="Text encoder to embed the prompt with.")],
    ):
        clip = _check_clip(clip)
        cond = encode_prompt(clip, text)  # a PromptError names the text input itself
        warning = unknown_words_warning(getattr(clip, "tokenizers", ()), text)
        if warning is None:
            return cond
        log.warning("CLIPTextEncode: %s", warning)
        return NodeResult(cond, ui={"warnings": [warning]})


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


def check_cond(cond: Any, input_name: str = "conditioning") -> list:
    """A CONDITIONING input, checked: a non-empty list of ``[embedding, options]``."""
    cond = check_conditioning(None, cond, input_name)
    if not cond:
        raise NodeError(
            f"{input_name} is empty",
            input_name=input_name,
            hint="connect the output of CLIPTextEncode (or another conditioning node)",
        )
    return cond


def set_values(conditioning: Any, values: dict, input_name: str = "conditioning") -> list:
    """A copy of ``conditioning`` whose every entry carries ``values`` among its options."""
    return [[emb, {**opts, **values}] for emb, opts in check_cond(conditioning, input_name)]


_SIZE = Int(min=0, max=MAX_RESOLUTION)


class CLIPTextEncodeSDXL(engine.Node):
    """Encodes a prompt for SDXL: text_g with the large (OpenCLIP G) encoder, text_l with the CLIP L one, and
    the image size and crop the model is told it is drawing."""

    category = "advanced/conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        clip: Annotated[Any, Socket("CLIP")],
        width: Annotated[int, _SIZE] = 1024,
        height: Annotated[int, _SIZE] = 1024,
        crop_w: Annotated[int, _SIZE] = 0,
        crop_h: Annotated[int, _SIZE] = 0,
        target_width: Annotated[int, _SIZE] = 1024,
        target_height: Annotated[int, _SIZE] = 1024,
        text_g: Annotated[str, String(multiline=True, dynamic_prompts=True)] = "",
        text_l: Annotated[str, String(multiline=True, dynamic_prompts=True)] = "",
    ):
        clip = _check_clip(clip)
        if len(clip.text_encoders) != 2:
            raise NodeError(
                f"this CLIP has {len(clip.text_encoders)} text encoder(s); CLIPTextEncodeSDXL needs SDXL's two",
                input_name="clip",
                hint="connect the CLIP of an SDXL checkpoint, or use CLIPTextEncode for other models",
            )
        size = {
            "width": width,
            "height": height,
            "crop_w": crop_w,
            "crop_h": crop_h,
            "target_width": target_width,
            "target_height": target_height,
        }
        try:
            return encode_prompt(clip, [text_l, text_g], size)
        except PromptError as exc:
            exc.input_name = "text_g"
            raise


class CLIPTextEncodeSDXLRefiner(engine.Node):
    """Encodes a prompt for the SDXL refiner, with the aesthetic score and image size it is conditioned on."""

    category = "advanced/conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        *,
        ascore: Annotated[float, Float(min=0.0, max=1000.0, step=0.01)] = 6.0,
        width: Annotated[int, _SIZE] = 1024,
        height: Annotated[int, _SIZE] = 1024,
        text: Annotated[str, String(multiline=True, dynamic_prompts=True)] = "",
        clip: Annotated[Any, Socket("CLIP")],
    ):
        options = {"aesthetic_score": float(ascore), "width": width, "height": height}
        return encode_prompt(_check_clip(clip), text, options)


class ConditioningCombine(engine.Node):
    """Both conditionings together: the model's predictions for each are averaged (weighted by their areas,
    masks and strengths) at every step."""

    display_name = "Conditioning (Combine)"
    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning_1: Annotated[Any, Socket("CONDITIONING")],
        conditioning_2: Annotated[Any, Socket("CONDITIONING")],
    ):
        return check_cond(conditioning_1, "conditioning_1") + check_cond(conditioning_2, "conditioning_2")


def _first_embedding(conditioning_from: Any, conditioning_to: list) -> tuple[torch.Tensor, dict]:
    source = check_cond(conditioning_from, "conditioning_from")
    emb, opts = source[0]
    for t, _ in conditioning_to:
        if t.shape[-1] != emb.shape[-1]:
            raise NodeError(
                f"conditioning_from has embeddings of size {emb.shape[-1]}, conditioning_to of size {t.shape[-1]}",
                input_name="conditioning_from",
                hint="encode both prompts with the CLIP of the same model",
            )
    return emb, opts


class ConditioningConcat(engine.Node):
    """Appends the tokens of conditioning_from (its first entry) to every entry of conditioning_to, so the
    model attends to both prompts at once."""

    display_name = "Conditioning (Concat)"
    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning_to: Annotated[Any, Socket("CONDITIONING")],
        conditioning_from: Annotated[Any, Socket("CONDITIONING")],
    ):
        to = check_cond(conditioning_to, "conditioning_to")
        emb, _ = _first_embedding(conditioning_from, to)
        return [[torch.cat([t, batch_to(emb, t.shape[0])], dim=1), dict(o)] for t, o in to]


class ConditioningAverage(engine.Node):
    """Blends each entry of conditioning_to with the first entry of conditioning_from, token by token
    (conditioning_from is cut or zero-padded to the same length); pooled outputs are blended too."""

    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning_to: Annotated[Any, Socket("CONDITIONING")],
        conditioning_from: Annotated[Any, Socket("CONDITIONING")],
        conditioning_to_strength: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0,
    ):
        to = check_cond(conditioning_to, "conditioning_to")
        emb, opts = _first_embedding(conditioning_from, to)
        w = float(conditioning_to_strength)
        pooled_from = opts.get("pooled_output")
        out = []
        for t, o in to:
            src = batch_to(emb[:, : t.shape[1]], t.shape[0])
            if src.shape[1] < t.shape[1]:
                pad = torch.zeros(src.shape[0], t.shape[1] - src.shape[1], t.shape[2], dtype=src.dtype)
                src = torch.cat([src, pad], dim=1)
            opt = dict(o)
            pooled_to = o.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                opt["pooled_output"] = pooled_to * w + pooled_from * (1.0 - w)
            out.append([t * w + src * (1.0 - w), opt])
        return out


class ConditioningZeroOut(engine.Node):
    """The same conditioning with its embeddings and pooled outputs set to zero (a true "nothing" prompt,
    unlike the encoding of an empty text)."""

    category = "advanced/conditioning"
    outputs = ("CONDITIONING",)

    def run(self, conditioning: Annotated[Any, Socket("CONDITIONING")]):
        out = []
        for emb, opts in check_cond(conditioning):
            o = dict(opts)
            if o.get("pooled_output") is not None:
                o["pooled_output"] = torch.zeros_like(o["pooled_output"])
            out.append([torch.zeros_like(emb), o])
        return out


class ConditioningSetTimestepRange(engine.Node):
    """Makes the conditioning act only between start and end (fractions of the denoising, 0 = first step):
    combine two of these to switch prompts during sampling."""

    category = "advanced/conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning: Annotated[Any, Socket("CONDITIONING")],
        start: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.0,
        end: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 1.0,
    ):
        return set_values(conditioning, {"start_percent": float(start), "end_percent": float(end)})


NODES = [
    CLIPTextEncode,
    CLIPTextEncodeSDXL,
    CLIPTextEncodeSDXLRefiner,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningAverage,
    ConditioningZeroOut,
    ConditioningSetTimestepRange,
    ControlNetApply,
    ControlNetApplyAdvanced,
]
