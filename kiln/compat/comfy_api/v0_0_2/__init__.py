"""``comfy_api.v0_0_2``: the pinned V3 API version; the same classes as ``comfy_api.latest`` (one
implementation), plus the ``ComfyAPI``/``ComfyAPISync`` progress API."""

from ..._runtime import runtime_getattr
from .._api import ComfyAPI, ComfyAPISync
from ..latest import ComfyExtension, io, ui

__getattr__ = runtime_getattr("comfy_api.v0_0_2")
__all__ = ["ComfyAPI", "ComfyAPISync", "ComfyExtension", "io", "ui"]
