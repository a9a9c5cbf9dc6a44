"""A small provider server for tests and benchmarks (aiohttp, 127.0.0.1 only).

It implements OpenAI's ``/v1/images/generations``, ``/v1/images/edits``, ``/v1/images/variations`` and
``/v1/responses`` (streamed with partial images), Replicate's predictions API under ``/replicate/v1``
and the Gemini API's Imagen ``:predict`` under ``/google/v1beta``. It returns real PNG/JPEG/WebP bytes
rendered from the request, records every request, and plays back injected faults: HTTP statuses with
headers, stalls longer than the client's timeout, content-policy refusals and malformed bodies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

from tests.conftest import SAFETY_S


@dataclass
class Fault:
    """One injected failure, consumed by the next request whose path contains ``path``."""

    kind: str  # status | stall | policy | not_json | no_data | bad_b64 | stream_fail | stream_cut | text_only
    status: int = 500
    headers: dict = field(default_factory=dict)
    message: str = "injected failure"
    seconds: float = 5.0
    path: str = ""


def render(size: str, prompt: str, fmt: str = "png", transparent: bool = False, seed: int = 0) -> bytes:
    w, h = (1024, 1024) if size in ("auto", "", None) else (int(x) for x in size.split("x"))
    d = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    base = np.array([d[0], d[1], d[2]], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), dtype=np.float32)
    img[..., 0] = (base[0] + 255 * xx / max(w - 1, 1)) % 256
    img[..., 1] = (base[1] + 255 * yy / max(h - 1, 1)) % 256
    img[..., 2] = base[2]
    arr = img.astype(np.uint8)
    pil = Image.fromarray(arr)
    if transparent:
        alpha = np.full((h, w), 255, dtype=np.uint8)
        alpha[: h // 4, :] = 0
        pil = pil.convert("RGBA")
        pil.putalpha(Image.fromarray(alpha))
    buf = io.BytesIO()
    if fmt == "jpeg":
        pil.convert("RGB").save(buf, format="JPEG", quality=90)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=90)
    else:
        pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class FakeProviders:
    def __init__(self, api_key: str = "sk-test-fake-key-000111", latency: float = 0.0):
        self.api_key = api_key
        self.latency = latency
        self.faults: deque[Fault] = deque()
        self.requests: list[dict] = []
        self.disconnects = 0
        self.files: dict[str, bytes] = {}
        self.responses: dict[str, dict] = {}
        self.url_mode = False  # answer with URLs instead of b64_json (dall-e default)
        self.predictions: dict[str, dict] = {}
        self.cancelled: list[str] = []
        self.replicate_steps = 2  # polls before a prediction finishes
        self._render_cache: dict[tuple, bytes] = {}
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> FakeProviders:
        ready = threading.Event()

        def main() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/v1/images/generations", self.generations)
            app.router.add_post("/v1/images/edits", self.edits)
            app.router.add_post("/v1/images/variations", self.variations)
            app.router.add_post("/v1/responses", self.responses_api)
            app.router.add_get("/files/{name}", self.file)
            app.router.add_post("/replicate/v1/models/{owner}/{name}/predictions", self.replicate_create)
            app.router.add_post("/replicate/v1/predictions", self.replicate_create)
            app.router.add_get("/replicate/v1/predictions/{id}", self.replicate_get)
            app.router.add_post("/replicate/v1/predictions/{id}/cancel", self.replicate_cancel)
            app.router.add_post("/google/v1beta/models/{action}", self.google_predict)
            self.runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=main, daemon=True, name="fake-openai")
        self.thread.start()
        while not ready.wait(0.5):  # readiness, bounded by the thread being alive
            assert self.thread.is_alive(), "the fake provider thread died before it was ready"
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(SAFETY_S)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self) -> None:
        self.faults.clear()
        self.requests.clear()
        self.disconnects = 0
        self.url_mode = False
        self.latency = 0.0
        self.predictions.clear()
        self.cancelled.clear()
        self.replicate_steps = 2

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    # -- helpers ------------------------------------------------------------------------------------
    def _image(self, size: str, prompt: str, fmt: str, transparent: bool, seed: int) -> bytes:
        key = (size, prompt, fmt, transparent, seed)
        with self._lock:
            b = self._render_cache.get(key)
        if b is None:
            b = render(size, prompt, fmt, transparent, seed)
            with self._lock:
                self._render_cache[key] = b
        return b

    def _take_fault(self, path: str) -> Fault | None:
        for f in list(self.faults):
            if f.path in path:
                self.faults.remove(f)
                return f
        return None

    async def _gate(self, request: web.Request, record: dict) -> web.StreamResponse | None:
        """Auth, latency and injected faults; a response to send instead of the real one, or None."""
        rid = "req_" + uuid.uuid4().hex[:16]
        record["request_id"] = rid
        record["t"] = time.monotonic()
        record["headers"] = dict(request.headers)
        self.requests.append(record)
        if self.latency:
            await asyncio.sleep(self.latency)
        auth = request.headers.get("Authorization", "")
        if request.path.startswith("/google/"):
            if request.headers.get("x-goog-api-key") != self.api_key:
                body = {
                    "error": {
                        "code": 400,
                        "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT",
                    }
                }
                return web.json_response(body, status=400, headers={"x-request-id": rid})
        elif auth != f"Bearer {self.api_key}":
            given = auth.removeprefix("Bearer ")
            return self._error(
                401,
                f"Incorrect API key provided: {given}. You can find your API key at the dashboard.",
                "invalid_api_key",
                None,
                rid,
            )
        fault = self._take_fault(request.path)
        record["fault"] = fault.kind if fault else None
        if fault is None:
            return None
        if fault.kind == "status":
            return self._error(fault.status, fault.message, "injected", None, rid, fault.headers)
        if fault.kind == "policy":
            return self._error(
                400, "Your request was rejected as a result of our safety system.", "moderation_blocked", None, rid
            )
        if fault.kind == "bad_size":
            return self._error(
                400, "Invalid value: '999x999'. Supported values are: '1024x1024'.", "invalid_value", "size", rid
            )
        if fault.kind == "stall":
            await self._stall(request, fault.seconds)
            return web.json_response({"created": 0, "data": []}, headers={"x-request-id": rid})
        if fault.kind == "not_json":
            return web.Response(
                text="<html>502 upstream hiccup</html>",
                status=200,
                content_type="application/json",
                headers={"x-request-id": rid},
            )
        if fault.kind == "no_data":
            return web.json_response({"created": int(time.time()), "data": []}, headers={"x-request-id": rid})
        if fault.kind == "bad_b64":
            return web.json_response(
                {"created": int(time.time()), "data": [{"b64_json": "!!!not base64!!!"}]}, headers={"x-request-id": rid}
            )
        if fault.kind == "not_image":
            return web.json_response(
                {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(b"GIF89a garbage").decode()}]},
                headers={"x-request-id": rid},
            )
        record["pending_fault"] = fault  # stream faults are played by the responses handler
        return None

    async def _stall(self, request: web.Request, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if request.transport is None or request.transport.is_closing():
                self.disconnects += 1
                return
            await asyncio.sleep(0.02)

    def _error(
        self, status: int, message: str, code: str, param: str | None, rid: str, headers: dict | None = None
    ) -> web.Response:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
        return web.json_response(body, status=status, headers={"x-request-id": rid, **(headers or {})})

    def _images_response(self, request: web.Request, p: dict, rid: str, prompt: str) -> web.Response:
        model = p.get("model") or "dall-e-2"
        n = int(p.get("n") or 1)
        size = p.get("size") or ("1024x1024" if model != "gpt-image-1" else "auto")
        fmt = p.get("output_format") or "png"
        transparent = p.get("background") == "transparent"
        data = []
        for i in range(n):
            blob = self._image(size, prompt, fmt, transparent, i)
            item: dict[str, Any] = {}
            if self.url_mode and model != "gpt-image-1":
                name = uuid.uuid4().hex + ".png"
                self.files[name] = blob
                item["url"] = f"http://127.0.0.1:{self.port}/files/{name}"
            else:
                item["b64_json"] = base64.b64encode(blob).decode()
            if model == "dall-e-3":
                item["revised_prompt"] = f"A detailed rendering of {prompt}"
            data.append(item)
        body: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model == "gpt-image-1":
            body["usage"] = {
                "input_tokens": 50,
                "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
                "output_tokens": 4160 * n,
                "total_tokens": 50 + 4160 * n,
            }
        return web.json_response(body, headers={"x-request-id": rid})

    # -- handlers -----------------------------------------------------------------------------------
    async def generations(self, request: web.Request) -> web.StreamResponse:
        p = await request.json()
        rec = {"path": request.path, "json": p}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        if p.get("stream") is True:
            return await self._images_stream(request, p, rec["request_id"], p.get("prompt", ""), "image_generation")
        return self._images_response(request, p, rec["request_id"], p.get("prompt", ""))

    async def _images_stream(
        self, request: web.Request, p: dict, rid: str, prompt: str, kind: str
    ) -> web.StreamResponse:
        """Images API streaming: partial images, then one completed event per image."""
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": rid})
        await stream.prepare(request)
        fmt = p.get("output_format") or "png"
        size = p.get("size") or "auto"
        common = {
            "background": p.get("background") or "auto",
            "output_format": fmt,
            "quality": p.get("quality") or "auto",
            "size": size,
            "created_at": int(time.time()),
        }

        async def send(event: dict) -> None:
            await stream.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())

        for i in range(int(p.get("n") or 1)):
            for k in range(int(p.get("partial_images") or 0)):
                await asyncio.sleep(0.01)
                blob = self._image("64x64", f"{prompt}#partial{k}", fmt, False, i)
                await send(
                    {
                        "type": f"{kind}.partial_image",
                        "partial_image_index": k,
                        "b64_json": base64.b64encode(blob).decode(),
                        **common,
                    }
                )
            final = self._image(size, prompt, fmt, p.get("background") == "transparent", i)
            await send(
                {
                    "type": f"{kind}.completed",
                    "b64_json": base64.b64encode(final).decode(),
                    "usage": {
                        "input_tokens": 50,
                        "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
                        "output_tokens": 4160,
                        "total_tokens": 4210,
                    },
                    **common,
                }
            )
        await stream.write_eof()
        return stream

    async def _form(self, request: web.Request) -> tuple[dict, dict]:
        form = await request.post()
        fields: dict[str, Any] = {}
        files: dict[str, list] = {}
        for k, v in form.items():
            if hasattr(v, "file"):
                files.setdefault(k.removesuffix("[]"), []).append(
                    {"filename": v.filename, "content_type": v.content_type, "data": v.file.read()}
                )
            else:
                fields[k] = v
        return fields, files

    async def edits(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self._form(request)
        rec = {"path": request.path, "json": fields, "files": files}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        if "image" not in files:
            return self._error(400, "image is required", "missing", "image", rec["request_id"])
        if fields.get("stream") == "true":
            fields = {**fields, "n": int(fields.get("n", 1)), "partial_images": int(fields.get("partial_images", 0))}
            return await self._images_stream(request, fields, rec["request_id"], fields.get("prompt", ""), "image_edit")
        return self._images_response(request, fields, rec["request_id"], fields.get("prompt", ""))

    async def variations(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self._form(request)
        rec = {"path": request.path, "json": fields, "files": files}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        return self._images_response(request, fields, rec["request_id"], "variation")

    async def file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name.startswith("redirect-"):
            raise web.HTTPFound(request.query.get("to", "/files/" + name.removeprefix("redirect-")))
        if name not in self.files:
            return web.Response(status=404)
        if name.startswith("slow"):
            await self._stall(request, SAFETY_S)  # until the client gives up
        v = self.files[name]
        body, ctype = v if isinstance(v, tuple) else (v, "image/png")
        return web.Response(body=body, content_type=ctype)

    async def responses_api(self, request: web.Request) -> web.StreamResponse:
        p = await request.json()
        rec = {"path": request.path, "json": p}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        fault: Fault | None = rec.pop("pending_fault", None)
        rid = rec["request_id"]
        resp_id = "resp_" + uuid.uuid4().hex[:20]
        tool = (p.get("tools") or [{}])[0]
        fmt = tool.get("output_format", "png")
        prompt = "".join(
            c.get("text", "") for m in p.get("input", []) for c in m.get("content", []) if c.get("type") == "input_text"
        )
        prev = p.get("previous_response_id")
        if prev and prev not in self.responses:
            return self._error(
                400,
                f"Previous response with id '{prev}' not found.",
                "previous_response_not_found",
                "previous_response_id",
                rid,
            )
        history = (self.responses.get(prev, {}).get("prompt", "") + " / ") if prev else ""
        full_prompt = history + prompt
        self.responses[resp_id] = {"prompt": full_prompt}
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": rid})
        await stream.prepare(request)
        seq = iter(range(10_000))
        base_resp = {
            "id": resp_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": p.get("model"),
            "status": "in_progress",
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": p.get("tools", []),
            "previous_response_id": prev,
        }

        async def send(event: dict) -> None:
            event["sequence_number"] = next(seq)
            await stream.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())

        await send({"type": "response.created", "response": base_resp})
        await send({"type": "response.in_progress", "response": base_resp})
        item_id = "ig_" + uuid.uuid4().hex[:16]
        if fault is not None and fault.kind == "text_only":
            msg = {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "I cannot draw that.", "annotations": []}],
            }
            await send({"type": "response.output_item.done", "output_index": 0, "item": msg})
            done = dict(base_resp, status="completed", output=[msg], usage=_text_usage())
            await send({"type": "response.completed", "response": done})
            await stream.write_eof()
            return stream
        await send(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"id": item_id, "type": "image_generation_call", "status": "in_progress"},
            }
        )
        await send({"type": "response.image_generation_call.in_progress", "output_index": 0, "item_id": item_id})
        await send({"type": "response.image_generation_call.generating", "output_index": 0, "item_id": item_id})
        size = tool.get("size", "auto")
        size = "1024x1024" if size == "auto" else size
        partials = int(tool.get("partial_images") or 0)
        for i in range(partials):
            await asyncio.sleep(0.01)
            blob = self._image("64x64", f"{full_prompt}#partial{i}", fmt, False, i)
            await send(
                {
                    "type": "response.image_generation_call.partial_image",
                    "output_index": 0,
                    "item_id": item_id,
                    "partial_image_index": i,
                    "partial_image_b64": base64.b64encode(blob).decode(),
                    "output_format": fmt,
                }
            )
        if fault is not None and fault.kind == "stream_cut":
            await stream.write_eof()
            return stream
        if fault is not None and fault.kind == "stream_fail":
            failed = dict(
                base_resp,
                status="failed",
                error={"code": "moderation_blocked", "message": "Your request was rejected by the safety system."},
            )
            await send({"type": "response.failed", "response": failed})
            await stream.write_eof()
            return stream
        final = self._image(size, full_prompt, fmt, tool.get("background") == "transparent", 0)
        item = {
            "id": item_id,
            "type": "image_generation_call",
            "status": "completed",
            "result": base64.b64encode(final).decode(),
            "revised_prompt": f"Revised: {full_prompt}",
            "output_format": fmt,
            "size": size,
        }
        await send({"type": "response.output_item.done", "output_index": 0, "item": item})
        done = dict(base_resp, status="completed", output=[item], usage=_text_usage())
        await send({"type": "response.completed", "response": done})
        await stream.write_eof()
        return stream

    # -- Replicate ----------------------------------------------------------------------------------
    def _prediction_json(self, pid: str) -> dict:
        p = self.predictions[pid]
        base = f"http://127.0.0.1:{self.port}/replicate/v1/predictions/{pid}"
        out = {k: p[k] for k in ("id", "model", "version", "input", "status", "logs", "output", "error", "metrics")}
        out["urls"] = {"get": base, "cancel": base + "/cancel"}
        return out

    def _advance(self, pid: str) -> None:
        p = self.predictions[pid]
        if p["status"] in ("succeeded", "failed", "canceled") or p["input"].get("prompt", "").startswith("hang"):
            if p["status"] == "starting":
                p["status"] = "processing"
            return
        if p["steps"] > 0:
            p["steps"] -= 1
            p["status"] = "processing"
            p["logs"] += f"{100 * (p['total'] - p['steps']) // (p['total'] + 1)}%|###\n"
            return
        prompt = p["input"].get("prompt", "")
        if "nsfw" in prompt:
            p.update(status="failed", error="NSFW content detected. Try running it again, or try a different prompt.")
            return
        urls = []
        for i in range(int(p["input"].get("num_outputs", 1))):
            name = f"rep_{pid}_{i}.png"
            self.files[name] = self._image("96x64", f"{prompt}|{p['input'].get('seed')}", "png", False, i)
            urls.append(f"http://127.0.0.1:{self.port}/files/{name}")
        p.update(
            status="succeeded",
            output=urls if len(urls) > 1 or p["input"].get("as_list") else urls[0],
            metrics={"predict_time": 0.42},
        )

    async def replicate_create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rec = {"path": request.path, "json": body}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        inp = body.get("input") or {}
        if not inp.get("prompt") and not inp.get("image"):
            return web.json_response(
                {"detail": "- input: prompt is required", "status": 422, "title": "Input validation failed"},
                status=422,
                headers={"x-request-id": rec["request_id"]},
            )
        pid = uuid.uuid4().hex[:20]
        model = "/".join(request.path.split("/")[4:6]) if "/models/" in request.path else None
        self.predictions[pid] = {
            "id": pid,
            "model": model,
            "version": body.get("version"),
            "input": inp,
            "status": "starting",
            "logs": "",
            "output": None,
            "error": None,
            "metrics": {},
            "steps": self.replicate_steps,
            "total": self.replicate_steps,
        }
        if "wait" in request.headers.get("Prefer", "") and self.replicate_steps == 0:
            self._advance(pid)
        return web.json_response(self._prediction_json(pid), status=201, headers={"x-request-id": rec["request_id"]})

    async def replicate_get(self, request: web.Request) -> web.StreamResponse:
        rec = {"path": request.path, "json": None}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        pid = request.match_info["id"]
        if pid not in self.predictions:
            return web.json_response({"detail": "Not found."}, status=404)
        self._advance(pid)
        return web.json_response(self._prediction_json(pid))

    async def replicate_cancel(self, request: web.Request) -> web.StreamResponse:
        pid = request.match_info["id"]
        self.cancelled.append(pid)
        if pid in self.predictions:
            self.predictions[pid]["status"] = "canceled"
            return web.json_response(self._prediction_json(pid))
        return web.json_response({"detail": "Not found."}, status=404)

    # -- Google Imagen ------------------------------------------------------------------------------
    async def google_predict(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rec = {"path": request.path, "json": body}
        early = await self._gate(request, rec)
        if early is not None:
            return early
        model, _, action = request.match_info["action"].partition(":")
        if action != "predict":
            return web.json_response({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}, 404)
        params = body.get("parameters") or {}
        if int(params.get("sampleCount", 1)) > 4:
            return web.json_response(
                {
                    "error": {
                        "code": 400,
                        "message": "sampleCount must be between 1 and 4.",
                        "status": "INVALID_ARGUMENT",
                    }
                },
                status=400,
            )
        prompt = body["instances"][0]["prompt"]
        aw, ah = (int(x) for x in params.get("aspectRatio", "1:1").split(":"))
        size = f"{32 * aw}x{32 * ah}"
        preds = []
        for i in range(int(params.get("sampleCount", 1))):
            if "blocked" in prompt or ("half" in prompt and i % 2):
                preds.append(
                    {"raiFilteredReason": "The prompt could not be submitted: it may violate the usage guidelines."}
                )
            else:
                preds.append(
                    {
                        "bytesBase64Encoded": base64.b64encode(self._image(size, prompt, "png", False, i)).decode(),
                        "mimeType": "image/png",
                    }
                )
        return web.json_response({"predictions": preds}, headers={"x-request-id": rec["request_id"]})


def _text_usage() -> dict:
    return {
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 200,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 1200,
    }


def main() -> None:
    """Serve on 127.0.0.1 in this process (benchmarks run it apart from Kiln, as a real provider is):
    ``python -m tests.providers.fake_providers --latency 0.2 --key sk-...``; prints the base URL."""
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--key", default="sk-test-fake-key-000111")
    args = ap.parse_args()
    srv = FakeProviders(api_key=args.key, latency=args.latency).start()
    print(srv.base_url, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
