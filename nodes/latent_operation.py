"""LATENT_OPERATION: reusable latent transforms, applied to a latent or, during sampling, to the guidance.

A LATENT_OPERATION value is a callable ``op(latent=tensor) -> tensor`` (ComfyUI's convention: keyword
``latent``, extra keywords ignored). Kiln's are frozen dataclasses, so equal settings give equal values and a
stable fingerprint (``__kiln_fingerprint__``) for the cache and for the MODEL they patch.

LatentApplyOperationCFG patches a MODEL (see ``nodes/sd/model_patch.py``): at every step the operation is
applied to the guidance direction ``cond - uncond`` (in the denoised parametrisation) before the CFG scale,
as ComfyUI's pre-CFG hook does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from kiln import engine
from kiln.engine import Float, Int, NodeError, Socket
from kiln.nodes.latent import check_latent
from kiln.nodes.sd.model_patch import CfgArgs, ModelPatch

OPERATION = Socket("LATENT_OPERATION")


def _fingerprint(op: Any) -> str:
    fp = getattr(op, "__kiln_fingerprint__", None)
    if fp is None:
        return f"{type(op).__module__}.{type(op).__qualname__}@{id(op)}"  # unknown callable: never shared
    b = fp()
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def _magnitude(latent: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-position length of the latent vector across channels, ``[B, 1, H, W]``."""
    return torch.linalg.vector_norm(latent, dim=1, keepdim=True) + eps


@dataclass(frozen=True)
class TonemapReinhard:
    """Compresses latent magnitudes with Reinhard's curve x / (1 + x), scaled so that magnitudes up to
    mean + 5 std (per latent) times `multiplier` stay nearly unchanged; directions are kept."""

    multiplier: float

    def __call__(self, latent: torch.Tensor, **_: Any) -> torch.Tensor:
        mag = _magnitude(latent, 1e-10)
        direction = latent / mag
        mean = mag.mean(dim=(1, 2, 3), keepdim=True)
        std = mag.std(dim=(1, 2, 3), keepdim=True)
        top = (std * 5 + mean) * self.multiplier
        scaled = mag / top
        return direction * (scaled / (scaled + 1.0)) * top

    def __kiln_fingerprint__(self) -> bytes:
        return f"TonemapReinhard({self.multiplier!r})".encode()


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised ``size x size`` Gaussian sampled on [-1, 1] in both directions."""
    r = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    g = torch.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    return g / g.sum()


@dataclass(frozen=True)
class Sharpen:
    """Unsharp-masks the direction of the latent vectors (their lengths are kept): the centre weight of a
    Gaussian of the given radius and sigma is raised so the kernel subtracts `alpha`-scaled blur."""

    radius: int
    sigma: float
    alpha: float

    def __call__(self, latent: torch.Tensor, **_: Any) -> torch.Tensor:
        mag = _magnitude(latent, 1e-6)
        direction = latent / mag
        c = latent.shape[1]
        k = self.radius * 2 + 1
        kernel = gaussian_kernel(k, self.sigma).to(latent.device, latent.dtype) * (self.alpha * -10)
        kernel[self.radius, self.radius] += 1.0 - kernel.sum()
        h, w = latent.shape[2:]
        # mirror the edges as ComfyUI does; a latent smaller than the radius cannot be mirrored that far
        mode = "reflect" if self.radius < min(h, w) else "replicate"
        padded = F.pad(direction, (self.radius,) * 4, mode=mode)
        sharp = F.conv2d(padded, kernel[None, None].repeat(c, 1, 1, 1), groups=c)
        return mag * sharp

    def __kiln_fingerprint__(self) -> bytes:
        return f"Sharpen({self.radius!r},{self.sigma!r},{self.alpha!r})".encode()


class LatentOperationCFG(ModelPatch):
    """Applies a LATENT_OPERATION to the guidance direction ``cond - uncond`` before CFG scales it."""

    def __init__(self, operation: Any):
        self.operation = operation

    def token(self) -> str:
        return f"LatentApplyOperationCFG:{_fingerprint(self.operation)}"

    def guided_cond(self, args: CfgArgs) -> torch.Tensor:
        """The positive prediction after the operation (what ComfyUI's pre-CFG hook hands on)."""
        if args.uncond_denoised is None:
            return self.operation(latent=args.cond_denoised)
        return self.operation(latent=args.cond_denoised - args.uncond_denoised) + args.uncond_denoised

    def cfg(self, args: CfgArgs) -> torch.Tensor | None:
        """The plain CFG combination, of the operated positive prediction."""
        cond, uncond = self.guided_cond(args), args.uncond_denoised
        if uncond is None:
            return cond if args.cfg == 1.0 else cond * args.cfg
        return uncond + (cond - uncond) * args.cfg


def _operation(op: Any) -> Any:
    if not callable(op):
        raise NodeError(
            "operation is not a LATENT_OPERATION",
            input_name="operation",
            hint="connect a Latent Operation node (e.g. LatentOperationSharpen)",
        )
    return op


class LatentApplyOperation(engine.Node):
    """Applies a latent operation to a latent."""

    category = "latent/advanced/operations"
    experimental = True
    outputs = ("LATENT",)

    def run(self, samples: Annotated[Any, Socket("LATENT")], operation: Annotated[Any, OPERATION]):
        s = check_latent(samples)
        return {**s, "samples": _operation(operation)(latent=s["samples"])}


class LatentApplyOperationCFG(engine.Node):
    """Patches a model so a latent operation is applied to the guidance (cond - uncond) at every step."""

    category = "latent/advanced/operations"
    experimental = True
    outputs = ("MODEL",)

    def run(self, model: Annotated[Any, Socket("MODEL")], operation: Annotated[Any, OPERATION]):
        if not hasattr(model, "with_model_patch"):
            raise NodeError(
                "model is not a diffusion MODEL", input_name="model", hint="connect the MODEL of a checkpoint loader"
            )
        return model.with_model_patch(LatentOperationCFG(_operation(operation)))


class LatentOperationTonemapReinhard(engine.Node):
    """A latent operation that tames overly large latent magnitudes (Reinhard tone mapping)."""

    category = "latent/advanced/operations"
    experimental = True
    outputs = ("LATENT_OPERATION",)

    def run(self, multiplier: Annotated[float, Float(min=0.0, max=100.0, step=0.01)] = 1.0):
        return TonemapReinhard(float(multiplier))


class LatentOperationSharpen(engine.Node):
    """A latent operation that sharpens the latent (unsharp mask on the direction of the latent vectors)."""

    category = "latent/advanced/operations"
    experimental = True
    outputs = ("LATENT_OPERATION",)

    def run(
        self,
        sharpen_radius: Annotated[int, Int(min=1, max=31, step=1)] = 9,
        sigma: Annotated[float, Float(min=0.1, max=10.0, step=0.1)] = 1.0,
        alpha: Annotated[float, Float(min=0.0, max=5.0, step=0.01)] = 0.1,
    ):
        return Sharpen(int(sharpen_radius), float(sigma), float(alpha))


NODES = [
    LatentApplyOperation,
    LatentApplyOperationCFG,
    LatentOperationTonemapReinhard,
    LatentOperationSharpen,
]
