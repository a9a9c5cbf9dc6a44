"""``node_helpers``: conditioning and image helpers packs call."""

from __future__ import annotations

from typing import Any

from ._runtime import runtime_getattr

__getattr__ = runtime_getattr("node_helpers")


def conditioning_set_values(conditioning: list, values: dict | None = None, append: bool = False) -> list:
    """A copy of ``conditioning`` whose entries carry ``values`` among their options (``append``: list
    values are added to the existing list of the same key instead of replacing it)."""
    values = values or {}
    out = []
    for emb, opts in conditioning:
        new = dict(opts)
        for k, v in values.items():
            if append and isinstance(new.get(k), list):
                new[k] = new[k] + list(v)
            else:
                new[k] = v
        out.append([emb, new])
    return out


def pillow(fn: Any, arg: Any) -> Any:
    """Call a PIL function, retrying with truncated images allowed (as ComfyUI does for odd files)."""
    from PIL import ImageFile

    try:
        return fn(arg)
    except (OSError, SyntaxError):
        prev = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = prev


def string_to_torch_dtype(s: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(s)
