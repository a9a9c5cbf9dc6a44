"""MODEL, CLIP, VAE and CONTROL_NET values: shared, never-mutated modules plus what was applied to them.

A handle holds a module loaded by the model manager and an immutable tuple of weight patches (LoRA).
Applying a LoRA returns a *new* handle; the base module is only ever changed for the duration of a
``with handle.patched()`` block, by swapping in patched tensors and putting the original tensor objects
back afterwards, so a graph without the LoRA sees bit-identical weights.

Each handle fingerprints as (file identity, dtype, device, patches), which keeps nodes downstream of a
loader cacheable.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .model_patch import ModelPatch
from .samplers import ModelSampling

# One lock per shared module, so two handles never swap tensors in the same module at once. Keyed weakly by
# the module itself: an entry goes when its module is freed (the model manager evicts models), and a new
# module can never inherit a dead one's lock, as it could through a reused id().
_PATCH_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_PATCH_LOCKS_GUARD = threading.Lock()


def _lock_for(module: torch.nn.Module) -> threading.RLock:
    with _PATCH_LOCKS_GUARD:
        lock = _PATCH_LOCKS.get(module)
        if lock is None:
            lock = _PATCH_LOCKS[module] = threading.RLock()
        return lock


@dataclass(frozen=True)
class WeightPatch:
    """Low-rank weight deltas from one LoRA file at one strength: ``W += strength * scale * up @ down``."""

    source: str  # identity of the LoRA file
    strength: float
    deltas: dict = field(hash=False, compare=False)  # param name -> (up, down, scale)

    def token(self) -> str:
        return f"{self.source}@{self.strength!r}"


def apply_patches(module: torch.nn.Module, patches: tuple[WeightPatch, ...]):
    """Context manager: ``module`` with ``patches`` applied; the original tensors are restored on exit."""
    return _patched(module, patches)


@contextlib.contextmanager
def _patched(module: torch.nn.Module, patches: tuple[WeightPatch, ...]) -> Iterator[torch.nn.Module]:
    if not patches:
        yield module
        return
    lock = _lock_for(module)
    with lock:
        params = dict(module.named_parameters())
        originals: dict[str, torch.Tensor] = {}
        try:
            for name in sorted({n for p in patches for n in p.deltas}):
                param = params[name]
                w = param.data
                acc = w.float().clone()
                for p in patches:
                    if name in p.deltas:
                        up, down, scale = p.deltas[name]
                        up, down = up.to(acc.device, torch.float32), down.to(acc.device, torch.float32)
                        delta = up.flatten(1) @ down.flatten(1)
                        acc += (p.strength * scale) * delta.reshape(w.shape)
                originals[name] = w
                param.data = acc.to(w.dtype)
            yield module
        finally:
            for name, w in originals.items():
                params[name].data = w


def _digest(*parts: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.digest()


class ModelHandle:
    """MODEL: a diffusion UNet, its noise schedule, and patches."""

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler_config: dict,
        family: str,
        source: str,
        patches: tuple[WeightPatch, ...] = (),
        preview_vae: Any = None,
        name: str = "",
        model_patches: tuple[ModelPatch, ...] = (),
    ):
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.sampling = ModelSampling(scheduler_config)
        self.family = family
        self.source = source
        self.patches = patches
        self.preview_vae = preview_vae  # a VaeHandle from the same checkpoint, for latent previews
        self.name = name
        self.model_patches = model_patches  # run-time patches (FreeU, RescaleCFG, ...): model_patch.py

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def with_patch(self, patch: WeightPatch) -> ModelHandle:
        return ModelHandle(
            self.unet,
            self.scheduler_config,
            self.family,
            self.source,
            self.patches + (patch,),
            self.preview_vae,
            self.name,
            self.model_patches,
        )

    def with_model_patch(self, patch: ModelPatch) -> ModelHandle:
        return ModelHandle(
            self.unet,
            self.scheduler_config,
            self.family,
            self.source,
            self.patches,
            self.preview_vae,
            self.name,
            self.model_patches + (patch,),
        )

    def patched(self):
        return apply_patches(self.unet, self.patches)

    def __kiln_fingerprint__(self) -> bytes:
        return _digest(
            "MODEL", self.source, *[p.token() for p in self.patches], "|", *[p.token() for p in self.model_patches]
        )

    def __kiln_sizeof__(self) -> int:
        return 1024  # the module is owned by the model manager, not by the output cache

    def __repr__(self) -> str:
        return f"<MODEL {self.name or self.family} patches={len(self.patches)}>"


class ClipHandle:
    """CLIP: text encoder(s) and tokenizer(s), the layer to read (CLIPSetLastLayer), and patches."""

    def __init__(
        self,
        text_encoders: list,
        tokenizers: list,
        family: str,
        source: str,
        patches: tuple[WeightPatch, ...] = (),
        layer: int = -1,
        name: str = "",
    ):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.family = family
        self.source = source
        self.patches = patches
        self.layer = layer
        self.name = name

    def _copy(self, **kw: Any) -> ClipHandle:
        args = dict(
            text_encoders=self.text_encoders,
            tokenizers=self.tokenizers,
            family=self.family,
            source=self.source,
            patches=self.patches,
            layer=self.layer,
            name=self.name,
        )
        args.update(kw)
        return ClipHandle(**args)

    def with_patch(self, patch: WeightPatch) -> ClipHandle:
        return self._copy(patches=self.patches + (patch,))

    def with_layer(self, layer: int) -> ClipHandle:
        return self._copy(layer=layer)

    @contextlib.contextmanager
    def patched(self) -> Iterator[list]:
        with contextlib.ExitStack() as stack:
            for i, te in enumerate(self.text_encoders):
                mine = tuple(
                    WeightPatch(
                        p.source,
                        p.strength,
                        {k[len(f"{i}.") :]: v for k, v in p.deltas.items() if k.startswith(f"{i}.")},
                    )
                    for p in self.patches
                )
                stack.enter_context(apply_patches(te, tuple(p for p in mine if p.deltas)))
            yield self.text_encoders

    def __kiln_fingerprint__(self) -> bytes:
        return _digest("CLIP", self.source, self.layer, *[p.token() for p in self.patches])

    def __kiln_sizeof__(self) -> int:
        return 1024

    def __repr__(self) -> str:
        return f"<CLIP {self.name or self.family} layer={self.layer} patches={len(self.patches)}>"


class VaeHandle:
    """VAE: an AutoencoderKL and its latent scaling."""

    def __init__(self, vae: torch.nn.Module, source: str, name: str = ""):
        self.vae = vae
        self.source = source
        self.name = name
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self._rgb: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def __kiln_fingerprint__(self) -> bytes:
        return _digest("VAE", self.source)

    def __kiln_sizeof__(self) -> int:
        return 1024

    def __repr__(self) -> str:
        return f"<VAE {self.name}>"


class ControlNetHandle:
    """CONTROL_NET: a diffusers ControlNetModel."""

    def __init__(self, model: torch.nn.Module, source: str, name: str = ""):
        self.model = model
        self.source = source
        self.name = name

    def __kiln_fingerprint__(self) -> bytes:
        return _digest("CONTROL_NET", self.source)

    def __kiln_sizeof__(self) -> int:
        return 1024

    def __repr__(self) -> str:
        return f"<CONTROL_NET {self.name}>"
