"""``latent_preview``: preview hooks for samplers. Kiln renders its own previews; these keep packs that
drive a sampler callback working (progress only)."""

from __future__ import annotations

from typing import Any

from ._runtime import runtime_getattr
from .comfy.utils import ProgressBar

__getattr__ = runtime_getattr("latent_preview")

MAX_PREVIEW_RESOLUTION = 512


def get_previewer(device: Any = None, latent_format: Any = None) -> None:
    return None


def prepare_callback(model: Any, steps: int, x0_output_dict: dict | None = None) -> Any:
    pbar = ProgressBar(steps)

    def callback(step: int, x0: Any, x: Any, total_steps: int) -> None:
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        pbar.update_absolute(step + 1, total_steps)

    return callback


def set_preview_method(override: Any) -> None:
    return None
