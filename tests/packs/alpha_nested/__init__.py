import comfy.model_management
import comfy.utils
import folder_paths
import node_helpers
import torch
from comfy.comfy_types import IO, ComfyNodeABC
from comfy_execution.graph import ExecutionBlocker
from custom_nodes.alpha_nested.lib.helpers import double as double_abs  # absolute through custom_nodes

import nodes
from server import PromptServer

from .lib import helpers  # from .pkg import sub
from .lib.deep.maths import quadruple  # nested relative


class AnyType(str):
    """The "any type" trick popular packs use."""

    def __ne__(self, other):
        return False


any_type = AnyType("*")


@PromptServer.instance.routes.get("/alpha/hello")
async def hello(request):
    from aiohttp import web

    return web.json_response({"hello": "alpha"})


class AlphaMaths(ComfyNodeABC):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"value": (IO.INT, {"default": 1, "min": 0, "max": 1000})},
            "hidden": {
                "unique_id": "UNIQUE_ID",
                "prompt_id": "PROMPT_ID",
                "count": "INT",
                "label": ("STRING", {}),
                "anything": any_type,
                "spec": {"kind": "odd"},
            },
        }

    RETURN_TYPES = ("INT", "INT", "STRING")
    RETURN_NAMES = ("doubled",)  # shorter than RETURN_TYPES: ComfyUI accepts it
    FUNCTION = "go"
    CATEGORY = "alpha"

    def go(self, value, unique_id=None, prompt_id=None, count=None, label=None, anything=None, spec=None):
        pbar = comfy.utils.ProgressBar(2, node_id=unique_id)
        pbar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(2)
        PromptServer.instance.send_sync("alpha.done", {"node": unique_id, "value": value})
        return (helpers.double(value), quadruple(value), f"{double_abs(value)}|{unique_id}|{count}")


class AlphaLoopEnd:
    """A loop-style node: a hidden input of kind "*" that the graph links to."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"flow": ("INT",)}, "hidden": {"initial_value0": "*"}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "end"
    CATEGORY = "alpha"

    def end(self, flow, initial_value0=None):
        return (flow + (initial_value0 or 0),)


class AlphaSave(nodes.SaveImage):
    def __init__(self):
        super().__init__()
        self.prefix_append = "_alpha"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT"}}

    FUNCTION = "save"

    def save(self, images, prompt=None):
        return self.save_images(images, "alpha/pic", prompt)


class AlphaImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "size": ("INT", {"default": 8, "max": nodes.MAX_RESOLUTION}),
                "ckpt": (folder_paths.get_filename_list("checkpoints") or ["none"],),
            }
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    FUNCTION = "make"
    CATEGORY = "alpha"

    def make(self, size, ckpt):
        img = torch.linspace(0, 1, size * size * 3).reshape(1, size, size, 3)
        big = comfy.utils.common_upscale(img.movedim(-1, 1), size * 2, size, "bilinear", "disabled").movedim(1, -1)
        return (big, folder_paths.get_full_path("checkpoints", ckpt) or "")


class AlphaCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"strength": ("FLOAT", {"default": 0.5})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "alpha"

    def make(self, strength):
        a = [[torch.zeros(1, 2, 4), {"pooled_output": None}]]
        b = [[torch.ones(1, 2, 4), {}]]
        both = nodes.ConditioningCombine().combine(a, b)[0]
        return (node_helpers.conditioning_set_values(both, {"strength": strength}),)


class AlphaGate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",), "open": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "gate"
    CATEGORY = "alpha"

    def gate(self, value, open):
        return (value if open else ExecutionBlocker(None),)


class SharedName:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "who"
    CATEGORY = "alpha"

    def who(self):
        return ("alpha",)


NODE_CLASS_MAPPINGS = {
    "AlphaMaths": AlphaMaths,
    "AlphaLoopEnd": AlphaLoopEnd,
    "AlphaSave": AlphaSave,
    "AlphaImage": AlphaImage,
    "AlphaCond": AlphaCond,
    "AlphaGate": AlphaGate,
    "SharedName": SharedName,
}
NODE_DISPLAY_NAME_MAPPINGS = {"AlphaMaths": "Alpha Maths"}
WEB_DIRECTORY = "./web"
