"""``comfy.comfy_types``: the typing helpers packs annotate their classes with."""

from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar


class IO(str):
    """Socket type names as constants (``IO.IMAGE == "IMAGE"``); ``IO.ANY`` ("*") matches any type."""

    STRING = "STRING"
    IMAGE = "IMAGE"
    MASK = "MASK"
    LATENT = "LATENT"
    BOOLEAN = "BOOLEAN"
    INT = "INT"
    FLOAT = "FLOAT"
    COMBO = "COMBO"
    CONDITIONING = "CONDITIONING"
    SAMPLER = "SAMPLER"
    SIGMAS = "SIGMAS"
    GUIDER = "GUIDER"
    NOISE = "NOISE"
    CLIP = "CLIP"
    CONTROL_NET = "CONTROL_NET"
    VAE = "VAE"
    MODEL = "MODEL"
    CLIP_VISION = "CLIP_VISION"
    CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
    STYLE_MODEL = "STYLE_MODEL"
    GLIGEN = "GLIGEN"
    UPSCALE_MODEL = "UPSCALE_MODEL"
    AUDIO = "AUDIO"
    VIDEO = "VIDEO"
    ANY = "*"
    NUMBER = "FLOAT,INT"
    PRIMITIVE = "STRING,FLOAT,INT,BOOLEAN"


InputTypeDict = dict
InputTypeOptions = dict


class ComfyNodeABC(ABC):  # noqa: B024 - a marker base, as in ComfyUI: packs subclass it and set the attributes
    """Base class packs may derive classic nodes from; it declares the contract, Kiln reads the attributes."""

    DESCRIPTION: ClassVar[str]
    CATEGORY: ClassVar[str]
    EXPERIMENTAL: ClassVar[bool] = False
    DEPRECATED: ClassVar[bool] = False

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        return {"required": {}}


class CheckLazyMixin:
    def check_lazy_status(self, **kwargs: Any) -> list[str]:
        return [k for k, v in kwargs.items() if v is None]


class FileLocator(dict):
    pass


__all__ = ["IO", "InputTypeDict", "InputTypeOptions", "ComfyNodeABC", "CheckLazyMixin", "FileLocator"]
