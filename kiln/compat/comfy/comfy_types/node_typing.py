"""``comfy.comfy_types.node_typing``: the same names as :mod:`kiln.compat.comfy.comfy_types`."""

from . import IO, CheckLazyMixin, ComfyNodeABC, FileLocator, InputTypeDict, InputTypeOptions

__all__ = ["IO", "InputTypeDict", "InputTypeOptions", "ComfyNodeABC", "CheckLazyMixin", "FileLocator"]
