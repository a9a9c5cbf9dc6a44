"""OpenAI image nodes on the official ``openai`` SDK: Images API generate / edit / variation, and the
Responses API image tool with streamed partial images.

Every node also speaks to OpenAI-compatible endpoints (FLUX.1-schnell on Together or Fireworks,
self-hosted servers): pick a configured ``endpoint`` profile, or override ``base_url`` and the model.
Per-model rules (sizes, qualities, n, formats) are checked before any request is sent. Outputs are an
IMAGE batch, the alpha as a MASK, the revised prompt and a JSON usage record (provider, model, cost,
tokens, request id) that storage sinks embed as provenance.

This module is longer than most families because the four nodes share one request path; the shared
HTTP, retry, price and key logic lives in ``nodes/providers/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import SEED_MAX, Boolean, Combo, Int, NodeError, NodeResult, Output, Socket, String
from kiln.nodes.common import check_image
from kiln.nodes.providers import config, imageio, ledger, openai_client, preflight, pricing, result_cache
from kiln.nodes.providers.common import dumps, generation_record, rerun_fingerprint, ui_for

IMAGE_MODELS = ["gpt-image-1", "dall-e-3", "dall-e-2"]
SIZES = ["auto", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792", "512x512", "256x256"]
QUALITIES = ["auto", "low", "medium", "high", "standard", "hd"]
FORMATS = ["png", "jpeg", "webp"]

_RULES: dict[str, dict[str, Any]] = {
    "gpt-image-1": {
        "sizes": ["auto", "1024x1024", "1536x1024", "1024x1536"],
        "qualities": ["auto", "low", "medium", "high"],
        "max_n": 10,
        "style": False,
        "gpt": True,
        "edit_images": 16,
    },
    "dall-e-3": {
        "sizes": ["1024x1024", "1792x1024", "1024x1792"],
        "qualities": ["standard", "hd"],
        "max_n": 1,
        "style": True,
        "gpt": False,
        "edit_images": 0,
    },
    "dall-e-2": {
        "sizes": ["256x256", "512x512", "1024x1024"],
        "qualities": ["standard"],
        "max_n": 10,
        "style": False,
        "gpt": False,
        "edit_images": 1,
    },
}

Endpoint = Annotated[
    str,
    Combo(
        lambda: config.profile_names("openai"),
        tooltip="provider profile from Kiln's config: which base URL and which key",
    ),
]
BaseUrl = Annotated[
    str,
    String(
        tooltip="override the profile's base URL (empty: the profile's); a key is only "
        "sent to the origin a profile names"
    ),
]
ModelOverride = Annotated[
    str,
    String(
        tooltip="any model name the endpoint serves; wins over 'model' when set (e.g. black-forest-labs/FLUX.1-schnell)"
    ),
]
Seed = Annotated[
    int,
    Int(
        min=0,
        max=SEED_MAX,
        control_after_generate=True,
        tooltip="not sent (OpenAI has no seed); change it to get a fresh image instead of the cached one",
    ),
]
CacheResults = Annotated[bool, Boolean(tooltip="off: call the provider on every run, never reuse a paid result")]
PartialImages = Annotated[
    int,
    Int(
        min=0,
        max=3,
        tooltip="gpt-image-1: stream this many partial images as previews "
        "while it renders (0: one response at the end)",
    ),
]


def _check_partial(model: str, partial_images: int) -> None:
    if partial_images and model != "gpt-image-1":
        raise NodeError(
            f"{model} does not stream partial images",
            input_name="partial_images",
            hint="set partial_images to 0, or use gpt-image-1",
        )


def _model_name(model: str, model_override: str, profile: config.Profile) -> str:
    return (model_override or "").strip() or (
        profile.default_model
        if profile.name != "openai" and profile.default_model and model == "gpt-image-1"
        else model
    )


def _pick(value: str, allowed: list[str], default: str, input_name: str, model: str) -> str:
    if value == "auto" and "auto" not in allowed:
        return default
    if value not in allowed:
        raise NodeError(
            f"{model} does not accept {input_name} '{value}'", input_name=input_name, hint=f"use one of {allowed}"
        )
    return value


def image_params(
    model: str,
    *,
    size: str,
    quality: str,
    n: int,
    style: str = "auto",
    background: str = "auto",
    output_format: str = "png",
    output_compression: int = 100,
    moderation: str = "auto",
    edit: bool = False,
) -> dict:
    """The request parameters for a known model, enforcing its rules; unknown models get the basics."""
    rules = _RULES.get(model)
    if rules is None:  # an OpenAI-compatible endpoint's model: the basics, plus any option the user set
        p: dict[str, Any] = {"model": model, "n": n, "response_format": "b64_json"}
        for name, value, default in (
            ("size", size, "auto"),
            ("quality", quality, "auto"),
            ("style", style, "auto"),
            ("background", background, "auto"),
            ("output_format", output_format, "png"),
            ("output_compression", output_compression, 100),
            ("moderation", moderation, "auto"),
        ):
            if value != default and not (edit and name == "moderation"):
                p[name] = value
        return p
    p = {"model": model, "n": n}
    p["size"] = _pick(size, rules["sizes"], "1024x1024", "size", model)
    q = _pick(quality, rules["qualities"], "standard", "quality", model)
    if n > rules["max_n"]:
        raise NodeError(
            f"{model} makes at most {rules['max_n']} image(s) per request, not {n}",
            input_name="n",
            hint=f"set n to {rules['max_n']} or use several nodes",
        )
    if style != "auto":
        if not rules["style"]:
            raise NodeError(f"style '{style}' applies to dall-e-3 only", input_name="style", hint="set style to auto")
        p["style"] = style
    if rules["gpt"]:
        p["quality"] = q
        p["moderation"] = moderation if not edit else None
        if background == "transparent" and output_format == "jpeg":
            raise NodeError(
                "a transparent background needs png or webp output",
                input_name="output_format",
                hint="set output_format to png or webp, or background to auto/opaque",
            )
        p["background"] = background
        p["output_format"] = output_format
        if output_format in ("jpeg", "webp"):
            p["output_compression"] = output_compression
        elif output_compression != 100:
            raise NodeError(
                "output_compression applies to jpeg and webp only",
                input_name="output_compression",
                hint="set output_format to jpeg or webp, or output_compression to 100",
            )
        if edit:
            del p["moderation"]
    else:
        if q != "standard" or model == "dall-e-3":
            p["quality"] = q
        for name, value, ok in (
            ("background", background, "auto"),
            ("output_format", output_format, "png"),
            ("moderation", moderation, "auto"),
        ):
            if value != ok:
                raise NodeError(
                    f"{name} '{value}' is a gpt-image-1 option; {model} does not take it",
                    input_name=name,
                    hint=f"set {name} to {ok} or use gpt-image-1",
                )
        if output_compression != 100:
            raise NodeError(
                "output_compression is a gpt-image-1 option", input_name="output_compression", hint="set it to 100"
            )
        p["response_format"] = "b64_json"
    return p


def estimate(model: str, params: dict, n: int) -> float | None:
    one = pricing.per_image(model, params.get("size", "*"), params.get("quality", "*"))
    return None if one is None else one * n


def _sdk_usage(resp: Any) -> dict | None:
    u = getattr(resp, "usage", None)
    if u is None:
        return None
    return u.model_dump() if hasattr(u, "model_dump") else dict(u)


async def _image_bytes(items: list, profile: config.Profile, what: str) -> list[bytes]:
    blobs = []
    for i, item in enumerate(items):
        b64 = getattr(item, "b64_json", None)
        url = getattr(item, "url", None)
        if b64:
            try:
                blobs.append(base64.b64decode(b64, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise NodeError(
                    f"{what}: image #{i} in the response is not valid base64",
                    hint="the endpoint sent a malformed response; retry or report it",
                ) from exc
        elif url:
            got = await imageio.fetch(
                url,
                max_bytes=profile.max_download_bytes,
                timeout_s=profile.timeout_s,
                what=f"{what} image #{i}",
                check=False,
            )
            blobs.append(got.data)
        else:
            raise NodeError(
                f"{what}: image #{i} in the response has neither b64_json nor url",
                hint="the endpoint sent a malformed response; retry or report it",
            )
    return blobs


def _preflight(cls: type, endpoint: Any = "openai", base_url: Any = "", **_: Any) -> bool | dict:
    """Before any paid call: the openai package, the endpoint profile and its key."""
    return preflight.endpoint_ready("openai", endpoint, base_url, package="openai")


class _Call:
    """One paid request: endpoint resolution, budget reservation, retries, decoding, the usage record."""

    def __init__(self, node: str, endpoint: str, base_url: str, inputs: set[str]):
        self.node = node
        self.profile = config.get_profile(endpoint, "openai")
        self.base_url, self.api_key = config.resolve_endpoint(self.profile, base_url)
        self.endpoint = endpoint
        self.inputs = inputs

    def client(self) -> Any:
        return openai_client.client(self.base_url, self.api_key, self.profile.timeout_s)

    async def images(
        self, op: str, kwargs: dict, model: str, est: float | None, n: int, partial_images: int = 0
    ) -> tuple:
        what = f"{self.node} ({model})"
        res = ledger.reserve(self.endpoint, model, est, what)
        total = n * (partial_images + 1)
        engine.progress(0, total)
        fn = getattr(self.client().images, op)
        args = {k: v for k, v in kwargs.items() if v is not None}
        try:
            if partial_images:
                blobs, revised, usage, rid = await self._streamed(fn, args, partial_images, total, what, op)
            else:
                blobs, revised, usage, rid = await self._whole(fn, args, what, op)
            images, mask = await imageio.decode_all(blobs, what)
        except BaseException as exc:
            res.abandon(exc)
            raise
        actual = pricing.from_usage(model, usage)
        usd = actual if actual is not None else (est or 0.0)
        res.settle(usd, estimated=actual is None, usage=usage, request_id=rid)
        rec = generation_record(
            provider=self.endpoint,
            model=model,
            usd=usd,
            estimated=actual is None,
            usage=usage,
            request_id=rid,
            revised_prompts=revised,
            images=int(images.shape[0]),
        )
        engine.progress(total, total)
        return images, mask, revised, rec

    async def _whole(self, fn: Any, args: dict, what: str, op: str) -> tuple:
        resp = await openai_client.call(
            lambda: fn(**args),
            self.profile,
            endpoint=self.endpoint,
            base_url=self.base_url,
            inputs=self.inputs,
            what=f"{op} request",
        )
        items = list(getattr(resp, "data", None) or [])
        rid = getattr(resp, "_request_id", None)
        if not items:
            raise NodeError(
                f"{what}: the response held no images (request id {rid or 'none'})",
                hint="the endpoint sent a malformed response; retry or report it",
            )
        blobs = await _image_bytes(items, self.profile, what)
        revised = [r for r in (getattr(i, "revised_prompt", None) for i in items) if r]
        return blobs, revised, _sdk_usage(resp), rid

    async def _streamed(self, fn: Any, args: dict, partial_images: int, total: int, what: str, op: str) -> tuple:
        """gpt-image-1 streaming: partial images become preview frames, completed events the outputs."""
        stream = await openai_client.call(
            lambda: fn(**args, stream=True, partial_images=partial_images),
            self.profile,
            endpoint=self.endpoint,
            base_url=self.base_url,
            inputs=self.inputs,
            what=f"{op} request",
        )
        blobs: list[bytes] = []
        usage: dict | None = None
        shown = 0
        openai = openai_client.sdk()
        try:
            async for ev in stream:
                t = getattr(ev, "type", "")
                if t.endswith(".partial_image"):
                    shown += 1
                    engine.progress(
                        min(shown + len(blobs), total - 1),
                        total,
                        preview=_preview(ev.b64_json, getattr(ev, "output_format", "png")),
                    )
                elif t.endswith(".completed"):
                    try:
                        blobs.append(base64.b64decode(ev.b64_json, validate=True))
                    except (binascii.Error, ValueError, TypeError) as exc:
                        raise NodeError(
                            f"{what}: a streamed image is not valid base64",
                            hint="the endpoint sent a malformed response; retry",
                        ) from exc
                    u = _sdk_usage(ev)
                    usage = u if usage is None or u is None else _add_usage(usage, u)
                elif t == "error" or getattr(ev, "error", None):
                    err = getattr(ev, "error", None) or ev
                    raise NodeError(
                        openai_client.redact(f"{what}: the stream reported an error: {getattr(err, 'message', err)}"),
                        hint="retry; rephrase the prompt if it names a content policy",
                    )
        except openai.APIError as exc:
            raise openai_client.to_node_error(
                exc, endpoint=self.endpoint, base_url=self.base_url, inputs=self.inputs, what=f"{op} stream"
            ) from None
        finally:
            await stream.close()
        if not blobs:
            raise NodeError(
                f"{what}: the stream ended without a completed image",
                hint="the connection dropped or the endpoint does not stream images; set partial_images to 0",
            )
        rid = _stream_request_id(stream)
        return blobs, [], usage, rid


def _add_usage(a: dict, b: dict) -> dict:
    """Sum two usage records (one per streamed image)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, (int, float)) and isinstance(a.get(k), (int, float)):
            out[k] = a[k] + v
        elif isinstance(v, dict) and isinstance(a.get(k), dict):
            out[k] = _add_usage(a[k], v)
    return out


def _result(images: torch.Tensor, mask: torch.Tensor, revised: list[str], prompt: str, rec: dict) -> NodeResult:
    return NodeResult(images, mask, revised[0] if revised else prompt, dumps(rec), ui=ui_for(rec))


_OUT = [
    Output("IMAGE", "images"),
    Output("MASK", "mask", tooltip="1 - alpha (transparent background areas)"),
    Output("STRING", "revised_prompt"),
    Output("STRING", "usage", tooltip="JSON: provider, model, cost, tokens, request id; connect to a sink"),
]


# inputs a provider error may name (its "param"), so the message points at the widget to change
_GENERATE_PARAMS = {
    "prompt",
    "model",
    "size",
    "quality",
    "n",
    "style",
    "background",
    "output_format",
    "output_compression",
    "moderation",
}


@result_cache.keeps_results
class OpenAIImageGenerate(engine.Node):
    """Generate images from a prompt with OpenAI (gpt-image-1, dall-e-3, dall-e-2) or an OpenAI-compatible
    endpoint."""

    display_name = "OpenAI Image Generate"
    category = "api/openai"
    api_node = True
    outputs = _OUT

    fingerprint = staticmethod(rerun_fingerprint)

    preflight = classmethod(_preflight)

    async def run(
        self,
        prompt: Annotated[str, String(multiline=True)],
        model: Annotated[str, Combo(IMAGE_MODELS)] = "gpt-image-1",
        size: Annotated[str, Combo(SIZES)] = "auto",
        quality: Annotated[str, Combo(QUALITIES)] = "auto",
        n: Annotated[int, Int(min=1, max=10)] = 1,
        style: Annotated[str, Combo(["auto", "vivid", "natural"])] = "auto",
        background: Annotated[str, Combo(["auto", "transparent", "opaque"])] = "auto",
        output_format: Annotated[str, Combo(FORMATS)] = "png",
        output_compression: Annotated[int, Int(min=0, max=100)] = 100,
        moderation: Annotated[str, Combo(["auto", "low"])] = "auto",
        partial_images: PartialImages = 0,
        seed: Seed = 0,
        endpoint: Endpoint = "openai",
        base_url: BaseUrl = "",
        model_override: ModelOverride = "",
        cache_results: CacheResults = True,
    ) -> NodeResult:
        if not prompt or not prompt.strip():
            raise NodeError("the prompt is empty", input_name="prompt", hint="describe the image to generate")
        call = _Call("OpenAIImageGenerate", endpoint, base_url, _GENERATE_PARAMS)
        name = _model_name(model, model_override, call.profile)
        params = image_params(
            name,
            size=size,
            quality=quality,
            n=n,
            style=style,
            background=background,
            output_format=output_format,
            output_compression=output_compression,
            moderation=moderation,
        )
        _check_partial(name, partial_images)
        images, mask, revised, rec = await call.images(
            "generate", {"prompt": prompt, **params}, name, estimate(name, params, n), n, partial_images
        )
        return _result(images, mask, revised, prompt, rec)


def _png_upload(image: torch.Tensor, name: str, alpha: Any = None) -> tuple[str, bytes, str]:
    return (name, imageio.encode_png(image, alpha), "image/png")


@result_cache.keeps_results
class OpenAIImageEdit(engine.Node):
    """Edit or combine images with a prompt (gpt-image-1: up to 16 reference images; dall-e-2: one square
    image). An optional MASK (1 = change) becomes the transparent-where-to-edit PNG the API wants."""

    display_name = "OpenAI Image Edit"
    category = "api/openai"
    api_node = True
    outputs = _OUT

    fingerprint = staticmethod(rerun_fingerprint)

    preflight = classmethod(_preflight)

    async def run(
        self,
        image: Annotated[torch.Tensor, Socket("IMAGE", tooltip="every image of the batch is sent")],
        prompt: Annotated[str, String(multiline=True)],
        model: Annotated[str, Combo(["gpt-image-1", "dall-e-2"])] = "gpt-image-1",
        size: Annotated[str, Combo(SIZES)] = "auto",
        quality: Annotated[str, Combo(QUALITIES)] = "auto",
        n: Annotated[int, Int(min=1, max=10)] = 1,
        background: Annotated[str, Combo(["auto", "transparent", "opaque"])] = "auto",
        output_format: Annotated[str, Combo(FORMATS)] = "png",
        output_compression: Annotated[int, Int(min=0, max=100)] = 100,
        partial_images: PartialImages = 0,
        seed: Seed = 0,
        endpoint: Endpoint = "openai",
        base_url: BaseUrl = "",
        model_override: ModelOverride = "",
        cache_results: CacheResults = True,
        mask: Annotated[torch.Tensor, Socket("MASK", tooltip="1 = the area to change")] = None,
        image_2: Annotated[torch.Tensor, Socket("IMAGE", tooltip="more references, any size")] = None,
        image_3: Annotated[torch.Tensor, Socket("IMAGE")] = None,
    ) -> NodeResult:
        if not prompt or not prompt.strip():
            raise NodeError("the prompt is empty", input_name="prompt", hint="describe the edit")
        call = _Call(
            "OpenAIImageEdit",
            endpoint,
            base_url,
            {"image", "prompt", "mask", "size", "quality", "n", "background", "output_format", "model"},
        )
        name = _model_name(model, model_override, call.profile)
        refs = []
        for input_name, t in (("image", image), ("image_2", image_2), ("image_3", image_3)):
            if t is None:
                continue
            check_image(t, "OpenAIImageEdit", input_name)
            refs.extend((input_name, t[i]) for i in range(t.shape[0]))
        rules = _RULES.get(name)
        if rules is not None and rules["edit_images"] == 0:
            raise NodeError(f"{name} cannot edit images", input_name="model", hint="use gpt-image-1 or dall-e-2")
        if rules is not None and len(refs) > rules["edit_images"]:
            raise NodeError(
                f"{name} edits at most {rules['edit_images']} image(s); {len(refs)} were connected",
                input_name="image",
                hint="send fewer images (a batch of 1 for dall-e-2)",
            )
        params = image_params(
            name,
            size=size,
            quality=quality,
            n=n,
            background=background,
            output_format=output_format,
            output_compression=output_compression,
            edit=True,
        )
        h, w = int(refs[0][1].shape[0]), int(refs[0][1].shape[1])
        files = await asyncio.to_thread(lambda: [_png_upload(t, f"image_{i}.png") for i, (_, t) in enumerate(refs)])
        kwargs: dict[str, Any] = {"prompt": prompt, "image": files if len(files) > 1 else files[0], **params}
        if name == "dall-e-2":
            if h != w:
                raise NodeError(
                    f"dall-e-2 edits square images only; this one is {w}x{h}",
                    input_name="image",
                    hint="crop or pad the image to a square first",
                )
            if mask is None:
                raise NodeError(
                    "dall-e-2 edits need a mask (the image has no transparent area)",
                    input_name="mask",
                    hint="connect a MASK where 1 marks the area to change",
                )
        if mask is not None:
            alpha = imageio.mask_to_alpha(mask, h, w)
            kwargs["mask"] = await asyncio.to_thread(_png_upload, refs[0][1], "mask.png", alpha)
        if name == "gpt-image-1":
            for i, f in enumerate(files):
                if len(f[1]) >= 50 * 1024 * 1024:
                    raise NodeError(
                        f"reference image {i} is {len(f[1]) / 1e6:.0f} MB as PNG; gpt-image-1 takes files under 50 MB",
                        input_name=refs[i][0],
                        hint="downscale the image",
                    )
        if name == "dall-e-2":
            for f in [kwargs["image"], kwargs["mask"]]:
                if len(f[1]) >= 4 * 1024 * 1024:
                    raise NodeError(
                        f"dall-e-2 takes PNGs under 4 MB; this one is {len(f[1]) / 1e6:.1f} MB",
                        input_name="image",
                        hint="downscale the image to 1024x1024 or less",
                    )
        _check_partial(name, partial_images)
        images, out_mask, revised, rec = await call.images(
            "edit", kwargs, name, estimate(name, params, n), n, partial_images
        )
        return _result(images, out_mask, revised, prompt, rec)


@result_cache.keeps_results
class OpenAIImageVariation(engine.Node):
    """Variations of one square image (dall-e-2)."""

    display_name = "OpenAI Image Variation"
    category = "api/openai"
    api_node = True
    outputs = _OUT

    fingerprint = staticmethod(rerun_fingerprint)

    preflight = classmethod(_preflight)

    async def run(
        self,
        image: Annotated[torch.Tensor, Socket("IMAGE", tooltip="the first image of the batch")],
        size: Annotated[str, Combo(["1024x1024", "512x512", "256x256"])] = "1024x1024",
        n: Annotated[int, Int(min=1, max=10)] = 1,
        seed: Seed = 0,
        endpoint: Endpoint = "openai",
        base_url: BaseUrl = "",
        cache_results: CacheResults = True,
    ) -> NodeResult:
        check_image(image, "OpenAIImageVariation")
        call = _Call("OpenAIImageVariation", endpoint, base_url, {"image", "size", "n"})
        h, w = int(image.shape[1]), int(image.shape[2])
        if h != w:
            raise NodeError(
                f"variations need a square image; this one is {w}x{h}",
                input_name="image",
                hint="crop or pad the image to a square first",
            )
        f = await asyncio.to_thread(_png_upload, image[0], "image.png")
        if len(f[1]) >= 4 * 1024 * 1024:
            raise NodeError(
                f"dall-e-2 takes PNGs under 4 MB; this one is {len(f[1]) / 1e6:.1f} MB",
                input_name="image",
                hint="downscale the image to 1024x1024 or less",
            )
        params = {"model": "dall-e-2", "n": n, "size": size, "response_format": "b64_json"}
        images, out_mask, revised, rec = await call.images(
            "create_variation", {"image": f, **params}, "dall-e-2", estimate("dall-e-2", params, n), n
        )
        return _result(images, out_mask, revised, "", rec)


RESPONSES_MODELS = ["gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-5"]


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _preview(b64: str, fmt: str) -> engine.Preview | None:
    try:
        data = base64.b64decode(b64)
    except (binascii.Error, ValueError):
        return None
    if fmt in ("png", "jpeg"):
        return engine.Preview("PNG" if fmt == "png" else "JPEG", data)
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=85)
    return engine.Preview("JPEG", buf.getvalue())


@result_cache.keeps_results
class OpenAIResponsesImage(engine.Node):
    """Generate or edit an image through the Responses API image tool. Partial images stream in as the
    node's preview frames; chain turns by linking response_id into the next node's previous_response_id."""

    display_name = "OpenAI Responses Image"
    category = "api/openai"
    api_node = True
    outputs = [
        *_OUT[:3],
        Output("STRING", "response_id", tooltip="link into previous_response_id to edit further"),
        _OUT[3],
    ]

    fingerprint = staticmethod(rerun_fingerprint)

    preflight = classmethod(_preflight)

    async def run(
        self,
        prompt: Annotated[str, String(multiline=True)],
        model: Annotated[str, Combo(RESPONSES_MODELS)] = "gpt-4.1",
        partial_images: Annotated[int, Int(min=0, max=3, tooltip="previews streamed while it runs")] = 2,
        size: Annotated[str, Combo(["auto", "1024x1024", "1536x1024", "1024x1536"])] = "auto",
        quality: Annotated[str, Combo(["auto", "low", "medium", "high"])] = "auto",
        background: Annotated[str, Combo(["auto", "transparent", "opaque"])] = "auto",
        output_format: Annotated[str, Combo(FORMATS)] = "png",
        previous_response_id: Annotated[
            str, String(tooltip="a response_id output, to continue that conversation")
        ] = "",
        seed: Seed = 0,
        endpoint: Endpoint = "openai",
        base_url: BaseUrl = "",
        model_override: ModelOverride = "",
        cache_results: CacheResults = True,
        image: Annotated[torch.Tensor, Socket("IMAGE", tooltip="input images (the whole batch)")] = None,
    ) -> NodeResult:
        if not prompt or not prompt.strip():
            raise NodeError("the prompt is empty", input_name="prompt", hint="say what to draw or change")
        if background == "transparent" and output_format == "jpeg":
            raise NodeError(
                "a transparent background needs png or webp output",
                input_name="output_format",
                hint="set output_format to png or webp",
            )
        call = _Call(
            "OpenAIResponsesImage",
            endpoint,
            base_url,
            {"prompt", "model", "size", "quality", "background", "output_format", "previous_response_id"},
        )
        name = (model_override or "").strip() or model
        content: list[dict] = [{"type": "input_text", "text": prompt}]
        if image is not None:
            check_image(image, "OpenAIResponsesImage")
            pngs = await asyncio.to_thread(lambda: [imageio.encode_png(image[i]) for i in range(image.shape[0])])
            content += [{"type": "input_image", "image_url": _data_url(p)} for p in pngs]
        tool: dict[str, Any] = {
            "type": "image_generation",
            "size": size,
            "quality": quality,
            "background": background,
            "output_format": output_format,
        }
        if partial_images:
            tool["partial_images"] = partial_images
        kwargs: dict[str, Any] = {
            "model": name,
            "input": [{"role": "user", "content": content}],
            "tools": [tool],
            "tool_choice": {"type": "image_generation"},
            "stream": True,
        }
        if previous_response_id.strip():
            kwargs["previous_response_id"] = previous_response_id.strip()
        one = pricing.per_image("gpt-image-1", size, quality)
        res = ledger.reserve(endpoint, name, one, f"OpenAIResponsesImage ({name})")
        total = partial_images + 1
        engine.progress(0, total)
        try:
            result = await self._stream(call, kwargs, output_format, total)
            images, mask = await imageio.decode_all(result["images"], f"OpenAIResponsesImage ({name})")
        except BaseException as exc:
            res.abandon(exc)
            raise
        text_usd = pricing.from_usage(name, result["usage"]) or 0.0
        usd = text_usd + (one or 0.0) * len(result["images"])
        res.settle(usd, estimated=True, usage=result["usage"], request_id=result["request_id"])
        rec = generation_record(
            provider=endpoint,
            model=name,
            usd=usd,
            estimated=True,
            usage=result["usage"],
            request_id=result["request_id"],
            revised_prompts=result["revised"],
            response_id=result["response_id"],
            image_model="gpt-image-1",
        )
        engine.progress(total, total)
        revised = result["revised"]
        return NodeResult(
            images, mask, revised[0] if revised else prompt, result["response_id"], dumps(rec), ui=ui_for(rec)
        )

    async def _stream(self, call: _Call, kwargs: dict, fmt: str, total: int) -> dict:
        client = call.client()
        stream = await openai_client.call(
            lambda: client.responses.create(**kwargs),
            call.profile,
            endpoint=call.endpoint,
            base_url=call.base_url,
            inputs=call.inputs,
            what="responses request",
        )
        out: dict[str, Any] = {
            "images": [],
            "revised": [],
            "usage": None,
            "response_id": "",
            "request_id": getattr(stream, "_request_id", None) or _stream_request_id(stream),
        }
        text: list[str] = []
        done = False
        openai = openai_client.sdk()
        try:
            async for ev in stream:
                t = getattr(ev, "type", "")
                if t == "response.created":
                    out["response_id"] = ev.response.id
                elif t == "response.image_generation_call.partial_image":
                    engine.progress(
                        min(ev.partial_image_index + 1, total - 1), total, preview=_preview(ev.partial_image_b64, fmt)
                    )
                elif t == "response.output_item.done":
                    item = ev.item
                    if getattr(item, "type", "") == "image_generation_call":
                        if item.status == "failed" or not item.result:
                            err = getattr(item, "error", None)
                            raise NodeError(
                                f"the image tool failed: {getattr(err, 'message', 'no image returned')}",
                                input_name="prompt",
                                hint="rephrase the prompt; the provider's content policy may have refused it",
                            )
                        try:
                            out["images"].append(base64.b64decode(item.result, validate=True))
                        except (binascii.Error, ValueError) as exc:
                            raise NodeError(
                                "the streamed image is not valid base64",
                                hint="the endpoint sent a malformed response; retry",
                            ) from exc
                        if getattr(item, "revised_prompt", None):
                            out["revised"].append(item.revised_prompt)
                    elif getattr(item, "type", "") == "message":
                        for c in getattr(item, "content", None) or []:
                            if getattr(c, "text", None):
                                text.append(c.text)
                elif t == "response.completed":
                    r = ev.response
                    out["response_id"] = r.id
                    out["usage"] = r.usage.model_dump() if getattr(r, "usage", None) is not None else None
                    done = True
                elif t in ("response.failed", "response.incomplete"):
                    r = ev.response
                    err = getattr(r, "error", None) or getattr(r, "incomplete_details", None)
                    msg = openai_client.redact(getattr(err, "message", None) or getattr(err, "reason", None) or t)
                    code = getattr(err, "code", "") or ""
                    raise NodeError(
                        f"the response {t.split('.')[-1]} (request id {out['request_id'] or 'none'}): {msg}",
                        input_name="prompt" if code in openai_client.CONTENT_POLICY_CODES else None,
                        hint="rephrase the prompt"
                        if code in openai_client.CONTENT_POLICY_CODES
                        else "retry, or check the model and inputs",
                    )
                elif t == "error":
                    raise NodeError(
                        openai_client.redact(f"the stream reported an error: {getattr(ev, 'message', ev)}"),
                        hint="retry; if it persists the endpoint may not support the image tool",
                    )
        except openai.APIError as exc:
            raise openai_client.to_node_error(
                exc, endpoint=call.endpoint, base_url=call.base_url, inputs=call.inputs, what="responses stream"
            ) from None
        finally:
            await stream.close()
        if not done:
            raise NodeError(
                "the response stream ended before response.completed",
                hint="the connection dropped or the endpoint is not a Responses API; retry",
            )
        if not out["images"]:
            said = (" It said: " + " ".join(text)[:300]) if text else ""
            raise NodeError(
                f"the model answered without an image.{said}", input_name="prompt", hint="ask explicitly for an image"
            )
        return out


def _stream_request_id(stream: Any) -> str | None:
    resp = getattr(stream, "response", None)
    return resp.headers.get("x-request-id") if resp is not None else None


NODES = [OpenAIImageGenerate, OpenAIImageEdit, OpenAIImageVariation, OpenAIResponsesImage]
