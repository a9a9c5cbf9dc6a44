"""Weight patches as nodes: model and CLIP merges (weighted sums of two models' weights, whole or per UNet
block) and attention multipliers (the q/k/v/out projections of the UNet's or text encoders' attention).

A merge returns a new handle whose weight patches read the other model's weights (with that model's own
patches, such as LoRAs) when the merged model runs; nothing is copied or changed in the loaded models. In
ComfyUI's convention ``ratio`` is the share of the *first* model: ``ratio * model1 + (1 - ratio) * model2``,
so 1.0 gives model1 and 0.0 gives model2, both exactly.

Per-block merges name blocks as ComfyUI does, in the original (LDM) UNet layout: ``input_blocks.N``,
``middle_block.N``, ``output_blocks.N``, ``time_embed``, ``label_emb``, ``out``. A weight takes the ratio of
the last listed block name its LDM key starts with (``nodes/sd/ldm_keys.py`` maps Kiln's diffusers names),
and the first listed ratio when none matches.

ModelMergeSD1 and ModelMergeSDXL declare their inputs the classic way (``INPUT_TYPES``): their input names
(``"input_blocks.0."``) are ComfyUI's and are not Python identifiers, so a typed ``run`` cannot spell them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from kiln import engine
from kiln.engine import Float, NodeError, Socket
from kiln.nodes.model_guidance_patches import check_model
from kiln.nodes.sd import ldm_keys
from kiln.nodes.sd.handles import ClipHandle, MergePatch, ModelHandle, ScalePatch, param_shapes

_RATIO = Float(min=0.0, max=1.0, step=0.01)
_MULTIPLIER = Float(min=-10.0, max=10.0, step=0.01)
_CLIP_SKIPPED = (".position_ids", ".logit_scale")  # not weights (ComfyUI leaves them out of CLIP merges)


def _check_pair(first: Any, second: Any, kind: type, names: tuple[str, str]) -> None:
    """Both inputs are handles of ``kind`` with the same parameter names and shapes, else a NodeError that
    names the second input."""
    what = "MODEL" if kind is ModelHandle else "CLIP"
    for value, name in zip((first, second), names):
        if not isinstance(value, kind):
            raise NodeError(f"{name} is not a {what}", input_name=name, hint=f"connect the {what} output of a loader")
    mine, theirs = param_shapes(first.param_space()), param_shapes(second.param_space())
    if mine == theirs:
        return
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    differ = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
    if differ:
        n = differ[0]
        detail = f"{len(differ)} weights differ in shape, e.g. {n}: {theirs[n]} vs {mine[n]}"
    elif missing:
        detail = f"{len(missing)} of {names[0]}'s weights are missing from it, e.g. {missing[0]}"
    else:
        detail = f"it has {len(extra)} weights {names[0]} lacks, e.g. {extra[0]}"
    raise NodeError(
        f"{names[1]} ({second.family}) has a different architecture from {names[0]} ({first.family}): {detail}",
        input_name=names[1],
        hint=f"merge two {what}s of the same model family (for instance two SD1.5 or two SDXL checkpoints)",
    )


def _ldm_name_table(model: ModelHandle) -> dict[str, str]:
    """``{diffusers parameter name: LDM key}`` of a model's UNet (names without an LDM key are left out)."""
    unet: Any = model.unet
    layout = ldm_keys.UnetLayout(dict(unet.config))
    out = {}
    for name in param_shapes(model.param_space()):
        try:
            out[name] = ldm_keys.unet_key_to_ldm(name, layout)
        except KeyError:
            pass
    return out


def _fmt(x: float) -> str:
    return repr(float(x))


def merge_models(model1: ModelHandle, model2: ModelHandle, a: float, b: float, label: str) -> ModelHandle:
    """``a * model1 + b * model2`` for every UNet weight."""
    _check_pair(model1, model2, ModelHandle, ("model1", "model2"))
    coeffs = (float(a), float(b))
    return model1.with_patch(MergePatch(model2, lambda name: coeffs, f"{label}:{_fmt(a)},{_fmt(b)}"))


def merge_blocks(model1: Any, model2: Any, ratios: Sequence[tuple[str, float]]) -> ModelHandle:
    """Per-block ``ratio * model1 + (1 - ratio) * model2``; ``ratios`` are (LDM key prefix, ratio) in order."""
    _check_pair(model1, model2, ModelHandle, ("model1", "model2"))
    ratios = [(str(p), float(r)) for p, r in ratios]
    default = ratios[0][1] if ratios else 1.0
    table = _ldm_name_table(model1)
    per_name: dict[str, tuple[float, float]] = {}
    for name, ldm in table.items():
        r = default
        for prefix, value in ratios:
            if ldm.startswith(prefix):
                r = value
        per_name[name] = (r, 1.0 - r)
    fallback = (default, 1.0 - default)
    label = "blocks:" + ";".join(f"{p}={_fmt(r)}" for p, r in ratios)
    return model1.with_patch(MergePatch(model2, lambda name: per_name.get(name, fallback), label))


def merge_clips(clip1: Any, clip2: Any, a: float, b: float, label: str) -> ClipHandle:
    """``a * clip1 + b * clip2`` for every text-encoder weight."""
    _check_pair(clip1, clip2, ClipHandle, ("clip1", "clip2"))
    coeffs, keep = (float(a), float(b)), (1.0, 0.0)

    def coefficients(name: str) -> tuple[float, float]:
        return keep if name.endswith(_CLIP_SKIPPED) else coeffs

    return clip1.with_patch(MergePatch(clip2, coefficients, f"{label}:{_fmt(a)},{_fmt(b)}"))


class ModelMergeSimple(engine.Node):
    """Blends two diffusion models: ratio * model1 + (1 - ratio) * model2 (1.0 = model1, 0.0 = model2)."""

    category = "advanced/model_merging"
    outputs = ("MODEL",)

    def run(
        self,
        model1: Annotated[Any, Socket("MODEL")],
        model2: Annotated[Any, Socket("MODEL")],
        ratio: Annotated[float, _RATIO] = 1.0,
    ):
        return merge_models(model1, model2, ratio, 1.0 - ratio, "simple")


class ModelMergeBlocks(engine.Node):
    """Blends two diffusion models with one ratio for the input blocks, one for the middle block and one for
    the output blocks (each: the share of model1)."""

    category = "advanced/model_merging"
    outputs = ("MODEL",)

    def run(
        self,
        model1: Annotated[Any, Socket("MODEL")],
        model2: Annotated[Any, Socket("MODEL")],
        input: Annotated[float, _RATIO] = 1.0,
        middle: Annotated[float, _RATIO] = 1.0,
        out: Annotated[float, _RATIO] = 1.0,
    ):
        return merge_blocks(model1, model2, [("input", input), ("middle", middle), ("out", out)])


class ModelMergeSubtract(engine.Node):
    """model1 - multiplier * model2: for instance the difference a fine-tune made to a base model."""

    category = "advanced/model_merging"
    outputs = ("MODEL",)

    def run(
        self,
        model1: Annotated[Any, Socket("MODEL")],
        model2: Annotated[Any, Socket("MODEL")],
        multiplier: Annotated[float, _MULTIPLIER] = 1.0,
    ):
        return merge_models(model1, model2, 1.0, -multiplier, "subtract")


class ModelMergeAdd(engine.Node):
    """model1 + model2: adds a difference made by ModelMergeSubtract to another model."""

    category = "advanced/model_merging"
    outputs = ("MODEL",)

    def run(self, model1: Annotated[Any, Socket("MODEL")], model2: Annotated[Any, Socket("MODEL")]):
        return merge_models(model1, model2, 1.0, 1.0, "add")


class CLIPMergeSimple(engine.Node):
    """Blends two text encoders: ratio * clip1 + (1 - ratio) * clip2 (1.0 = clip1, 0.0 = clip2)."""

    category = "advanced/model_merging"
    outputs = ("CLIP",)

    def run(
        self,
        clip1: Annotated[Any, Socket("CLIP")],
        clip2: Annotated[Any, Socket("CLIP")],
        ratio: Annotated[float, _RATIO] = 1.0,
    ):
        return merge_clips(clip1, clip2, ratio, 1.0 - ratio, "simple")


class CLIPMergeSubtract(engine.Node):
    """clip1 - multiplier * clip2."""

    category = "advanced/model_merging"
    outputs = ("CLIP",)

    def run(
        self,
        clip1: Annotated[Any, Socket("CLIP")],
        clip2: Annotated[Any, Socket("CLIP")],
        multiplier: Annotated[float, _MULTIPLIER] = 1.0,
    ):
        return merge_clips(clip1, clip2, 1.0, -multiplier, "subtract")


class CLIPMergeAdd(engine.Node):
    """clip1 + clip2."""

    category = "advanced/model_merging"
    outputs = ("CLIP",)

    def run(self, clip1: Annotated[Any, Socket("CLIP")], clip2: Annotated[Any, Socket("CLIP")]):
        return merge_clips(clip1, clip2, 1.0, 1.0, "add")


def _block_names(n_input: int, n_middle: int, n_output: int, dot: str) -> list[str]:
    names = ["time_embed.", "label_emb."]
    names += [f"input_blocks.{i}{dot}" for i in range(n_input)]
    names += [f"middle_block.{i}{dot}" for i in range(n_middle)]
    names += [f"output_blocks.{i}{dot}" for i in range(n_output)]
    return names + ["out."]


class _ModelMergeByBlock:
    """A per-block merge for one architecture (classic declaration: the input names are LDM key prefixes)."""

    BLOCKS: list[str] = []
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging/model_specific"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        # lists, not tuples: /object_info shows INPUT_TYPES() as declared
        required: dict[str, Any] = {"model1": ["MODEL"], "model2": ["MODEL"]}
        for name in cls.BLOCKS:
            required[name] = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]
        return {"required": required}

    def merge(self, model1: Any, model2: Any, **ratios: float):
        return (merge_blocks(model1, model2, [(b, ratios.get(b, 1.0)) for b in self.BLOCKS]),)


class ModelMergeSD1(_ModelMergeByBlock):
    """Blends two SD1.x/SD2.x models with one ratio (the share of model1) per UNet block."""

    DESCRIPTION = __doc__
    BLOCKS = _block_names(12, 3, 12, ".")


class ModelMergeSDXL(_ModelMergeByBlock):
    """Blends two SDXL models with one ratio (the share of model1) per UNet block."""

    DESCRIPTION = __doc__
    BLOCKS = _block_names(9, 3, 9, "")


# -- attention multipliers (weight patches) --------------------------------------------------------------

_MULT = Float(min=0.0, max=10.0, step=0.01)


def _projection_factors(names: dict[str, str], q: float, k: float, v: float, out: float) -> dict[str, float]:
    factors = {}
    for role, value in (("q", q), ("k", k), ("v", v), ("out", out)):
        for kind in ("weight", "bias"):
            factors[f"{names[role]}.{kind}"] = value
    return factors


def unet_attention_multiplier(model: Any, attn: str, q: float, k: float, v: float, out: float) -> Any:
    check_model(model)
    names = {r: f".{attn}.{p}" for r, p in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0"))}
    factors = _projection_factors(names, q, k, v, out)
    return model.with_patch(ScalePatch(factors, attn)) if any(f != 1.0 for f in factors.values()) else model


class UNetSelfAttentionMultiply(engine.Node):
    """Multiplies the query, key, value and output projections of the UNet's self-attention."""

    category = "_for_testing/attention_experiments"
    experimental = True
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        q: Annotated[float, _MULT] = 1.0,
        k: Annotated[float, _MULT] = 1.0,
        v: Annotated[float, _MULT] = 1.0,
        out: Annotated[float, _MULT] = 1.0,
    ):
        return unet_attention_multiplier(model, "attn1", q, k, v, out)


class UNetCrossAttentionMultiply(engine.Node):
    """Multiplies the query, key, value and output projections of the UNet's cross-attention (the prompt)."""

    category = "_for_testing/attention_experiments"
    experimental = True
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        q: Annotated[float, _MULT] = 1.0,
        k: Annotated[float, _MULT] = 1.0,
        v: Annotated[float, _MULT] = 1.0,
        out: Annotated[float, _MULT] = 1.0,
    ):
        return unet_attention_multiplier(model, "attn2", q, k, v, out)


class CLIPAttentionMultiply(engine.Node):
    """Multiplies the query, key, value and output projections of the text encoders' self-attention."""

    category = "_for_testing/attention_experiments"
    experimental = True
    outputs = ("CLIP",)

    def run(
        self,
        clip: Annotated[Any, Socket("CLIP")],
        q: Annotated[float, _MULT] = 1.0,
        k: Annotated[float, _MULT] = 1.0,
        v: Annotated[float, _MULT] = 1.0,
        out: Annotated[float, _MULT] = 1.0,
    ):
        if not isinstance(clip, ClipHandle):
            raise NodeError("clip is not a CLIP", input_name="clip", hint="connect the CLIP output of a loader")
        names = {r: f".self_attn.{p}_proj" for r, p in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "out"))}
        factors = _projection_factors(names, q, k, v, out)
        return clip.with_patch(ScalePatch(factors, "clip")) if any(f != 1.0 for f in factors.values()) else clip


NODES = [
    ModelMergeSimple,
    ModelMergeBlocks,
    ModelMergeSubtract,
    ModelMergeAdd,
    ModelMergeSD1,
    ModelMergeSDXL,
    CLIPMergeSimple,
    CLIPMergeSubtract,
    CLIPMergeAdd,
    UNetSelfAttentionMultiply,
    UNetCrossAttentionMultiply,
    CLIPAttentionMultiply,
]
