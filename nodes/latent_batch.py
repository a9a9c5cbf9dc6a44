"""Latent batches with ComfyUI's names, inputs and behaviour: join, pick, repeat, rebatch, seed behaviour.

``batch_index`` (a list of ints, one per latent) tells the sampler which noise each latent gets: latent i of a
batch normally gets the i-th noise of the seed, so picking latent 3 out of a batch and sampling it alone
reproduces the same image. These nodes keep it, and the ``noise_mask``, in step with the samples.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from kiln import engine
from kiln.engine import Combo, Int, NodeError, Output, Socket, TensorEstimate
from kiln.nodes.latent import check_latent
from kiln.nodes.latent_ops import match_to, repeat_to_batch

LATENT = Socket("LATENT")


def _masks(s: dict) -> torch.Tensor | None:
    nm = s.get("noise_mask")
    if not isinstance(nm, torch.Tensor) or nm.ndim < 2:
        return None
    return nm.reshape(-1, 1, nm.shape[-2], nm.shape[-1])


def _indices(s: dict, n: int, start: int = 0) -> list[int]:
    bi = s.get("batch_index")
    if bi is None:
        return list(range(start, start + n))
    bi = list(bi)
    if len(bi) != n:
        raise NodeError(
            f"the latent's batch_index lists {len(bi)} entries for {n} latents",
            input_name="samples",
            hint="the latent was edited inconsistently upstream; rebuild it with Latent From Batch",
        )
    return bi


def _fit_mask(m: torch.Tensor | None, size: tuple[int, int], n: int) -> torch.Tensor:
    """A noise mask ``[n, 1, *size]``: all ones when there is none."""
    if m is None:
        return torch.ones((n, 1, *size))
    if tuple(m.shape[2:]) != size:
        m = F.interpolate(m.float(), size=size, mode="bilinear")
    return repeat_to_batch(m, n)


class LatentBatch(engine.Node):
    """Joins two latent batches into one (samples2 is resized to samples1's size when they differ)."""

    category = "latent/batch"
    outputs = ("LATENT",)

    def run(self, samples1: Annotated[Any, LATENT], samples2: Annotated[Any, LATENT]):
        a = check_latent(samples1, "samples1")
        b = check_latent(samples2, "samples2")
        s1 = a["samples"]
        s2 = match_to(s1, b["samples"], "samples2", batch=False)
        out = {**a, "samples": torch.cat((s1, s2), dim=0)}
        out["batch_index"] = _indices(a, s1.shape[0]) + _indices(b, s2.shape[0])
        m1, m2 = _masks(a), _masks(b)
        if m1 is not None or m2 is not None:
            size = tuple((m1 if m1 is not None else m2).shape[2:])  # type: ignore[union-attr]
            out["noise_mask"] = torch.cat((_fit_mask(m1, size, s1.shape[0]), _fit_mask(m2, size, s2.shape[0])))
        return out


class LatentFromBatch(engine.Node):
    """Picks `length` latents starting at `batch_index` (both cut to the batch), keeping their noise."""

    display_name = "Latent From Batch"
    category = "latent/batch"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        batch_index: Annotated[int, Int(min=0, max=63)] = 0,
        length: Annotated[int, Int(min=1, max=64)] = 1,
    ):
        s = check_latent(samples)
        x = s["samples"]
        n = x.shape[0]
        if n == 0:
            raise NodeError("the latent batch is empty", input_name="samples", hint="connect a latent with content")
        start = min(n - 1, max(0, batch_index))
        count = min(n - start, length)
        out = {**s, "samples": x[start : start + count].clone()}
        m = _masks(s)
        if m is not None:
            out["noise_mask"] = m.clone() if m.shape[0] == 1 else repeat_to_batch(m, n)[start : start + count].clone()
        out["batch_index"] = _indices(s, n)[start : start + count]
        return out


class RepeatLatentBatch(engine.Node):
    """Repeats the whole batch `amount` times; repeated latents get new noise (their batch_index continues
    after the batch's)."""

    display_name = "Repeat Latent Batch"
    category = "latent/batch"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        amount: Annotated[int, Int(min=1, max=64)] = 1,
    ):
        s = check_latent(samples)
        x = s["samples"]
        out = {**s, "samples": x.repeat((amount, 1, 1, 1))}
        m = _masks(s)
        if m is not None and m.shape[0] > 1:
            out["noise_mask"] = repeat_to_batch(m, x.shape[0]).repeat((amount, 1, 1, 1))
        if "batch_index" in s:
            bi = _indices(s, x.shape[0])
            span = max(bi) - min(bi) + 1
            out["batch_index"] = bi + [v + i * span for i in range(1, amount) for v in bi]
        return out

    @classmethod
    def estimate_outputs(cls, samples: TensorEstimate | None = None, amount: int = 1, **_: Any) -> tuple | None:
        if samples is None or len(samples.shape) != 4:
            return None
        return (samples.with_shape(samples.shape[0] * amount, *samples.shape[1:]),)


def _split(s: dict, offset: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    x = s["samples"]
    size = (x.shape[2] * 8, x.shape[3] * 8)
    return x, _fit_mask(_masks(s), size, x.shape[0]), _indices(s, x.shape[0], offset)


class RebatchLatents(engine.Node):
    """Regroups a list of latent batches into batches of `batch_size` (latents of another size start a new
    batch). batch_index and noise_mask travel with their latents; a mask of all ones is dropped."""

    display_name = "Rebatch Latents"
    category = "latent/batch"
    outputs = [Output("LATENT", is_list=True)]
    input_is_list = True

    def run(
        self,
        latents: Annotated[Any, Socket("LATENT")],
        batch_size: Annotated[Any, Int(min=1, max=4096)] = 1,
    ):
        size = batch_size[0] if isinstance(batch_size, list) else batch_size
        items = latents if isinstance(latents, list) else [latents]
        groups: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
        offset = 0
        for item in items:
            x, m, bi = _split(check_latent(item, "latents"), offset)
            offset += len(bi)
            if groups and groups[-1][0].shape[1:] == x.shape[1:]:
                px, pm, pbi = groups[-1]
                groups[-1] = (torch.cat((px, x)), torch.cat((pm, m)), pbi + bi)
            else:
                groups.append((x, m, bi))
        out = []
        for x, m, bi in groups:
            for k in range(math.ceil(x.shape[0] / size)):
                sl = slice(k * size, (k + 1) * size)
                entry: dict[str, Any] = {"samples": x[sl], "batch_index": bi[sl]}
                if not bool(m[sl].eq(1.0).all()):
                    entry["noise_mask"] = m[sl]
                out.append(entry)
        return out


class LatentBatchSeedBehavior(engine.Node):
    """ "fixed": every latent of the batch gets the same noise (that of the first); "random": each gets its own."""

    category = "latent/advanced"
    outputs = ("LATENT",)

    def run(
        self,
        samples: Annotated[Any, LATENT],
        seed_behavior: Annotated[str, Combo(["random", "fixed"], v3=True)] = "fixed",
    ):
        s = check_latent(samples)
        out = dict(s)
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:
            first = list(s.get("batch_index") or [0])[0]
            out["batch_index"] = [first] * s["samples"].shape[0]
        return out


NODES = [LatentBatch, LatentFromBatch, RepeatLatentBatch, RebatchLatents, LatentBatchSeedBehavior]
