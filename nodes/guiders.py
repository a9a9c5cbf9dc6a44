"""GUIDER nodes (how a model's predictions for several conditionings become one) and Perp-Neg.

A GUIDER value (:class:`kiln.nodes.sd.guidance.GuiderValue`) is what SamplerCustomAdvanced samples with; the
modes are described in that module.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Combo, Float, NodeError, Socket
from kiln.nodes.sd.conds import check_conditioning
from kiln.nodes.sd.guidance import GuiderValue, fingerprint_conditioning, perp_neg
from kiln.nodes.sd.model_patch import CfgArgs, ModelPatch

_CFG = Float(min=0.0, max=100.0, step=0.1, round=0.01)
_NEG_SCALE = Float(min=0.0, max=100.0, step=0.01)


def _model(model: Any) -> Any:
    if not hasattr(model, "unet") or not hasattr(model, "model_patches"):
        raise NodeError("model is not a MODEL", input_name="model", hint="connect the MODEL output of a loader")
    return model


def _conds(model: Any, **named: Any) -> dict[str, list]:
    out = {}
    for name, cond in named.items():
        cond = check_conditioning(model, cond, name)
        if not cond:
            raise NodeError(f"{name} is empty", input_name=name, hint="connect a CLIPTextEncode output")
        out[name] = cond
    return out


class BasicGuider(engine.Node):
    """Guides with one conditioning and no negative (for models distilled without CFG, or cfg 1)."""

    category = "sampling/custom_sampling/guiders"
    outputs = ("GUIDER",)

    def run(self, model: Annotated[Any, Socket("MODEL")], conditioning: Annotated[Any, Socket("CONDITIONING")]):
        model = _model(model)
        c = _conds(model, conditioning=conditioning)
        return GuiderValue(model, {"positive": c["conditioning"]}, (1.0,), "basic")


class CFGGuider(engine.Node):
    """Classifier-free guidance: the prediction moves away from the negative towards the positive by cfg."""

    category = "sampling/custom_sampling/guiders"
    outputs = ("GUIDER",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        cfg: Annotated[float, _CFG] = 8.0,
    ):
        model = _model(model)
        return GuiderValue(model, _conds(model, positive=positive, negative=negative), (float(cfg),), "cfg")


class DualCFGGuider(engine.Node):
    """Two positive conditionings with their own scales: cfg_conds pulls from cond2 towards cond1,
    cfg_cond2_negative from the negative towards cond2. "nested" applies the first guidance inside the
    second."""

    category = "sampling/custom_sampling/guiders"
    outputs = ("GUIDER",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        cond1: Annotated[Any, Socket("CONDITIONING")],
        cond2: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        cfg_conds: Annotated[float, _CFG] = 8.0,
        cfg_cond2_negative: Annotated[float, _CFG] = 8.0,
        style: Annotated[str, Combo(["regular", "nested"])] = "regular",
    ):
        model = _model(model)
        c = _conds(model, cond1=cond1, cond2=cond2, negative=negative)
        conds = {"positive": c["cond1"], "middle": c["cond2"], "negative": c["negative"]}
        cfg = (float(cfg_conds), float(cfg_cond2_negative))
        return GuiderValue(model, conds, cfg, "dual_cfg", (("style", style),))


class PerpNegGuider(engine.Node):
    """Perpendicular negative guidance: only the part of the negative that does not overlap the positive is
    pushed away from, so a negative prompt cannot cancel what the positive asks for."""

    category = "_for_testing"
    experimental = True
    outputs = ("GUIDER",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        empty_conditioning: Annotated[Any, Socket("CONDITIONING")],
        cfg: Annotated[float, _CFG] = 8.0,
        neg_scale: Annotated[float, _NEG_SCALE] = 1.0,
    ):
        model = _model(model)
        c = _conds(model, positive=positive, negative=negative, empty_conditioning=empty_conditioning)
        conds = {"positive": c["positive"], "negative": c["negative"], "empty_negative_prompt": c["empty_conditioning"]}
        return GuiderValue(model, conds, (float(cfg),), "perp_neg", (("neg_scale", float(neg_scale)),))


class PerpNegPatch(ModelPatch):
    """Perp-Neg as a model patch: the CFG combination evaluates the empty conditioning as well."""

    def __init__(self, empty: list, neg_scale: float):
        self.empty = empty
        self.neg_scale = float(neg_scale)
        self._token = f"perp_neg:{fingerprint_conditioning(empty).hex()}@{self.neg_scale!r}"

    def token(self) -> str:
        return self._token

    def cfg(self, args: CfgArgs) -> torch.Tensor | None:
        empty = args.predict(args.x, args.sigma, self.empty)
        uncond = args.uncond_denoised if args.uncond_denoised is not None else torch.zeros_like(args.cond_denoised)
        return perp_neg(args.cond_denoised, uncond, empty, self.neg_scale, args.cfg)


class PerpNeg(engine.Node):
    """Perp-Neg on the model (use PerpNegGuider instead): every CFG step also evaluates empty_conditioning."""

    display_name = "Perp-Neg (DEPRECATED by PerpNegGuider)"
    category = "_for_testing"
    deprecated = True
    experimental = True
    outputs = ("MODEL",)

    def run(
        self,
        model: Annotated[Any, Socket("MODEL")],
        empty_conditioning: Annotated[Any, Socket("CONDITIONING")],
        neg_scale: Annotated[float, _NEG_SCALE] = 1.0,
    ):
        model = _model(model)
        empty = _conds(model, empty_conditioning=empty_conditioning)["empty_conditioning"]
        return model.with_model_patch(PerpNegPatch(empty, neg_scale))


NODES = [BasicGuider, CFGGuider, DualCFGGuider, PerpNegGuider, PerpNeg]
