"""``comfy.utils``: resizing, progress bars and checkpoint reading on Kiln's own helpers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine import Preview, ProgressBar as _KilnProgressBar

from .._runtime import runtime_getattr

PROGRESS_BAR_ENABLED = True
__getattr__ = runtime_getattr("comfy.utils")


def set_progress_bar_enabled(enabled: bool) -> None:
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def _centre_crop(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    oh, ow = x.shape[-2:]
    src, dst = ow / oh, width / height
    if src > dst:
        cw = round(oh * dst)
        return x[..., (ow - cw) // 2 : (ow - cw) // 2 + cw]
    if src < dst:
        ch = round(ow / dst)
        return x[..., (oh - ch) // 2 : (oh - ch) // 2 + ch, :]
    return x


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str, crop: str) -> torch.Tensor:
    """Resize a ``[B, C, H, W]`` tensor (images moved to channels-first, or latents) to ``width x height``;
    ``crop="center"`` first cuts it to the new aspect ratio."""
    from kiln.nodes.image_transform import resize
    from kiln.nodes.latent import resize_latent

    width, height = max(1, int(width)), max(1, int(height))
    if crop == "center":
        samples = _centre_crop(samples, width, height)
    if upscale_method == "lanczos":
        return resize(samples.movedim(1, -1), width, height, "lanczos").movedim(-1, 1)
    return resize_latent(samples, height, width, upscale_method)


def load_torch_file(ckpt: str, safe_load: bool = False, device: Any = None, return_metadata: bool = False) -> Any:
    """A state dict from a ``.safetensors`` file or a torch pickle (loaded with ``weights_only``)."""
    device = device or torch.device("cpu")
    metadata = None
    if str(ckpt).lower().endswith((".safetensors", ".sft")):
        from safetensors import safe_open

        sd = {}
        with safe_open(str(ckpt), framework="pt", device=str(device)) as f:
            metadata = f.metadata()
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    else:
        data = torch.load(str(ckpt), map_location=device, weights_only=True)
        sd = data.get("state_dict", data) if isinstance(data, dict) else data
    return (sd, metadata) if return_metadata else sd


class ProgressBar:
    """ComfyUI's progress bar (``ProgressBar(total, node_id=None)``), reporting through Kiln's progress
    events of the running node (so to every client watching, and as a cancellation point)."""

    def __init__(self, total: int, node_id: Any = None):
        self.total = max(1, int(total))
        self.current = 0
        self.node_id = node_id
        self._bar = _KilnProgressBar(self.total)

    def update_absolute(self, value: float, total: float | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = max(1, int(total))
        self.current = min(int(value), self.total)
        if PROGRESS_BAR_ENABLED:
            self._bar.update_absolute(self.current, self.total, preview if isinstance(preview, Preview) else None)

    def update(self, value: float = 1) -> None:
        self.update_absolute(self.current + value, self.total)


def _upscale_shape(samples: torch.Tensor, scale: float) -> tuple[int, int]:
    return round(samples.shape[-1] * scale), round(samples.shape[-2] * scale)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    return common_upscale(samples, width, height, "lanczos", "disabled")


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    return common_upscale(samples, width, height, "bislerp", "disabled")


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    n = tensor.shape[dim]
    if n > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if n < batch_size:
        reps = [1] * tensor.ndim
        reps[dim] = -(-batch_size // n)
        return tensor.repeat(*reps).narrow(dim, 0, batch_size)
    return tensor


def interpolate(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    return F.interpolate(x, size=size, mode=mode)
