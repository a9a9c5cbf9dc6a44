"""``comfy.model_management``: device, dtype, memory and interruption helpers. Model loading itself is
ComfyUI's runtime (other names here are runtime placeholders)."""

from __future__ import annotations

import enum
import gc
import os
from typing import Any

import torch

from kiln.engine import Interrupted, check_interrupted as _check_interrupted, current as _current

from .._runtime import runtime_getattr

__getattr__ = runtime_getattr("comfy.model_management")

InterruptProcessingException = Interrupted  # what a cancelled Kiln run raises; packs catch it by this name
OOM_EXCEPTION = torch.cuda.OutOfMemoryError


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(enum.Enum):
    GPU = 0
    CPU = 1
    MPS = 2


def get_torch_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


cpu_state = CPUState.GPU if torch.cuda.is_available() else CPUState.CPU
vram_state = VRAMState.NORMAL_VRAM if torch.cuda.is_available() else VRAMState.DISABLED


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return get_torch_device()


def text_encoder_offload_device() -> torch.device:
    return torch.device("cpu")


def vae_device() -> torch.device:
    return get_torch_device()


def vae_offload_device() -> torch.device:
    return torch.device("cpu")


def should_use_fp16(
    device: Any = None, model_params: int = 0, prioritize_performance: bool = True, manual_cast: bool = False
) -> bool:
    dev = torch.device(device) if device is not None else get_torch_device()
    return dev.type == "cuda"


def should_use_bf16(
    device: Any = None, model_params: int = 0, prioritize_performance: bool = True, manual_cast: bool = False
) -> bool:
    dev = torch.device(device) if device is not None else get_torch_device()
    return dev.type == "cuda" and torch.cuda.is_bf16_supported()


def unet_dtype(
    device: Any = None, model_params: int = 0, supported_dtypes: Any = None, weight_dtype: Any = None
) -> torch.dtype:
    return torch.float16 if should_use_fp16(device) else torch.float32


def vae_dtype(device: Any = None, allowed_dtypes: Any = None) -> torch.dtype:
    return torch.float32


def text_encoder_dtype(device: Any = None) -> torch.dtype:
    return torch.float16 if should_use_fp16(device) else torch.float32


def get_autocast_device(dev: Any) -> str:
    return getattr(dev, "type", "cuda")


def is_device_mps(device: Any) -> bool:
    return getattr(device, "type", None) == "mps"


def is_device_cpu(device: Any) -> bool:
    return getattr(device, "type", None) == "cpu"


def cpu_mode() -> bool:
    return get_torch_device().type == "cpu"


def xformers_enabled() -> bool:
    return False


def pytorch_attention_enabled() -> bool:
    return True


def get_total_memory(dev: Any = None, torch_total_too: bool = False) -> int:
    dev = torch.device(dev) if dev is not None else get_torch_device()
    if dev.type == "cuda":
        total = torch.cuda.mem_get_info(dev)[1]
        return (total, total) if torch_total_too else total  # type: ignore[return-value]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return (total, total) if torch_total_too else total  # type: ignore[return-value]


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
    dev = torch.device(dev) if dev is not None else get_torch_device()
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            free = 0
    return (free, free) if torch_free_too else free


def soft_empty_cache(force: bool = False) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unload_all_models() -> None:
    """Kiln's model manager decides what stays loaded; this frees what Python and torch hold unused."""
    gc.collect()
    soft_empty_cache()


def cleanup_models(keep_clone_weights_loaded: bool = False) -> None:
    gc.collect()


def processing_interrupted() -> bool:
    ctx = _current()
    return bool(ctx is not None and ctx.run.cancel.is_set())


def throw_exception_if_processing_interrupted() -> None:
    _check_interrupted()


def interrupt_current_processing(value: bool = True) -> None:
    ctx = _current()
    if ctx is not None:
        ctx.run.cancel.set() if value else ctx.run.cancel.clear()
