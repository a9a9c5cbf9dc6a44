"""``comfy.samplers``: the sampler and scheduler names (Kiln's lists, which are ComfyUI's)."""

from __future__ import annotations

from kiln.nodes.sd.samplers import SAMPLER_NAMES as _SAMPLERS, SCHEDULER_NAMES as _SCHEDULERS

from .._runtime import runtime_getattr

__getattr__ = runtime_getattr("comfy.samplers")

SAMPLER_NAMES = list(_SAMPLERS)
SCHEDULER_NAMES = list(_SCHEDULERS)
KSAMPLER_NAMES = [s for s in SAMPLER_NAMES if s not in ("ddim", "uni_pc", "uni_pc_bh2")]


class KSampler:
    """Only the name lists: packs read ``KSampler.SAMPLERS`` / ``KSampler.SCHEDULERS`` for their combos."""

    SAMPLERS = SAMPLER_NAMES
    SCHEDULERS = SCHEDULER_NAMES

    def __init__(self, *args: object, **kwargs: object):
        from .._runtime import NeedsComfyRuntime

        raise NeedsComfyRuntime("comfy.samplers.KSampler(...)")
