"""Image nodes with ComfyUI's names, inputs and behaviour: load, save, preview, invert, scale, crop, blur,
blend, pad for outpainting, composite."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import string
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence

from kiln.engine import (
    MAX_RESOLUTION,
    Boolean,
    Combo,
    Float,
    Hidden,
    Int,
    Node,
    NodeError,
    NodeResult,
    Socket,
    String,
    TensorEstimate,
    get_folders,
)
from kiln.engine.context import current
from kiln.engine.folders import UnsafePath

from .common import (
    check_image,
    check_mask,
    comfy_png_metadata,
    encode_png,
    mask_from_alpha,
    pil_to_tensor,
    preview_from_image,
    tensor_to_pil,
)
from .outputs import write_output

IMAGE = Socket("IMAGE")
MASK_IN = Socket("MASK")
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class EmptyImage(Node):
    """A batch of images filled with one colour (0xRRGGBB)."""

    display_name = "EmptyImage"
    category = "image"
    outputs = ("IMAGE",)

    def run(
        self,
        width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        batch_size: Annotated[int, Int(min=1, max=4096)] = 1,
        color: Annotated[int, Int(min=0, max=0xFFFFFF, step=1, display="color")] = 0,
    ) -> torch.Tensor:
        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255.0
        return rgb.expand(batch_size, height, width, 3).contiguous()

    @classmethod
    def estimate_outputs(cls, width: int = 512, height: int = 512, batch_size: int = 1, **_: Any) -> tuple:
        return (TensorEstimate((batch_size, height, width, 3)),)  # the batch itself is all it allocates


def annotated_path(name: str) -> Path:
    """ComfyUI's file annotations: ``name.png [output]`` reads from output/, ``[temp]`` from temp/."""
    folders = get_folders()
    m = re.match(r"^(.*) \[(input|output|temp)\]$", name)
    type_, fname = (m.group(2), m.group(1)) if m else ("input", name)
    return folders.safe_path(type_, fname)


def input_choices() -> list[str]:
    return get_folders().list_inputs(IMAGE_EXTENSIONS)


class LoadImage(Node):
    """Load an image from the input folder. The mask is 1 - alpha (64x64 zeros without alpha)."""

    display_name = "Load Image"
    category = "image"
    outputs = ("IMAGE", "MASK")

    def run(self, image: Annotated[str, Combo(input_choices, image_upload=True)]):
        path = annotated_path(image)
        try:
            img = open_capped(path, image)
        except NodeError:
            raise
        except FileNotFoundError:
            raise NodeError(
                f"image file {image!r} not found in the input folder",
                input_name="image",
                hint="upload it or copy it into input/",
            ) from None
        except Exception as exc:
            raise NodeError(f"cannot decode {image!r} as an image: {exc}", input_name="image") from None
        images, masks = [], []
        size = None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda i: i * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            elif rgb.size != size:
                continue  # ComfyUI skips frames of another size
            images.append(pil_to_tensor(rgb))
            mask = mask_from_alpha(
                frame
                if "A" in frame.getbands()
                else frame.convert("RGBA")
                if frame.mode == "P" and "transparency" in frame.info
                else frame
            )
            masks.append(mask)
        return torch.cat(images, 0), torch.cat(masks, 0) if masks[0].shape[1:] == masks[-1].shape[1:] else masks[0]

    @classmethod
    def fingerprint(cls, image: str) -> str:
        try:
            return hashlib.sha256(annotated_path(image).read_bytes()).hexdigest()
        except Exception:
            return float("nan")  # type: ignore[return-value]

    @classmethod
    def estimate_outputs(cls, image: str = "", **_: Any) -> tuple | None:
        """The first frame's size from the file's header (no pixels decoded): what downstream nodes get."""
        size = header_size(annotated_path(image))
        if size is None:
            return None
        w, h = size
        return TensorEstimate((1, h, w, 3)), TensorEstimate((1, h, w))

    @classmethod
    def estimate_memory(cls, image: str = "", **_: Any) -> int | None:
        """Decoded bytes (up to 4 a pixel), the float array, its scaled copy and the tensor, and the mask."""
        outs = cls.estimate_outputs(image=image)
        return None if outs is None else 3 * outs[0].nbytes + outs[1].nbytes + outs[1].nbytes

    @classmethod
    def validate(cls, image: str) -> bool | str:
        try:
            p = annotated_path(image)
        except UnsafePath as exc:
            return f"Invalid image file: {image} ({exc})"
        if not p.is_file():
            return f"Invalid image file: {image}"
        return True


# The largest image, in pixels, that LoadImage and LoadImageMask decode (the server's uploads use the same cap,
# ServerConfig.max_image_pixels). 8192x8192 (64 megapixels): every camera and 8K frame fits; its IMAGE tensor
# is 768 MiB and loading peaks near 3 GiB (decoded bytes, two float copies on the way to the tensor, the mask).
# A 12000x12000 PNG of a few KB, which would peak near 6 GiB, does not. A run reads the cap from the executor's
# services (MAX_IMAGE_PIXELS_SERVICE, set by ``kiln serve``/``kiln run --max-image-pixels``; 0 = no cap of
# Kiln's own); without it, this default applies. PIL's own guard (DecompressionBombError, past twice
# PIL.Image.MAX_IMAGE_PIXELS) is reported the same way and is never switched off here.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_PIXELS_SERVICE = "max_image_pixels"


def max_image_pixels() -> int:
    """The pixel cap of the run in progress (its executor's service), else the default; 0 means none."""
    ctx = current()
    services = ctx.run.services if ctx is not None else None
    cap = services.get(MAX_IMAGE_PIXELS_SERVICE) if isinstance(services, dict) else None
    return DEFAULT_MAX_IMAGE_PIXELS if cap is None else int(cap)


def open_capped(path: Path, name: str, input_name: str = "image") -> Image.Image:
    """``Image.open`` (which reads the header only) that refuses an image over the pixel cap before any
    pixel is decoded: a tiny file can hold a huge, blank image (a decompression bomb)."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise NodeError(
            f"image {name!r} is too large to load: {exc}",
            input_name=input_name,
            hint="shrink the image before loading it",
        ) from None
    cap = max_image_pixels()
    w, h = img.size
    if cap and w * h > cap:
        img.close()
        raise NodeError(
            f"image {name!r} is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the limit of "
            f"{cap / 1e6:.1f} megapixels for a loaded image",
            input_name=input_name,
            hint="shrink the image before loading it, or raise --max-image-pixels",
        )
    return img


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from an image file's header, or None when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # missing, not an image, over PIL's own bomb limit: the run says which
        return None


_ANNOTATION = re.compile(r" \[(input|output|temp)\]$")


def as_output_name(name: str) -> str:
    """A plain name read by LoadImageOutput means a file in output/; explicit annotations are kept."""
    return name if _ANNOTATION.search(name) else f"{name} [output]"


def _output_choices() -> list[str]:
    """Images in the output folder, newest first, annotated ``[output]`` as ComfyUI's editor sends them."""
    root = get_folders().output_dir
    if not root.is_dir():
        return []
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                p = Path(dirpath) / f
                try:
                    found.append((p.stat().st_mtime, p.relative_to(root).as_posix()))
                except OSError:
                    continue
    return [f"{name} [output]" for _, name in sorted(found, key=lambda t: (-t[0], t[1]))]


class LoadImageOutput(LoadImage):
    """Load an image from the output folder (a plain name means output/; ``[input]``/``[temp]`` still work),
    e.g. to feed a saved result back into a graph."""

    display_name = "Load Image (from Outputs)"
    category = "image"
    experimental = True
    outputs = ("IMAGE", "MASK")

    def run(  # type: ignore[override]
        self,
        image: Annotated[
            str,
            Combo(
                _output_choices,
                v3=True,
                image_upload=True,
                extra={
                    "image_folder": "output",
                    "remote": {
                        "route": "/internal/files/output",
                        "refresh_button": True,
                        "control_after_refresh": "first",
                    },
                },
            ),
        ],
    ):
        try:
            return super().run(as_output_name(image))
        except NodeError as exc:
            if "not found" in str(exc):
                raise NodeError(
                    f"image file {image!r} not found in the output folder",
                    input_name="image",
                    hint="pick a file listed under output/ (e.g. one a SaveImage node wrote)",
                ) from None
            raise

    @classmethod
    def fingerprint(cls, image: str) -> str:
        return LoadImage.fingerprint(as_output_name(image))

    @classmethod
    def estimate_outputs(cls, image: str = "", **_: Any) -> tuple | None:
        return LoadImage.estimate_outputs(as_output_name(image))

    @classmethod
    def validate(cls, image: str) -> bool | str:
        return LoadImage.validate(as_output_name(image))


def expand_prefix(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    tokens = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02d}",
        "%day%": f"{now.tm_mday:02d}",
        "%hour%": f"{now.tm_hour:02d}",
        "%minute%": f"{now.tm_min:02d}",
        "%second%": f"{now.tm_sec:02d}",
    }
    for k, v in tokens.items():
        prefix = prefix.replace(k, v)
    return prefix


_next_counter: dict[tuple[str, str], int] = {}


def save_images(
    images: torch.Tensor,
    prefix: str,
    type_: str,
    prompt: dict | None,
    extra_pnginfo: dict | None,
    compress_level: int = 4,
    metadata: bool = True,
    extra_texts: Any = None,
    sign: Any = None,
) -> list[dict]:
    """Write an IMAGE batch as ``<prefix>_<NNNNN>_.png`` (ComfyUI naming) without overwriting anything."""
    check_image(images, "SaveImage", "images")
    folders = get_folders()
    root = folders.dir_for(type_)
    prefix = expand_prefix(prefix, images.shape[2], images.shape[1])
    sub, _, base = prefix.replace("\\", "/").rpartition("/")
    if not base:
        raise NodeError("filename_prefix must end with a file name", input_name="filename_prefix")
    try:
        folder = folders.safe_path(type_, sub) if sub else root
    except UnsafePath as exc:
        raise NodeError(
            f"filename_prefix {prefix!r} would save outside the {type_} folder ({exc})",
            input_name="filename_prefix",
            hint="use a relative prefix such as 'renders/cat'",
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    texts = comfy_png_metadata(prompt, extra_pnginfo) if metadata else None
    counter_key = (str(folder), base)
    counter = _next_counter.get(counter_key)
    if counter is None and type_ == "temp":  # previews: a random prefix, numbered from 1 (taken names skipped)
        counter = 1
    if counter is None:  # first save with this prefix here: one scan, then counted in memory
        pattern = re.compile(re.escape(base.replace("%batch_num%", "")) + r"_(\d+)_")
        counter = 1 + max(
            (int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f.replace("%batch_num%", "")))),
            default=0,
        )
    results = []
    for i, img in enumerate(tensor_to_pil(images)):
        name_base = base.replace("%batch_num%", str(i))
        chunks = {**(texts or {}), **extra_texts(np.asarray(img))} if extra_texts else texts  # e.g. provenance
        data = encode_png(img, chunks, compress_level)
        if sign is not None:  # a signed C2PA manifest (nodes/providers/c2pa_sign.py)
            data = sign(data, "PNG", np.asarray(img))
        tried: list[int] = []

        def candidates(start: int = counter, name_base: str = name_base, tried: list[int] = tried):
            for n in itertools.count(start):
                tried.append(n)
                yield f"{name_base}_{n:05d}_.png"

        # atomic (temporary name, then moved into place), never over an existing output, and journaled
        # so a re-run after a crash rewrites this same file
        fname = write_output(folder, data, candidates(), journaled=type_ != "temp")
        results.append({"filename": fname, "subfolder": sub, "type": type_})
        if tried:
            counter = tried[-1] + 1
    if len(_next_counter) > 4096:  # PreviewImage's random prefixes would otherwise accumulate
        _next_counter.clear()
    _next_counter[counter_key] = counter  # a stale value is harmless: write_output skips taken names
    return results


def save_memory(images: TensorEstimate | None) -> int | None:
    """What ``save_images`` allocates for a batch: the 8-bit conversion of the whole batch makes a scaled
    float copy, a clipped float copy and the uint8 array (2.25 times the batch); PNG encoding is per image."""
    return None if images is None else images.nbytes * 9 // 4


class SaveImage(Node):
    """Save images to the output folder as PNG with the graph in the metadata."""

    display_name = "Save Image"
    category = "image"
    output_node = True

    def run(
        self,
        images: Annotated[torch.Tensor, IMAGE],
        filename_prefix: Annotated[
            str,
            String(
                tooltip="Prefix of the file names; may contain a subfolder and %width%, %height%, %date% style tokens"
            ),
        ] = "ComfyUI",
        validate: Annotated[
            bool, Boolean(optional=True, tooltip="refuse blank, single-colour or corrupt images")
        ] = False,
        embed_provenance: Annotated[
            bool,
            Boolean(
                optional=True,
                tooltip="add a kiln_provenance chunk: graph, provider, model, revised prompt, time, content hash",
            ),
        ] = False,
        generation_info: Annotated[str, String(force_input=True, tooltip="a provider node's usage output")] = None,
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ):
        from kiln.nodes.providers import c2pa_sign, checks, provenance  # shared helpers, loaded when asked for

        if validate:
            checks.check_images(images, "SaveImage", "images")
        extra = (lambda px: provenance.png_chunks_for(px, prompt, generation_info)) if embed_provenance else None
        sign = c2pa_sign.signer_for(prompt, generation_info) if embed_provenance else None  # None: no key set
        saved = save_images(images, filename_prefix, "output", prompt, extra_pnginfo, extra_texts=extra, sign=sign)
        return NodeResult(ui={"images": saved})

    @classmethod
    def estimate_memory(cls, images: TensorEstimate | None = None, **_: Any) -> int | None:
        return save_memory(images)


class PreviewImage(Node):
    """Save images to the temp folder for viewing."""

    display_name = "Preview Image"
    category = "image"
    output_node = True

    def run(
        self,
        images: Annotated[torch.Tensor, IMAGE],
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ):
        prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        return NodeResult(ui={"images": save_images(images, prefix, "temp", prompt, extra_pnginfo, compress_level=1)})

    @classmethod
    def estimate_memory(cls, images: TensorEstimate | None = None, **_: Any) -> int | None:
        return save_memory(images)


class SaveImageWebsocket(Node):
    """Send each image to the client as a PNG binary websocket frame instead of writing a file."""

    display_name = "SaveImageWebsocket"
    category = "api node/image"
    output_node = True
    cacheable = False  # always sends

    def run(self, images: Annotated[torch.Tensor, IMAGE]):
        check_image(images, "SaveImageWebsocket", "images")
        ctx = current()
        n = images.shape[0]
        for i in range(n):
            prev = preview_from_image(images[i : i + 1], max_size=1 << 30, fmt="PNG", kind="output")
            if ctx is not None:
                ctx.progress(i + 1, n, prev)
        return NodeResult(ui={})


class ImageInvert(Node):
    display_name = "Invert Image"
    category = "image"
    outputs = ("IMAGE",)

    def run(self, image: Annotated[torch.Tensor, IMAGE]) -> torch.Tensor:
        return 1.0 - image


def _resize(image: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    if method == "lanczos":
        return torch.cat([pil_to_tensor(p.resize((width, height), Image.LANCZOS)) for p in tensor_to_pil(image)])
    x = image.movedim(-1, 1)
    kw = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    if method == "bicubic":
        kw["antialias"] = True
    out = F.interpolate(x, size=(height, width), mode=method, **kw)
    return out.movedim(1, -1).clamp(0, 1) if method == "bicubic" else out.movedim(1, -1)


def scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    if crop == "center":
        h, w = image.shape[1], image.shape[2]
        src_ar, dst_ar = w / h, width / height
        if src_ar > dst_ar:
            nw = max(1, round(h * dst_ar))
            x0 = (w - nw) // 2
            image = image[:, :, x0 : x0 + nw]
        elif src_ar < dst_ar:
            nh = max(1, round(w / dst_ar))
            y0 = (h - nh) // 2
            image = image[:, y0 : y0 + nh]
    return _resize(image, width, height, method)


def scale_memory(image: TensorEstimate | None, outputs: tuple | None, method: str) -> int | None:
    """What ``scale_image`` allocates: the resized batch and one more copy of it (channel moves, clamping);
    lanczos also converts the whole input to 8 bits through PIL first (2.25 times the input)."""
    if image is None or not outputs or outputs[0] is None:
        return None
    if outputs[0] is image:
        return 0  # 0x0: the image passes through
    return 2 * outputs[0].nbytes + (image.nbytes * 9 // 4 if method == "lanczos" else 0)


class ImageScale(Node):
    """Resize to width x height; 0 in one dimension keeps the aspect ratio, 0 in both keeps the image."""

    display_name = "Upscale Image"
    category = "image/upscaling"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        upscale_method: Annotated[str, Combo(UPSCALE_METHODS)] = "nearest-exact",
        width: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 512,
        height: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 512,
        crop: Annotated[str, Combo(["disabled", "center"])] = "disabled",
    ) -> torch.Tensor:
        check_image(image, "ImageScale")
        if width == 0 and height == 0:
            return image
        h, w = image.shape[1], image.shape[2]
        if width == 0:
            width = max(1, round(w * height / h))
        elif height == 0:
            height = max(1, round(h * width / w))
        return scale_image(image, width, height, upscale_method, crop)

    @classmethod
    def estimate_outputs(
        cls, image: TensorEstimate | None = None, width: int = 512, height: int = 512, **_: Any
    ) -> tuple | None:
        if image is None or len(image.shape) != 4:
            return None
        if width == 0 and height == 0:
            return (image,)
        b, h, w, c = image.shape
        if width == 0:
            width = max(1, round(w * height / h))
        elif height == 0:
            height = max(1, round(h * width / w))
        return (image.with_shape(b, height, width, c),)

    @classmethod
    def estimate_memory(
        cls, image: TensorEstimate | None = None, upscale_method: str = "nearest-exact", **inputs: Any
    ) -> int | None:
        return scale_memory(image, cls.estimate_outputs(image=image, **inputs), upscale_method)


class ImageScaleBy(Node):
    display_name = "Upscale Image By"
    category = "image/upscaling"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        upscale_method: Annotated[str, Combo(UPSCALE_METHODS)] = "nearest-exact",
        scale_by: Annotated[float, Float(min=0.01, max=8.0, step=0.01)] = 1.0,
    ) -> torch.Tensor:
        check_image(image, "ImageScaleBy")
        w = max(1, round(image.shape[2] * scale_by))
        h = max(1, round(image.shape[1] * scale_by))
        return scale_image(image, w, h, upscale_method)

    @classmethod
    def estimate_outputs(cls, image: TensorEstimate | None = None, scale_by: float = 1.0, **_: Any) -> tuple | None:
        if image is None or len(image.shape) != 4:
            return None
        b, h, w, c = image.shape
        return (image.with_shape(b, max(1, round(h * scale_by)), max(1, round(w * scale_by)), c),)

    @classmethod
    def estimate_memory(
        cls, image: TensorEstimate | None = None, upscale_method: str = "nearest-exact", **inputs: Any
    ) -> int | None:
        return scale_memory(image, cls.estimate_outputs(image=image, **inputs), upscale_method)


class ImageCrop(Node):
    display_name = "Image Crop"
    category = "image/transform"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512,
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
    ) -> torch.Tensor:
        check_image(image, "ImageCrop")
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return image[:, y : y + height, x : x + width, :]


class ImageBlur(Node):
    display_name = "Image Blur"
    category = "image/postprocessing"
    outputs = ("IMAGE",)

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        blur_radius: Annotated[int, Int(min=1, max=31, step=1)] = 1,
        sigma: Annotated[float, Float(min=0.1, max=10.0, step=0.1)] = 1.0,
    ) -> torch.Tensor:
        check_image(image, "ImageBlur")
        size = blur_radius * 2 + 1
        ax = torch.arange(size, dtype=torch.float32) - blur_radius
        k1 = torch.exp(-(ax**2) / (2 * sigma**2))
        k1 = k1 / k1.sum()
        c = image.shape[-1]
        x = image.movedim(-1, 1)
        x = F.pad(x, (blur_radius,) * 4, mode="reflect" if min(x.shape[-2:]) > blur_radius else "replicate")
        x = F.conv2d(x, k1.view(1, 1, 1, size).repeat(c, 1, 1, 1), groups=c)
        x = F.conv2d(x, k1.view(1, 1, size, 1).repeat(c, 1, 1, 1), groups=c)
        return x.movedim(1, -1)


BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]


def _blend(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    if mode == "difference":
        return a - b
    raise NodeError(f"unknown blend mode {mode!r}", input_name="blend_mode")


class ImageBlend(Node):
    display_name = "Image Blend"
    category = "image/postprocessing"
    outputs = ("IMAGE",)

    def run(
        self,
        image1: Annotated[torch.Tensor, IMAGE],
        image2: Annotated[torch.Tensor, IMAGE],
        blend_factor: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5,
        blend_mode: Annotated[str, Combo(BLEND_MODES, v3=True)] = "normal",
    ) -> torch.Tensor:
        check_image(image1, "ImageBlend", "image1")
        check_image(image2, "ImageBlend", "image2")
        if image1.shape[1:3] != image2.shape[1:3]:
            image2 = scale_image(image2, image1.shape[2], image1.shape[1], "bicubic", "center")
        blended = _blend(image1, image2, blend_mode)
        return (image1 * (1 - blend_factor) + blended * blend_factor).clamp(0, 1)


class ImagePadForOutpaint(Node):
    """Pad an image for outpainting: new area grey, MASK 1 there, feathered into the original edge."""

    display_name = "Pad Image for Outpainting"
    category = "image"
    outputs = ("IMAGE", "MASK")

    def run(
        self,
        image: Annotated[torch.Tensor, IMAGE],
        left: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        top: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        right: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        bottom: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0,
        feathering: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 40,
    ):
        check_image(image, "ImagePadForOutpaint")
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=image.dtype)
        out[:, top : top + h, left : left + w] = image
        mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
        inner = torch.zeros((h, w), dtype=torch.float32)
        if feathering > 0 and feathering * 2 < min(h, w):
            ys = torch.arange(h, dtype=torch.float32).view(h, 1)
            xs = torch.arange(w, dtype=torch.float32).view(1, w)
            big = float(h + w)
            d = torch.full((h, w), big)
            if top:
                d = torch.minimum(d, ys.expand(h, w))
            if bottom:
                d = torch.minimum(d, (h - 1 - ys).expand(h, w))
            if left:
                d = torch.minimum(d, xs.expand(h, w))
            if right:
                d = torch.minimum(d, (w - 1 - xs).expand(h, w))
            v = ((feathering - d) / feathering).clamp(min=0) ** 2
            inner = torch.where(d < feathering, v, inner)
        mask[top : top + h, left : left + w] = inner
        return out, mask.unsqueeze(0)


class ImageCompositeMasked(Node):
    """Paste ``source`` onto ``destination`` at (x, y), through an optional mask."""

    display_name = "ImageCompositeMasked"
    category = "image"
    outputs = ("IMAGE",)

    def run(
        self,
        destination: Annotated[torch.Tensor, IMAGE],
        source: Annotated[torch.Tensor, IMAGE],
        x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0,
        resize_source: Annotated[bool, Boolean()] = False,
        mask: Annotated[Any, Socket("MASK")] = None,
    ) -> torch.Tensor:
        check_image(destination, "ImageCompositeMasked", "destination")
        check_image(source, "ImageCompositeMasked", "source")
        dest = destination.clone()
        src = source
        if resize_source:
            src = _resize(src, dest.shape[2], dest.shape[1], "bilinear")
        if src.shape[0] < dest.shape[0]:
            src = src.repeat((dest.shape[0] + src.shape[0] - 1) // src.shape[0], 1, 1, 1)[: dest.shape[0]]
        H, W = dest.shape[1], dest.shape[2]
        x, y = min(x, W), min(y, H)
        vh, vw = min(src.shape[1], H - y), min(src.shape[2], W - x)
        if vh <= 0 or vw <= 0:
            return dest
        region = src[: dest.shape[0], :vh, :vw]
        if mask is None:
            m = torch.ones((dest.shape[0], vh, vw, 1))
        else:
            m = check_mask(mask)
            m = F.interpolate(
                m.unsqueeze(1), size=(src.shape[1], src.shape[2]), mode="bilinear", align_corners=False
            ).squeeze(1)
            if m.shape[0] < dest.shape[0]:
                m = m.repeat((dest.shape[0] + m.shape[0] - 1) // m.shape[0], 1, 1)[: dest.shape[0]]
            m = m[:, :vh, :vw].unsqueeze(-1)
        dest[:, y : y + vh, x : x + vw] = region * m + dest[:, y : y + vh, x : x + vw] * (1 - m)
        return dest


NODES = [
    EmptyImage,
    LoadImage,
    LoadImageOutput,
    SaveImage,
    PreviewImage,
    SaveImageWebsocket,
    ImageInvert,
    ImageScale,
    ImageScaleBy,
    ImageCrop,
    ImageBlur,
    ImageBlend,
    ImagePadForOutpaint,
    ImageCompositeMasked,
]
