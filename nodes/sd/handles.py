"""MODEL, CLIP, VAE and CONTROL_NET values: shared, never-mutated modules plus what was applied to them.

A handle holds modules loaded by the model manager and an immutable tuple of weight patches. Applying a
LoRA, a merge or a multiplier returns a *new* handle; the shared modules are only ever changed for the
duration of a ``with handle.patched()`` block, by swapping in patched tensors and putting the original
tensor objects back afterwards, so a graph without the patch sees bit-identical weights.

Weight patches name parameters in the handle's *namespace*: the UNet's own parameter names for a MODEL,
``"<encoder index>.<parameter name>"`` for a CLIP. Three kinds, applied in order, each a function of the
weight so far (float32):

- :class:`WeightPatch`: a LoRA, ``W + strength * scale * up @ down``;
- :class:`MergePatch`: ``a * W + b * W_other``, where ``W_other`` is the same parameter of *another handle*
  with that handle's own patches applied (ModelMergeSimple/Add/Subtract/Blocks, CLIPMerge*);
- :class:`ScalePatch`: ``factor * W`` for parameters matching name suffixes (attention multipliers).

A patch that would leave a weight as it is (a ratio of 1, a factor of 1) does not touch it, and a merge
that takes the other weight whole hands over that tensor as it is, so merges at 0 and 1 are bit-exact.

Each handle fingerprints as (file identity, dtype, device, patches), which keeps nodes downstream of a
loader cacheable; a merge's fingerprint includes the other handle's.

One file past the usual size: the patch kinds, the code that applies them and the handles that carry them
are one mechanism and are read together.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
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

# While a module is patched, the original tensors of the parameters swapped out, by local name. A merge
# reads another module's weights through this, so it sees the loaded weights even while another run (in this
# thread or another) has that module patched, and needs no lock on it.
_ORIGINALS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
_ORIGINALS_GUARD = threading.Lock()


def _lock_for(module: torch.nn.Module) -> threading.RLock:
    with _PATCH_LOCKS_GUARD:
        lock = _PATCH_LOCKS.get(module)
        if lock is None:
            lock = _PATCH_LOCKS[module] = threading.RLock()
        return lock


Space = Mapping[str, torch.nn.Module]  # name prefix -> module ("" for a single module)


def _locate(space: Space, name: str) -> tuple[torch.nn.Module, str]:
    for prefix, module in space.items():
        if prefix and name.startswith(prefix):
            return module, name[len(prefix) :]
    if "" in space:
        return space[""], name
    raise KeyError(f"no module holds parameter {name!r}")


class ParamIndex:
    """Parameters of the modules one patch application reads, looked up once per module."""

    def __init__(self) -> None:
        self._params: dict[int, dict[str, torch.nn.Parameter]] = {}

    def params(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        got = self._params.get(id(module))
        if got is None:
            got = self._params[id(module)] = dict(module.named_parameters())
        return got

    def original(self, space: Space, name: str) -> torch.Tensor:
        """The loaded tensor of ``name``, even while the module is patched."""
        module, local = _locate(space, name)
        with _ORIGINALS_GUARD:
            saved = _ORIGINALS.get(module)
            t = saved.get(local) if saved is not None else None
        return t if t is not None else self.params(module)[local].data


def param_shapes(space: Space) -> dict[str, tuple[int, ...]]:
    """``{namespaced parameter name: shape}`` of a handle's modules."""
    out = {}
    for prefix, module in space.items():
        for local, p in module.named_parameters():
            out[prefix + local] = tuple(p.shape)
    return out


class ParamPatch:
    """A weight patch: which parameters it changes and how. Subclasses are immutable."""

    def token(self) -> str:
        raise NotImplementedError

    def touches(self, name: str) -> bool:
        raise NotImplementedError

    def targets(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.touches(n)]

    def apply(self, name: str, acc: torch.Tensor, index: ParamIndex) -> torch.Tensor:
        """The new value of ``name`` (float32) from its value so far; never changes ``acc`` in place."""
        raise NotImplementedError


@dataclass(frozen=True)
class WeightPatch(ParamPatch):
    """Low-rank weight deltas from one LoRA file at one strength: ``W += strength * scale * up @ down``."""

    source: str  # identity of the LoRA file
    strength: float
    deltas: dict = field(hash=False, compare=False)  # param name -> (up, down, scale)

    def token(self) -> str:
        return f"{self.source}@{self.strength!r}"

    def touches(self, name: str) -> bool:
        return name in self.deltas

    def targets(self, names: Iterable[str]) -> list[str]:
        return list(self.deltas)

    def apply(self, name: str, acc: torch.Tensor, index: ParamIndex) -> torch.Tensor:
        up, down, scale = self.deltas[name]
        up, down = up.to(acc.device, torch.float32), down.to(acc.device, torch.float32)
        delta = up.flatten(1) @ down.flatten(1)
        return acc + (self.strength * scale) * delta.reshape(acc.shape)


Coefficients = Callable[[str], tuple[float, float]]


class MergePatch(ParamPatch):
    """``W' = a * W + b * W_other`` for every parameter, ``(a, b)`` per parameter name.

    ``other`` is a handle (MODEL or CLIP) whose weights, with its own patches, are read at apply time.
    ``label`` names the coefficients for the fingerprint (every setting that changes ``coefficients`` must be
    in it).
    """

    def __init__(self, other: Any, coefficients: Coefficients, label: str):
        self.other = other
        self.coefficients = coefficients
        self.label = label
        self._other_names = frozenset(param_shapes(other.param_space()))

    def token(self) -> str:
        return f"merge[{self.label}]<{self.other.__kiln_fingerprint__().hex()}>"

    def touches(self, name: str) -> bool:
        return name in self._other_names and self.coefficients(name) != (1.0, 0.0)

    def apply(self, name: str, acc: torch.Tensor, index: ParamIndex) -> torch.Tensor:
        a, b = self.coefficients(name)
        theirs = effective_weight(self.other.param_space(), self.other.patches, name, index).to(acc.device)
        if a == 0.0 and b == 1.0:
            return theirs
        return acc * a + theirs * b


class ScalePatch(ParamPatch):
    """``W' = factor * W`` for parameters whose names end with one of the given suffixes."""

    def __init__(self, factors: Mapping[str, float], label: str):
        self.factors = {s: float(f) for s, f in factors.items() if float(f) != 1.0}
        self.label = label

    def token(self) -> str:
        return f"scale[{self.label}]" + ",".join(f"{s}={f!r}" for s, f in sorted(self.factors.items()))

    def _factor(self, name: str) -> float | None:
        for suffix, f in self.factors.items():
            if name.endswith(suffix):
                return f
        return None

    def touches(self, name: str) -> bool:
        return self._factor(name) is not None

    def apply(self, name: str, acc: torch.Tensor, index: ParamIndex) -> torch.Tensor:
        factor = self._factor(name)
        return acc if factor is None else acc * factor


def effective_weight(
    space: Space, patches: tuple[ParamPatch, ...], name: str, index: ParamIndex | None = None
) -> torch.Tensor:
    """``name`` with ``patches`` applied, computed from the loaded weights (nothing is swapped in).

    Returns the loaded tensor itself when no patch touches the parameter.
    """
    index = index or ParamIndex()
    acc = index.original(space, name)
    dtype = acc.dtype
    for p in patches:
        if p.touches(name):
            acc = p.apply(name, acc.float(), index)
    return acc if acc.dtype == dtype else acc.to(dtype)


def apply_patches(target: torch.nn.Module | Space, patches: tuple[ParamPatch, ...]):
    """Context manager: the module (or ``{prefix: module}`` space) with ``patches`` applied; the original
    tensors are restored on exit, also when the block raises."""
    space = {"": target} if isinstance(target, torch.nn.Module) else dict(target)
    return _patched(space, patches, target)


@contextlib.contextmanager
def _patched(space: Space, patches: tuple[ParamPatch, ...], target: Any) -> Iterator[Any]:
    if not patches:
        yield target
        return
    modules = {id(m): m for m in space.values()}
    with contextlib.ExitStack() as locks:
        for key in sorted(modules):
            locks.enter_context(_lock_for(modules[key]))
        index = ParamIndex()
        all_names = list(param_shapes(space))
        names: dict[str, None] = {}
        for p in patches:
            for n in p.targets(all_names):
                names[n] = None
        new: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        for name in names:
            module, local = _locate(space, name)
            value = effective_weight(space, patches, name, index)
            if value is not index.original(space, name):
                new.append((module, local, value))
        swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        registered: list[tuple[torch.nn.Module, str]] = []
        try:
            for module, local, value in new:
                param = index.params(module)[local]
                with _ORIGINALS_GUARD:
                    kept = _ORIGINALS.get(module)
                    if kept is None:
                        kept = _ORIGINALS[module] = {}
                    if local not in kept:
                        kept[local] = param.data
                        registered.append((module, local))
                swapped.append((param, param.data))
                param.data = value
            yield target
        finally:
            for param, old in reversed(swapped):
                param.data = old
            with _ORIGINALS_GUARD:
                for module, local in registered:
                    saved = _ORIGINALS.get(module)
                    if saved is not None:
                        saved.pop(local, None)
                        if not saved:
                            del _ORIGINALS[module]


def _digest(*parts: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.digest()


class ModelHandle:
    """MODEL: a diffusion UNet, its noise schedule, weight patches and run-time patches."""

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler_config: dict,
        family: str,
        source: str,
        patches: tuple[ParamPatch, ...] = (),
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

    def _copy(self, **kw: Any) -> ModelHandle:
        args: dict[str, Any] = dict(
            unet=self.unet,
            scheduler_config=self.scheduler_config,
            family=self.family,
            source=self.source,
            patches=self.patches,
            preview_vae=self.preview_vae,
            name=self.name,
            model_patches=self.model_patches,
        )
        args.update(kw)
        return ModelHandle(**args)

    def with_patch(self, patch: ParamPatch) -> ModelHandle:
        return self._copy(patches=self.patches + (patch,))

    def with_model_patch(self, patch: ModelPatch) -> ModelHandle:
        return self._copy(model_patches=self.model_patches + (patch,))

    def param_space(self) -> dict[str, torch.nn.Module]:
        return {"": self.unet}

    @contextlib.contextmanager
    def patched(self) -> Iterator[torch.nn.Module]:
        """The UNet with this handle's weight patches, held under its lock for the block: run-time patches
        install hooks on the shared module inside it, so two runs on one module never overlap."""
        with _lock_for(self.unet), apply_patches(self.unet, self.patches) as unet:
            yield unet

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
        patches: tuple[ParamPatch, ...] = (),
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
        args: dict[str, Any] = dict(
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

    def with_patch(self, patch: ParamPatch) -> ClipHandle:
        return self._copy(patches=self.patches + (patch,))

    def with_layer(self, layer: int) -> ClipHandle:
        return self._copy(layer=layer)

    def param_space(self) -> dict[str, torch.nn.Module]:
        """Parameters are named ``"<encoder index>.<name>"``, as LoRA deltas for the CLIP are."""
        return {f"{i}.": te for i, te in enumerate(self.text_encoders)}

    @contextlib.contextmanager
    def patched(self) -> Iterator[list]:
        with apply_patches(self.param_space(), self.patches):
            yield self.text_encoders

    def __kiln_fingerprint__(self) -> bytes:
        return _digest("CLIP", self.source, self.layer, *[p.token() for p in self.patches])

    def __kiln_sizeof__(self) -> int:
        return 1024

    def __repr__(self) -> str:
        return f"<CLIP {self.name or self.family} layer={self.layer} patches={len(self.patches)}>"


class VaeHandle:
    """VAE: an AutoencoderKL and its latent scaling."""

    def __init__(self, vae: Any, source: str, name: str = ""):
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
