"""Google Imagen through the Gemini API's ``models/{model}:predict`` endpoint (``GoogleImagenGenerate``).

Plain HTTP on aiohttp: the request is one JSON call, and the official ``google-genai`` SDK (3.4) no
longer offers ``generate_images`` with a Gemini API key (only in its enterprise/Vertex mode), so the SDK
does not fit this node. The key comes from ``GEMINI_API_KEY`` / ``GOOGLE_API_KEY`` or the ``google`` profile in Kiln's
config and travels in the ``x-goog-api-key`` header, never in the URL. Images the safety filter removes
are reported: the node fails with the filter's reason when none are left.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from kiln import engine
from kiln.engine import SEED_MAX, Boolean, Combo, Int, NodeError, NodeResult, Output, String
from kiln.nodes.providers import config, http, imageio, ledger, preflight, pricing, result_cache
from kiln.nodes.providers.common import dumps, generation_record, rerun_fingerprint, ui_for

MODELS = [
    "imagen-4.0-generate-001",
    "imagen-4.0-fast-generate-001",
    "imagen-4.0-ultra-generate-001",
    "imagen-3.0-generate-002",
]
ASPECTS = ["1:1", "3:4", "4:3", "9:16", "16:9"]


def _describe(exc: http.HttpFailure) -> NodeError | None:
    if exc.status == 400:
        msg = config.redact(http.message_of(exc.body))
        low = msg.lower()
        if "safety" in low or "blocked" in low or "policy" in low:
            return NodeError(
                f"Imagen refused the prompt (HTTP 400, request id {exc.request_id or 'none'}): {msg}",
                input_name="prompt",
                hint="rephrase the prompt",
            )
        if "api key" in low:
            return NodeError(
                f"Imagen rejected the API key (HTTP 400): {msg}",
                hint="set GEMINI_API_KEY or providers.google.api_key in the config",
            )
        for name in ("sampleCount", "aspectRatio", "personGeneration", "imageSize"):
            if name.lower() in low:
                inp = {
                    "sampleCount": "n",
                    "aspectRatio": "aspect_ratio",
                    "personGeneration": "person_generation",
                    "imageSize": "image_size",
                }[name]
                return NodeError(
                    f"Imagen rejected {inp} (HTTP 400, request id {exc.request_id or 'none'}): {msg}",
                    input_name=inp,
                    hint="this model may not support that value",
                )
    return None


@result_cache.keeps_results
class GoogleImagenGenerate(engine.Node):
    """Generate images with Google Imagen (Gemini API)."""

    display_name = "Google Imagen Generate"
    category = "api/google"
    api_node = True
    outputs = [Output("IMAGE", "images"), Output("MASK", "mask"), Output("STRING", "usage")]
    fingerprint = staticmethod(rerun_fingerprint)

    @classmethod
    def preflight(cls, endpoint: Any = "google", **_: Any) -> bool | dict:
        """Before any paid call: the endpoint profile and its key."""
        return preflight.endpoint_ready("google", endpoint)

    async def run(
        self,
        prompt: Annotated[str, String(multiline=True)],
        model: Annotated[str, Combo(MODELS)] = "imagen-4.0-generate-001",
        n: Annotated[int, Int(min=1, max=4)] = 1,
        aspect_ratio: Annotated[str, Combo(ASPECTS)] = "1:1",
        image_size: Annotated[str, Combo(["1K", "2K"], tooltip="Imagen 4 standard/ultra only")] = "1K",
        person_generation: Annotated[str, Combo(["allow_adult", "dont_allow", "allow_all"])] = "allow_adult",
        seed: Annotated[
            int,
            Int(
                min=0,
                max=SEED_MAX,
                control_after_generate=True,
                tooltip="not sent (the Gemini API has no seed); change it for a fresh image instead of the cached one",
            ),
        ] = 0,
        endpoint: Annotated[str, Combo(lambda: config.profile_names("google"))] = "google",
        model_override: Annotated[str, String()] = "",
        cache_results: Annotated[bool, Boolean(tooltip="off: call on every run")] = True,
    ) -> NodeResult:
        if not prompt.strip():
            raise NodeError("the prompt is empty", input_name="prompt", hint="describe the image")
        name = model_override.strip() or model
        if image_size == "2K" and ("fast" in name or name.startswith("imagen-3")):
            raise NodeError(f"{name} makes 1K images only", input_name="image_size", hint="set image_size to 1K")
        profile = config.get_profile(endpoint, "google")
        params: dict[str, Any] = {"sampleCount": n, "aspectRatio": aspect_ratio, "personGeneration": person_generation}
        if name.startswith("imagen-4") and "fast" not in name:
            params["imageSize"] = image_size
        headers = {"x-goog-api-key": profile.api_key(), "Content-Type": "application/json"}
        one = pricing.per_image(name)
        res = ledger.reserve(endpoint, name, None if one is None else one * n, f"GoogleImagenGenerate ({name})")
        engine.progress(0, 1)
        try:
            async with http.session() as s:
                body, resp_headers = await http.request(
                    s,
                    "POST",
                    f"{profile.base_url}/models/{name}:predict",
                    profile=profile,
                    provider=endpoint,
                    headers=headers,
                    body={"instances": [{"prompt": prompt}], "parameters": params},
                    what="Imagen predict",
                    describe=_describe,
                )
            preds = (body or {}).get("predictions") or []
            blobs, filtered = [], []
            for p in preds:
                if p.get("bytesBase64Encoded"):
                    try:
                        blobs.append(base64.b64decode(p["bytesBase64Encoded"], validate=True))
                    except (binascii.Error, ValueError) as exc:
                        raise NodeError(
                            "Imagen sent an image that is not valid base64", hint="a malformed response; retry"
                        ) from exc
                elif p.get("raiFilteredReason"):
                    filtered.append(p["raiFilteredReason"])
            if not blobs:
                why = "; ".join(filtered) or "the response held no images"
                raise NodeError(
                    f"Imagen returned no image: {why}",
                    input_name="prompt" if filtered else None,
                    hint="rephrase the prompt" if filtered else "retry, or check the model name",
                )
            images, mask = await imageio.decode_all(blobs, f"GoogleImagenGenerate ({name})")
        except BaseException as exc:
            res.abandon(exc)
            raise
        usd = (one or 0.0) * len(blobs)
        rid = http.request_id(resp_headers)
        res.settle(usd, estimated=True, request_id=rid)
        rec = generation_record(
            provider=endpoint,
            model=name,
            usd=usd,
            estimated=True,
            request_id=rid,
            images=len(blobs),
            filtered=filtered or None,
        )
        engine.progress(1, 1)
        return NodeResult(images, mask, dumps(rec), ui=ui_for(rec))


NODES = [GoogleImagenGenerate]
