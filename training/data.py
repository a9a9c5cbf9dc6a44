"""Batches for each training stage, as pure functions of (seed, step), so a resumed run sees exactly the
batches an uninterrupted one would have seen, without saving any data-loader state."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kiln.training import scenes as sc

OUTLINE_FRACTION = 0.1  # the VAE also learns the LoRA's outline style, so the LoRA need not fix the decoder


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC RGB list -> float ``[B, 3, H, W]`` in -1..1."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list[np.ndarray]:
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(x)


def _vae_scenes(seed: int, step: int, batch: int, outline_fraction: float) -> list[tuple[sc.Scene, str]]:
    """The VAE batch for (seed, step): each scene with its style."""
    rng = np.random.default_rng([seed, step])
    idx = rng.integers(0, 2**40, size=batch)
    styles = rng.random(batch) < outline_fraction
    return [
        (sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, int(i))), "outline" if o else "filled")
        for i, o in zip(idx, styles)
    ]


def vae_batch(seed: int, step: int, batch: int, outline_fraction: float = OUTLINE_FRACTION) -> torch.Tensor:
    return to_tensor([sc.render(s, style) for s, style in _vae_scenes(seed, step, batch, outline_fraction)])


def vae_batch_and_footprints(
    seed: int, step: int, batch: int, outline_fraction: float = OUTLINE_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch, the same scenes drawn filled): what each object covers, outlines included."""
    pairs = _vae_scenes(seed, step, batch, outline_fraction)
    return to_tensor([sc.render(s, style) for s, style in pairs]), to_tensor([sc.render(s) for s, _ in pairs])


def pool_scenes(n: int) -> list[sc.Scene]:
    """The fixed pool of training scenes the UNet sees (their latents are cached once)."""
    return [sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, i)) for i in range(n)]


MULTI_OFFSET = 30_000_000  # the many-object pool's scenes: TRAIN_STREAM seeds from here (LoRA 10M, ControlNet 20M)


def multi_pool_scenes(n: int) -> list[sc.Scene]:
    """A second pool of fresh two- and three-object scenes (3 : 2), for the v4 fine-tune: the first pool holds
    only 4,000 two-object and 2,000 three-object scenes, which the v2 and v3 fine-tunes saw ~25 times each."""
    return [sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, MULTI_OFFSET + i), 2 if i % 5 < 3 else 3) for i in range(n)]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(n)


def pool_indices(seed: int, step: int, batch: int, n: int) -> np.ndarray:
    """Indices into the pool for ``step``: consecutive slices of per-epoch permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(seed, epoch, n)
        take = min(batch - len(out), n - offset)
        out.extend(order[offset : offset + take].tolist())
    return np.array(out)


def weighted_pool_indices(seed: int, step: int, batch: int, weights: np.ndarray) -> np.ndarray:
    """Indices into the pool for ``step``, drawn with replacement in proportion to ``weights`` (one per pool
    scene); a function of (seed, step) like :func:`pool_indices`."""
    rng = np.random.default_rng([seed, step, 21])
    return rng.choice(len(weights), size=batch, p=weights / weights.sum())


def latent_object_weight(
    scenes: list[sc.Scene], fg_weight: float, latent: int = 16, stray: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-latent-pixel loss weight ``[B, 1, latent, latent]``: ``fg_weight`` on every latent pixel an object
    touches and its neighbours (where a circle and a square differ: at 16x16 a small object spans three latent
    pixels), 1 elsewhere, scaled so each scene's weights average 1 (the loss keeps its size). ``stray`` (bool
    ``[B, 1, latent, latent]``) adds latent pixels where the model drew something the scene does not have, so
    that a stray object costs what a missing one does."""
    cell = sc.SIZE // latent
    masks = []
    for s in scenes:
        m = np.zeros((sc.SIZE, sc.SIZE), bool)
        for o in s.objects:
            m |= sc.object_mask(o)
        masks.append(m.reshape(latent, cell, latent, cell).any(axis=(1, 3)))
    m = torch.from_numpy(np.stack(masks)).float().unsqueeze(1)
    if stray is not None:
        m = torch.maximum(m, stray.float())
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    w = 1.0 + (fg_weight - 1.0) * m
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def mixed_captions(seed: int, step: int, scenes: list[sc.Scene]) -> list[str]:
    """The v2 fine-tune's captions for one batch: full or partial wordings (:func:`training.captions.
    partial_caption`), a function of (seed, step) like everything else here."""
    from kiln.training import captions

    rng = np.random.default_rng([seed, step, 16])
    return [captions.partial_caption(s, rng) for s in scenes]
