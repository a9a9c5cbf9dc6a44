# imports ComfyUI's model runtime at the top: loads what it can, reported as needing the runtime
import comfy.ldm.modules.attention  # noqa: F401
from comfy.model_patcher import ModelPatcher

from .node import EpsilonPatch


class Patcher(ModelPatcher):  # subclassing a runtime class works; instantiating it does not
    pass


NODE_CLASS_MAPPINGS = {"EpsilonPatch": EpsilonPatch}
