"""Where and how strongly a conditioning acts: areas, masks, strength; and the inputs of inpainting models.

The options these nodes set are read by the guider (``kiln.nodes.sd.conds`` says how each one acts).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch.nn.functional as F

from kiln import engine
from kiln.engine import MAX_RESOLUTION, Boolean, Combo, Float, Int, NodeError, Socket
from kiln.nodes.common import check_image, check_mask
from kiln.nodes.conditioning import check_cond, set_values
from kiln.nodes.latent import check_vae, encode

_STRENGTH = Float(min=0.0, max=10.0, step=0.01)
_SIDE = Int(min=64, max=MAX_RESOLUTION, step=8)
_OFFSET = Int(min=0, max=MAX_RESOLUTION, step=8)
_FRACTION = Float(min=0, max=1.0, step=0.01)


class ConditioningSetArea(engine.Node):
    """Confines the conditioning to a rectangle, in pixels (rounded down to the latent grid of 8): the prompt
    draws there, blended into its surroundings. Combine several to compose a picture region by region."""

    display_name = "Conditioning (Set Area)"
    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning: Annotated[Any, Socket("CONDITIONING")],
        width: Annotated[int, _SIDE] = 64,
        height: Annotated[int, _SIDE] = 64,
        x: Annotated[int, _OFFSET] = 0,
        y: Annotated[int, _OFFSET] = 0,
        strength: Annotated[float, _STRENGTH] = 1.0,
    ):
        area = (height // 8, width // 8, y // 8, x // 8)
        return set_values(conditioning, {"area": area, "strength": float(strength), "set_area_to_bounds": False})


class ConditioningSetAreaPercentage(engine.Node):
    """Confines the conditioning to a rectangle given as fractions of the image (0..1), so it fits any size."""

    display_name = "Conditioning (Set Area with Percentage)"
    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning: Annotated[Any, Socket("CONDITIONING")],
        width: Annotated[float, _FRACTION] = 1.0,
        height: Annotated[float, _FRACTION] = 1.0,
        x: Annotated[float, _FRACTION] = 0,
        y: Annotated[float, _FRACTION] = 0,
        strength: Annotated[float, _STRENGTH] = 1.0,
    ):
        area = ("percentage", float(height), float(width), float(y), float(x))
        return set_values(conditioning, {"area": area, "strength": float(strength), "set_area_to_bounds": False})


class ConditioningSetAreaStrength(engine.Node):
    """Sets the conditioning's weight against the others it is combined with."""

    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning: Annotated[Any, Socket("CONDITIONING")],
        strength: Annotated[float, _STRENGTH] = 1.0,
    ):
        return set_values(conditioning, {"strength": float(strength)})


class ConditioningSetMask(engine.Node):
    """Confines the conditioning to a mask (scaled to the latent), weighted by the mask's values times
    strength. "mask bounds" also runs the model on the mask's bounding box only, which is faster for small
    masks and lets the prompt fill that box."""

    display_name = "Conditioning (Set Mask)"
    category = "conditioning"
    outputs = ("CONDITIONING",)

    def run(
        self,
        conditioning: Annotated[Any, Socket("CONDITIONING")],
        mask: Annotated[Any, Socket("MASK")],
        strength: Annotated[float, _STRENGTH] = 1.0,
        set_cond_area: Annotated[str, Combo(["default", "mask bounds"])] = "default",
    ):
        m = check_mask(mask).float()
        if m.shape[-1] == 0 or m.shape[-2] == 0:
            raise NodeError("the mask is empty (0 pixels)", input_name="mask")
        values = {"mask": m, "set_area_to_bounds": set_cond_area != "default", "mask_strength": float(strength)}
        return set_values(conditioning, values)


class InpaintModelConditioning(engine.Node):
    """Prepares inpainting: the image with the masked part greyed out, encoded, and the mask go into both
    conditionings (inpainting models with extra input channels read them); the latent of the whole image
    comes out with the mask as its noise mask, so only the masked part is repainted."""

    category = "conditioning/inpaint"
    outputs = {"positive": "CONDITIONING", "negative": "CONDITIONING", "latent": "LATENT"}

    def run(
        self,
        positive: Annotated[Any, Socket("CONDITIONING")],
        negative: Annotated[Any, Socket("CONDITIONING")],
        vae: Annotated[Any, Socket("VAE")],
        pixels: Annotated[Any, Socket("IMAGE")],
        mask: Annotated[Any, Socket("MASK")],
        noise_mask: Annotated[bool, Boolean()] = True,
    ):
        check_cond(positive, "positive")
        check_cond(negative, "negative")
        vae = check_vae(vae)
        pixels = check_image(pixels, "InpaintModelConditioning", "pixels")[..., :3].float()
        m = check_mask(mask).float()
        if m.shape[0] not in (1, pixels.shape[0]):
            raise NodeError(
                f"{m.shape[0]} masks for {pixels.shape[0]} images",
                input_name="mask",
                hint="use one mask, or one per image",
            )
        h, w = pixels.shape[1], pixels.shape[2]
        m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)
        f = vae.downscale
        ch, cw = h - h % f, w - w % f
        if ch == 0 or cw == 0:
            raise NodeError(f"the image is {w}x{h}, smaller than {f} pixels", input_name="pixels")
        oy, ox = (h % f) // 2, (w % f) // 2
        cropped = pixels[:, oy : oy + ch, ox : ox + cw].clone()
        m = m[:, :, oy : oy + ch, ox : ox + cw]
        keep = (1.0 - m.round())[:, 0, :, :, None]
        greyed = (cropped - 0.5) * keep + 0.5
        concat_latent = encode(vae, greyed)
        latent: dict[str, Any] = {"samples": encode(vae, pixels)}
        if noise_mask:
            latent["noise_mask"] = m
        extra = {"concat_latent_image": concat_latent, "concat_mask": m}
        return set_values(positive, extra, "positive"), set_values(negative, extra, "negative"), latent


NODES = [
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    InpaintModelConditioning,
]
