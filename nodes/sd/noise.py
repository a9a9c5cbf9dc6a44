"""Every random number of a sampling run, drawn the way ComfyUI draws it, so a seed reproduces its picture.

Three sources:

- **Initial noise** (:func:`make_noise`): a CPU ``torch.Generator`` seeded with the seed, ``randn`` of the
  latent's shape. With a ``batch_index`` (a latent split from a batch), one ``[1, C, H, W]`` draw is made
  for every index from 0 to the largest, and item ``k`` takes the draw of ``batch_index[k]``; so the
  second image of a batch of four gets the same noise alone as inside the batch.
- **Step noise** (:class:`StepNoise`, kind ``"default"``): the fresh noise of ancestral and other
  stochastic samplers. A generator on the latent's device, seeded with the seed itself, ``randn`` of the
  latent's shape on every call; the sigmas a sampler passes are ignored.
- **Brownian-tree noise** (:class:`BrownianNoise`, kinds ``"brownian"`` and ``"brownian_gpu"``): the SDE
  samplers' noise, a ``torchsde.BrownianTree`` over the schedule's sigma range (the smallest positive sigma
  to the largest) with the seed as its entropy, built on the CPU (``"brownian"``) or on the latent's
  device (``"brownian_gpu"``, ComfyUI's ``*_gpu`` samplers). A call for ``(sigma, sigma_next)`` returns
  the tree's increment over that interval divided by the square root of its length: unit-variance noise
  that is consistent between nearby queries, so the image varies smoothly with the step count.

Initial noise is drawn on the CPU, so it is the same on every device. Step noise and the ``_gpu`` trees
follow ComfyUI and are drawn on the sampling device: a seed gives ComfyUI's picture on the same kind of
device (CPU or CUDA), and the same picture on every run there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

# noise(sigma, sigma_next) -> a tensor of the latent's shape, dtype and device (ComfyUI's noise_sampler)
NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NOISE_KINDS = ("default", "brownian", "brownian_gpu")


def make_noise(
    seed: int,
    shape: tuple[int, ...],
    batch_index: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The initial noise of a run, on the CPU (see the module docstring for ``batch_index``)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(tuple(shape), generator=g, dtype=dtype)
    wanted = sorted({int(i) for i in batch_index})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"batch_index must hold non-negative integers, got {list(batch_index)}")
    one = (1, *tuple(shape)[1:])
    draws: dict[int, torch.Tensor] = {}
    for i in range(wanted[-1] + 1):  # one draw per index, in order, as a batch would have drawn them
        n = torch.randn(one, generator=g, dtype=dtype)
        if i in wanted:
            draws[i] = n
    return torch.cat([draws[int(i)] for i in batch_index])


class StepNoise:
    """Fresh Gaussian noise for each stochastic step, from a generator on the latent's device."""

    def __init__(self, like: torch.Tensor, seed: int):
        self.shape, self.dtype, self.device = tuple(like.shape), like.dtype, like.device
        self.generator = torch.Generator(device=like.device)
        self.generator.manual_seed(int(seed))

    def __call__(self, sigma: torch.Tensor | float | None = None, sigma_next: torch.Tensor | float | None = None):
        return self.fresh(self.shape)

    def fresh(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise of another shape from the same stream (samplers that resize the latent)."""
        return torch.randn(tuple(shape), generator=self.generator, dtype=self.dtype, device=self.device)


class BrownianNoise:
    """Increments of a seeded Brownian motion in sigma, normalised to unit variance."""

    def __init__(self, like: torch.Tensor, sigma_min, sigma_max, seed: int, cpu: bool = True):
        import torchsde

        lo, hi = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        if hi < lo:
            lo, hi = hi, lo
        self.cpu = cpu
        self.dtype, self.device = like.dtype, like.device
        w0 = torch.zeros_like(like)
        if cpu:
            lo, hi, w0 = lo.cpu(), hi.cpu(), w0.cpu()
        self.tree = torchsde.BrownianTree(lo, w0, hi, entropy=int(seed))

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():
            # the tree keeps its ends as Python floats; a float32 query at an end can sit a rounding error
            # outside, which torchsde reports and then clamps
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            if self.cpu:
                w = self.tree(lo.cpu().float(), hi.cpu().float()).to(lo.dtype).to(lo.device)
            else:
                w = self.tree(lo, hi)
        # the tree was built with its ends in increasing order; a query from sigma down to sigma_next
        # is the same increment with the sign flipped
        return (w * sign) / (b - a).abs().sqrt()


def step_noise(kind: str, like: torch.Tensor, sigmas: torch.Tensor, seed: int) -> NoiseFn:
    """The step-noise source a sampler of this kind gets (see the module docstring)."""
    if kind == "default":
        return StepNoise(like, seed)
    if kind in ("brownian", "brownian_gpu"):
        positive = sigmas[sigmas > 0]
        if len(sigmas) < 2 or len(positive) == 0:
            return StepNoise(like, seed)  # nothing to integrate: never called
        return BrownianNoise(like, positive.min(), sigmas.max(), seed, cpu=kind == "brownian")
    raise ValueError(f"unknown noise kind {kind!r}; use one of {', '.join(NOISE_KINDS)}")
