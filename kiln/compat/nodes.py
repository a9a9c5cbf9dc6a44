"""``nodes``: the names packs take from ComfyUI's ``nodes`` module.

``MAX_RESOLUTION``, ``NODE_CLASS_MAPPINGS`` (a live view of Kiln's registry) and the classic core classes
packs subclass or call directly, as thin adapters over Kiln's native nodes with ComfyUI's method names
(``SaveImage.save_images``, ``CLIPTextEncode.encode``, ``LoraLoader.load_lora``, ...) and ``common_ksampler``.
"""

from __future__ import annotations

import os
import random
import string
from collections.abc import Iterator, MutableMapping
from typing import Any

from kiln.engine import MAX_RESOLUTION, NodeResult

from . import folder_paths
from ._runtime import runtime_getattr

_runtime_getattr = runtime_getattr("nodes")

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
EXTENSION_WEB_DIRS: dict[str, str] = {}
LOADED_MODULE_DIRS: dict[str, str] = {}


def _registry() -> Any:
    from . import current_registry

    reg = current_registry()
    if reg is None:
        from kiln import nodes as kiln_nodes
        from kiln.engine import Registry

        from . import install

        reg = Registry()  # Kiln's built-in nodes, for a pack imported outside default_registry()
        kiln_nodes.register_builtin(reg)
        install(reg)
    return reg


# -- classic adapters of Kiln's native core nodes ----------------------------------------------------------
# ComfyUI's method name and parameter order (packs call these positionally) for each core class
_CORE: dict[str, tuple[str, tuple[str, ...]]] = {
    "CLIPTextEncode": ("encode", ("clip", "text")),
    "VAEEncode": ("encode", ("vae", "pixels")),
    "VAEDecode": ("decode", ("vae", "samples")),
    "ConditioningCombine": ("combine", ("conditioning_1", "conditioning_2")),
    "LoraLoader": ("load_lora", ("model", "clip", "lora_name", "strength_model", "strength_clip")),
    "LoraLoaderModelOnly": ("load_lora_model_only", ("model", "lora_name", "strength_model")),
    "CheckpointLoaderSimple": ("load_checkpoint", ("ckpt_name",)),
    "EmptyLatentImage": ("generate", ("width", "height", "batch_size")),
    "LoadImage": ("load_image", ("image",)),
    "ImageScale": ("upscale", ("image", "upscale_method", "width", "height", "crop")),
    "ImageScaleBy": ("upscale", ("image", "upscale_method", "scale_by")),
    "LatentUpscale": ("upscale", ("samples", "upscale_method", "width", "height", "crop")),
    "LatentUpscaleBy": ("upscale", ("samples", "upscale_method", "scale_by")),
    "KSampler": (
        "sample",
        (
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        ),
    ),
    "KSamplerAdvanced": (
        "sample",
        (
            "model",
            "add_noise",
            "noise_seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        ),
    ),
}
_adapters: dict[str, type] = {}


def _as_classic_result(spec: Any, r: Any) -> Any:
    if isinstance(r, NodeResult):
        return {"ui": r.ui, "result": r.values} if r.ui else r.values
    if len(spec.outputs) == 1:
        return (r,)
    return tuple(r) if isinstance(r, (tuple, list)) else r


def _adapter(name: str) -> type:
    if name in _adapters:
        return _adapters[name]
    function, order = _CORE[name]
    spec = _registry()[name]
    native = spec.cls

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(order):
            raise TypeError(f"{name}.{function}() takes {len(order)} positional arguments")
        kwargs.update(zip(order, args))
        return _as_classic_result(spec, native().run(**kwargs))

    def input_types(cls: type) -> dict:
        return spec.object_info()["input"]

    # the choice lists ComfyUI exposes as class attributes (packs read ImageScale.upscale_methods)
    lists = {}
    for input_name, attr in (("upscale_method", "upscale_methods"), ("crop", "crop_methods")):
        ispec = spec.inputs.get(input_name)
        choices = ispec.resolve_choices() if ispec is not None else None
        if choices is not None:
            lists[attr] = list(choices)
    cls = type(
        name,
        (),
        {
            **lists,
            "__doc__": f"ComfyUI's classic {name}, running Kiln's native node.",
            "__module__": __name__,
            "INPUT_TYPES": classmethod(input_types),
            "RETURN_TYPES": tuple(spec.output_types),
            "RETURN_NAMES": tuple(spec.output_names),
            "OUTPUT_IS_LIST": tuple(o.is_list for o in spec.outputs),
            "FUNCTION": function,
            "CATEGORY": spec.category,
            "OUTPUT_NODE": spec.output_node,
            "DESCRIPTION": spec.description,
            function: call,
        },
    )
    _adapters[name] = cls
    return cls


class SaveImage:
    """ComfyUI's SaveImage: packs subclass it and call ``self.save_images(...)``, setting ``output_dir``,
    ``type``, ``prefix_append`` and ``compress_level`` in ``__init__``."""

    def __init__(self) -> None:
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "Prefix of the file names."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES: tuple = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your output directory."

    def save_images(
        self, images: Any, filename_prefix: str = "ComfyUI", prompt: Any = None, extra_pnginfo: Any = None
    ) -> dict:
        from kiln.nodes.common import comfy_png_metadata, encode_png, tensor_to_pil

        filename_prefix += self.prefix_append
        folder, base, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir, int(images.shape[2]), int(images.shape[1])
        )
        os.makedirs(folder, exist_ok=True)
        texts = comfy_png_metadata(prompt, extra_pnginfo)
        results = []
        for i, img in enumerate(tensor_to_pil(images)):
            data = encode_png(img, texts, self.compress_level)
            name = base.replace("%batch_num%", str(i))
            while True:  # never over an existing file
                file = f"{name}_{counter:05}_.png"
                counter += 1
                try:
                    with open(os.path.join(folder, file), "xb") as fh:
                        fh.write(data)
                    break
                except FileExistsError:
                    continue
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """ComfyUI's PreviewImage: SaveImage into the temp folder under a random prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.output_dir = folder_paths.get_temp_directory()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        self.compress_level = 1

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        return {
            "required": {"images": ("IMAGE",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }


def common_ksampler(
    model: Any,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Any,
    negative: Any,
    latent: dict,
    denoise: float = 1.0,
    disable_noise: bool = False,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
) -> tuple[dict]:
    """ComfyUI's shared sampling helper, on Kiln's KSampler / KSamplerAdvanced."""
    reg = _registry()
    common = dict(
        model=model,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        latent_image=latent,
    )
    if not disable_noise and start_step is None and last_step is None:
        out = reg["KSampler"].cls().run(seed=seed, denoise=denoise, **common)
    else:
        out = (
            reg["KSamplerAdvanced"]
            .cls()
            .run(
                add_noise="disable" if disable_noise else "enable",
                noise_seed=seed,
                start_at_step=start_step or 0,
                end_at_step=10000 if last_step is None else last_step,
                return_with_leftover_noise="disable" if force_full_denoise else "enable",
                **common,
            )
        )
    return (out,)


class _LiveMappings(MutableMapping):
    """``NODE_CLASS_MAPPINGS``: every class in Kiln's registry (the core classes above as their classic
    adapters). Writes by a pack are kept here only: packs register nodes by exporting their mappings."""

    def __init__(self) -> None:
        self._local: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        if name in self._local:
            return self._local[name]
        if name in _CORE and name in _registry():
            return _adapter(name)
        if name in ("SaveImage", "PreviewImage"):
            return globals()[name]
        spec = _registry().get(name)
        if spec is None:
            raise KeyError(name)
        return spec.cls

    def __setitem__(self, name: str, cls: type) -> None:
        self._local[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._local[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*_registry().names(), *self._local]))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, name: object) -> bool:
        return name in self._local or name in _registry()


NODE_CLASS_MAPPINGS = _LiveMappings()


def __getattr__(name: str) -> Any:
    if name in _CORE:
        return _adapter(name)
    return _runtime_getattr(name)


__all__ = ["MAX_RESOLUTION", "NODE_CLASS_MAPPINGS", "SaveImage", "PreviewImage", "common_ksampler"]
