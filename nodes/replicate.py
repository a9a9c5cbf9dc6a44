"""Replicate: run any model by id with an input dict (``ReplicateRun``).

Plain HTTP on aiohttp against Replicate's predictions API (the official SDK is a thin HTTP wrapper; going
direct keeps one dependency fewer and keeps retries and cancellation in Kiln's hands). The create call
asks the server to wait (``Prefer: wait``) and the node then polls until the prediction ends, reporting
progress from the model's logs. An interrupted run cancels the prediction on Replicate, so it stops
billing. Output URLs (they expire within an hour) are downloaded into an IMAGE batch at once.

The key comes from ``REPLICATE_API_TOKEN`` or the ``replicate`` profile in Kiln's config.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Boolean, Combo, Int, NodeError, NodeResult, Output, Socket, String
from kiln.nodes.common import check_image
from kiln.nodes.providers import config, http, imageio, ledger, preflight, pricing, result_cache
from kiln.nodes.providers.common import dumps, generation_record, rerun_fingerprint, ui_for

_MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*(:[0-9a-f]{64})?$", re.IGNORECASE)
_PERCENT = re.compile(r"(\d{1,3})%")
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}


def parse_input(text: str) -> dict:
    if not (text or "").strip():
        return {}
    try:
        v = json.loads(text)
    except ValueError as exc:
        raise NodeError(
            f"input_json is not JSON: {exc}",
            input_name="input_json",
            hint='write a JSON object such as {"aspect_ratio": "1:1", "output_format": "png"}',
        ) from exc
    if not isinstance(v, dict):
        raise NodeError(
            "input_json must be a JSON object", input_name="input_json", hint='e.g. {"aspect_ratio": "16:9"}'
        )
    return v


def _urls(output: Any) -> list[str]:
    if isinstance(output, str):
        return [output]
    if isinstance(output, list):
        return [u for u in output if isinstance(u, str)]
    if isinstance(output, dict):
        return [u for v in output.values() for u in _urls(v)]
    return []


def _progress_from_logs(logs: str | None) -> int | None:
    found = _PERCENT.findall(logs or "")
    return min(100, int(found[-1])) if found else None


async def _download(url: str, i: int, profile: config.Profile) -> bytes:
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    got = await imageio.fetch(
        url,
        max_bytes=profile.max_download_bytes,
        timeout_s=profile.timeout_s,
        what=f"ReplicateRun output #{i}",
        check=False,
    )
    return got.data


def _describe(exc: http.HttpFailure) -> NodeError | None:
    if exc.status == 422:
        detail = http.message_of(exc.body)
        return NodeError(
            f"Replicate rejected the input (HTTP 422, request id {exc.request_id or 'none'}): {config.redact(detail)}",
            input_name="input_json",
            hint="fix the named field; the model's page on replicate.com lists its inputs",
        )
    return None


@result_cache.keeps_results
class ReplicateRun(engine.Node):
    """Run a Replicate model (e.g. black-forest-labs/flux-1.1-pro) with an input dict and return its images."""

    display_name = "Replicate Run"
    category = "api/replicate"
    api_node = True
    outputs = [
        Output("IMAGE", "images"),
        Output("MASK", "mask"),
        Output("STRING", "prediction_id"),
        Output("STRING", "usage", tooltip="JSON: provider, model, cost, metrics, prediction id"),
    ]
    fingerprint = staticmethod(rerun_fingerprint)

    @classmethod
    def preflight(cls, endpoint: Any = "replicate", **_: Any) -> bool | dict:
        """Before any paid call: the endpoint profile and its key."""
        return preflight.endpoint_ready("replicate", endpoint)

    async def run(
        self,
        model: Annotated[str, String(tooltip="owner/name, or owner/name:version")] = "black-forest-labs/flux-1.1-pro",
        prompt: Annotated[str, String(multiline=True, tooltip="sent as input.prompt when not empty")] = "",
        input_json: Annotated[
            str, String(multiline=True, tooltip="the model's other inputs as JSON")
        ] = '{"aspect_ratio": "1:1", "output_format": "png"}',
        seed: Annotated[
            int,
            Int(
                min=0,
                max=2**32 - 1,
                control_after_generate=True,
                tooltip="sent as input.seed when above 0 and input_json has none",
            ),
        ] = 0,
        image_field: Annotated[str, String(tooltip="input name for the connected image")] = "image",
        max_wait_s: Annotated[int, Int(min=1, max=3600, tooltip="give up (and cancel) after this")] = 600,
        endpoint: Annotated[str, Combo(lambda: config.profile_names("replicate"))] = "replicate",
        cache_results: Annotated[bool, Boolean(tooltip="off: run on every execution")] = True,
        image: Annotated[torch.Tensor, Socket("IMAGE", tooltip="sent as a data URI in image_field")] = None,
    ) -> NodeResult:
        model = (model or "").strip()
        if not _MODEL_RE.match(model):
            raise NodeError(
                f"model {model!r} is not a Replicate model id",
                input_name="model",
                hint="write owner/name (e.g. black-forest-labs/flux-schnell) or owner/name:<64-hex version>",
            )
        inputs = parse_input(input_json)
        if prompt.strip():
            inputs.setdefault("prompt", prompt)
        if seed > 0:
            inputs.setdefault("seed", seed)
        if image is not None:
            check_image(image, "ReplicateRun")
            png = await asyncio.to_thread(imageio.encode_png, image[0])
            inputs[image_field or "image"] = "data:image/png;base64," + base64.b64encode(png).decode()
        profile = config.get_profile(endpoint, "replicate")
        headers = {
            "Authorization": f"Bearer {profile.api_key()}",
            "Content-Type": "application/json",
            "Prefer": "wait=60",
        }
        name, _, version = model.partition(":")
        if version:
            url, body = f"{profile.base_url}/predictions", {"version": version, "input": inputs}
        else:
            url, body = f"{profile.base_url}/models/{name}/predictions", {"input": inputs}
        n_guess = int(inputs.get("num_outputs", 1) or 1)
        one = pricing.per_image(name)
        res = ledger.reserve(endpoint, name, None if one is None else one * n_guess, f"ReplicateRun ({name})")
        engine.progress(0, 100)
        pred: dict = {}
        try:
            async with http.session() as s:
                pred = await self._predict(s, url, body, profile, endpoint, headers, max_wait_s)
            urls = _urls(pred.get("output"))
            if not urls:
                raise NodeError(
                    f"prediction {pred.get('id')} succeeded but returned no files",
                    input_name="model",
                    hint="this model may not produce images",
                )
            blobs = await asyncio.gather(*(_download(u, i, profile) for i, u in enumerate(urls)))
            images, mask = await imageio.decode_all(blobs, f"ReplicateRun ({name})")
        except BaseException as exc:
            res.abandon(exc)
            raise
        usd = (one or 0.0) * int(images.shape[0])
        metrics = pred.get("metrics") or {}
        res.settle(usd, estimated=True, usage=metrics, request_id=pred.get("id"))
        rec = generation_record(
            provider=endpoint,
            model=model,
            usd=usd,
            estimated=True,
            usage=metrics,
            request_id=pred.get("id"),
            prediction_id=pred.get("id"),
            revised_prompts=[inputs["prompt"]] if "prompt" in inputs else None,
            images=int(images.shape[0]),
        )
        engine.progress(100, 100)
        return NodeResult(images, mask, pred.get("id", ""), dumps(rec), ui=ui_for(rec))

    async def _predict(
        self, s: Any, url: str, body: dict, profile: config.Profile, endpoint: str, headers: dict, max_wait_s: int
    ) -> dict:
        pred, _ = await http.request(
            s,
            "POST",
            url,
            profile=profile,
            provider=endpoint,
            headers=headers,
            body=body,
            what="create prediction",
            describe=_describe,
        )
        return await self._wait(s, pred, profile, endpoint, headers, max_wait_s)

    async def _wait(
        self, s: Any, pred: dict, profile: config.Profile, endpoint: str, headers: dict, max_wait_s: int
    ) -> dict:
        get_url = (pred.get("urls") or {}).get("get") or f"{profile.base_url}/predictions/{pred.get('id')}"
        cancel_url = (pred.get("urls") or {}).get("cancel") or f"{get_url}/cancel"
        headers = {k: v for k, v in headers.items() if k != "Prefer"}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        delay = 0.25
        try:
            while pred.get("status") not in TERMINAL:
                if loop.time() > deadline:
                    raise NodeError(
                        f"prediction {pred.get('id')} did not finish within {max_wait_s}s; it was cancelled",
                        input_name="max_wait_s",
                        hint="raise max_wait_s for slow models",
                    )
                pct = _progress_from_logs(pred.get("logs"))
                if pct is not None:
                    engine.progress(pct, 100)
                else:
                    engine.check_interrupted()
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 3.0)
                pred, _ = await http.request(
                    s, "GET", get_url, profile=profile, provider=endpoint, headers=headers, what="poll prediction"
                )
        except BaseException:
            if pred.get("status") not in TERMINAL:  # interrupted or timed out: stop the billing clock
                await asyncio.shield(self._cancel(cancel_url, headers))
            raise
        if pred.get("status") != "succeeded":
            err = config.redact(pred.get("error") or pred.get("status"))
            policy = "nsfw" in err.lower() or "safety" in err.lower() or "sensitive" in err.lower()
            raise NodeError(
                f"prediction {pred.get('id')} {pred.get('status')}: {err}",
                input_name="prompt" if policy else "input_json",
                hint="the model's safety checker refused it: rephrase the prompt"
                if policy
                else "check the inputs against the model's schema on replicate.com",
            )
        return pred

    @staticmethod
    async def _cancel(url: str, headers: dict) -> None:
        import aiohttp

        try:  # its own session: the run's may be closing while this is shielded from cancellation
            async with http.session() as s, s.post(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
                await r.read()
        except Exception:  # best effort; the prediction times out on Replicate's side anyway
            pass


NODES = [ReplicateRun]
