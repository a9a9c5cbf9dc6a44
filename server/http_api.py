"""HTTP handlers: thin wrappers that parse the request, call the prompt service and answer JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys

import aiohttp
from aiohttp import web

from kiln.engine import use_folders

from . import params, protocol
from .keys import CONFIG, FOLDERS, SERVICE
from .params import json_response, query_bool, query_float, query_int
from .security import error_response, redact_argv
from .service import LARGE_BODY, ApiError, PromptService

MAX_WAIT = 3600.0  # a longer wait is cut to this
MAX_SEQ = 2**53
MAX_ITEMS = 10**9


def wait_timeout(request: web.Request, default: float) -> float:
    """The ``timeout`` query parameter of a wait: finite seconds >= 0, cut to MAX_WAIT."""
    return min(query_float(request, "timeout", default, 0.0, 1e12), MAX_WAIT)


def service(request: web.Request) -> PromptService:
    return request.app[SERVICE]


async def read_json(request: web.Request, optional: bool = False):
    """The body as strict JSON whatever the Content-Type (ComfyUI's clients often send none).

    A large body is decoded in a worker thread, so other clients' requests are answered meanwhile.
    """
    raw = await read_body(request)
    if len(raw) < 256 and not raw.strip():
        if optional:
            return None
        raise ApiError(400, "bad_request", "Empty request body", "send a JSON object")
    limit = request.app[CONFIG].max_string_bytes
    try:
        if len(raw) > LARGE_BODY:
            return await params.off_loop(params.loads, raw, limit)
        return params.loads(raw, limit)
    except params.BadParam as exc:
        raise ApiError(400, exc.type_, exc.message, exc.details) from exc


async def read_body(request: web.Request) -> bytes | bytearray:
    """The request body; a large one is read into one buffer of its announced size, with no copy and no
    re-growing on the loop (``request.read()`` copies 50 MB twice, holding the loop meanwhile)."""
    limit = request.app[CONFIG].max_body_bytes
    n = request.content_length
    if n is not None and n > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=n)
    if n is None or n <= LARGE_BODY:
        return await request.read()
    buf = bytearray(n)
    with memoryview(buf) as view:
        pos = 0
        try:
            async for chunk in request.content.iter_any():
                end = pos + len(chunk)
                if end > n:
                    raise ApiError(400, "bad_request", "The body is longer than its Content-Length")
                view[pos:end] = chunk
                pos = end
        except aiohttp.ClientPayloadError as exc:
            raise ApiError(400, "bad_request", "The body could not be read", str(exc)[:200]) from None
    if pos != n:
        raise ApiError(400, "bad_request", "The body is shorter than its Content-Length")
    return buf


def api_error(exc: ApiError) -> web.Response:
    return json_response(exc.body, status=exc.status)


# -- prompts ----------------------------------------------------------------------------------------
async def post_prompt(request: web.Request) -> web.Response:
    """ComfyUI's POST /prompt; with ``?wait=true`` (Kiln) it answers when the prompt is done, with its result."""
    svc = service(request)
    wait = query_bool(request, "wait")
    timeout = wait_timeout(request, 300.0)  # checked before the prompt is accepted
    heavy = (request.content_length or 0) > LARGE_BODY
    warnings = query_bool(request, "warnings")  # Kiln: also list what was accepted but flagged
    try:
        data = await read_json(request)
        body = await svc.submit(data, heavy=heavy, warnings=warnings)
    except ApiError as exc:
        if heavy:  # a huge graph can fail on every node: encode that answer off the loop too
            text = await params.off_loop(params.strict_text, exc.body)
            return web.Response(text=text, status=exc.status, content_type="application/json")
        return api_error(exc)
    if wait:
        await svc.wait(body["prompt_id"], timeout)
        st = svc.status(body["prompt_id"])
        body = {**body, **{k: v for k, v in st.items() if k in ("status", "outputs", "error")}}
    return json_response(body)


async def get_prompt(request: web.Request) -> web.Response:
    return json_response({"exec_info": {"queue_remaining": service(request).queue_remaining}})


async def prompt_status(request: web.Request) -> web.Response:
    svc = service(request)
    pid = request.match_info["prompt_id"]
    if query_bool(request, "wait"):
        await svc.wait(pid, wait_timeout(request, 300.0))
    body = svc.status(pid)
    return json_response(body, status=404 if body["status"] == "unknown" else 200)


async def prompt_events(request: web.Request) -> web.Response:
    svc = service(request)
    pid = request.match_info["prompt_id"]
    since = query_int(request, "since", 0, -MAX_SEQ, MAX_SEQ) or 0
    timeout = wait_timeout(request, 30.0)
    if query_bool(request, "wait") and svc.known(pid):
        await svc.wait_events(pid, since, timeout)  # long-poll: answer as soon as there is something new
    events = svc.events(pid, since)
    if events is None:
        return error_response(404, "prompt_not_found", f"No prompt with id {pid!r}")
    st = svc.status(pid)
    return json_response(
        {
            "prompt_id": pid,
            "status": st["status"],
            "events": events,
            "last_seq": events[-1]["seq"] if events else since,
            "done": st["status"] not in ("pending", "running"),
        }
    )


# -- queue / history --------------------------------------------------------------------------------
async def get_queue(request: web.Request) -> web.Response:
    return web.Response(text=service(request).queue_json(), content_type="application/json")


def _id_list(data: dict, key: str) -> list[str]:
    ids = data.get(key)
    if not isinstance(ids, list):
        raise ApiError(400, "bad_request", f"'{key}' must be a list of prompt ids")
    return [str(i) for i in ids]


def _not_found(missing: list[str]) -> web.Response:
    return error_response(
        404, "prompt_not_found", "Some prompt ids were not found", ", ".join(missing), prompt_ids=missing
    )


async def _clear_or_delete(request: web.Request, clear, delete) -> web.Response:
    """ComfyUI's POST /queue and /history body: ``{"clear": true}`` and/or ``{"delete": [ids]}``."""
    try:
        data = await read_json(request, optional=True) or {}
        if not isinstance(data, dict):
            raise ApiError(400, "bad_request", "Expected a JSON object")
        if data.get("clear"):
            clear()
        if "delete" in data:
            missing = delete(_id_list(data, "delete"))
            if missing:
                return _not_found(missing)
    except ApiError as exc:
        return api_error(exc)
    return web.Response(status=200)


async def post_queue(request: web.Request) -> web.Response:
    svc = service(request)
    return await _clear_or_delete(request, svc.clear_pending, svc.delete_pending)


async def get_history(request: web.Request) -> web.Response:
    store = service(request).store
    max_items = query_int(request, "max_items", None, -MAX_ITEMS, MAX_ITEMS)
    offset = query_int(request, "offset", None, -MAX_ITEMS, MAX_ITEMS)
    rows = store.history_texts(max_items, offset)
    return _history_response(rows)


async def get_history_item(request: web.Request) -> web.Response:
    pid = request.match_info["prompt_id"]
    text = service(request).store.history_text(pid)
    return _history_response([(pid, text)] if text is not None else [])


def _history_response(rows: list[tuple[str, str]]) -> web.Response:
    """``{prompt_id: entry}`` from the stored entries' text as it is (strict JSON when it was written)."""
    body = "{" + ", ".join(f"{json.dumps(pid)}: {text}" for pid, text in rows) + "}"
    return web.Response(text=body, content_type="application/json")


async def post_history(request: web.Request) -> web.Response:
    svc = service(request)
    return await _clear_or_delete(request, svc.store.clear_history, svc.delete_history)


async def post_interrupt(request: web.Request) -> web.Response:
    svc = service(request)
    try:
        data = await read_json(request, optional=True)
    except ApiError:
        data = None  # ComfyUI tolerates an invalid body: a global interrupt
    pid = data.get("prompt_id") if isinstance(data, dict) else None
    try:
        svc.interrupt(str(pid) if pid is not None else None)
    except ApiError as exc:
        return api_error(exc)
    return web.Response(status=200)


async def post_free(request: web.Request) -> web.Response:
    try:
        data = await read_json(request, optional=True) or {}
    except ApiError as exc:
        return api_error(exc)
    if isinstance(data, dict):
        service(request).request_free(bool(data.get("unload_models")), bool(data.get("free_memory")))
    return web.Response(status=200)


# -- catalogue and system ---------------------------------------------------------------------------
async def object_info(request: web.Request) -> web.Response:
    reg = service(request).registry
    with use_folders(request.app[FOLDERS]):  # model choice lists come from this server's folders
        return json_response(reg.object_info())


async def object_info_one(request: web.Request) -> web.Response:
    reg = service(request).registry
    with use_folders(request.app[FOLDERS]):
        return json_response(reg.object_info([request.match_info["node_class"]]))


async def features(request: web.Request) -> web.Response:
    return json_response(protocol.server_features(request.app[CONFIG].max_upload_bytes))


def _meminfo() -> tuple[int, int]:
    try:
        vals = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                vals[k] = int(v.split()[0]) * 1024
        return vals.get("MemTotal", 0), vals.get("MemAvailable", 0)
    except (OSError, ValueError):
        return 0, 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


async def system_stats(request: web.Request) -> web.Response:
    total, free = _meminfo()
    return json_response(
        {
            "system": {
                "os": os.name if sys.platform != "linux" else "posix",
                "ram_total": total,
                "ram_free": free,
                "comfyui_version": "0.8.0",
                "kiln_version": _version("kiln") or "0.1.0",
                "python_version": sys.version,
                "pytorch_version": _version("torch"),
                "embedded_python": False,
                "argv": redact_argv(sys.argv),
                "platform": platform.platform(),
            },
            "devices": [
                {
                    "name": "cpu",
                    "type": "cpu",
                    "index": None,
                    "vram_total": 0,
                    "vram_free": 0,
                    "torch_vram_total": 0,
                    "torch_vram_free": 0,
                }
            ],
        }
    )


async def workers(request: web.Request) -> web.Response:
    """Kiln's worker list: name, state (starting, idle, busy, dead), process id, the prompt it runs, how many
    it ran, and the model files it holds (what dispatch prefers it for)."""
    return json_response({"workers": service(request).workers_info()})


def _folders(request: web.Request):
    return request.app[FOLDERS]


async def embeddings(request: web.Request) -> web.Response:
    names = _folders(request).list_models("embeddings")
    return json_response([os.path.splitext(n)[0] for n in names])


async def models(request: web.Request) -> web.Response:
    return json_response(sorted(_folders(request).models))


async def models_in(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    f = _folders(request)
    if folder not in f.models:
        return error_response(404, "not_found", f"Unknown model folder {folder!r}")
    return json_response(f.list_models(folder))
