"""HTTP handlers: thin wrappers that parse the request, call the prompt service and answer JSON."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from aiohttp import web

from kiln.engine import GraphFormatError, use_folders
from kiln.engine.graph import decode_json

from . import protocol
from .keys import CONFIG, FOLDERS, SERVICE
from .security import error_response
from .service import ApiError, PromptService

MAX_WAIT = 3600.0


def service(request: web.Request) -> PromptService:
    return request.app[SERVICE]


async def read_json(request: web.Request, optional: bool = False):
    """The body as JSON whatever the Content-Type (ComfyUI's clients often send none)."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return None
        raise ApiError(400, "bad_request", "Empty request body", "send a JSON object")
    try:
        return decode_json(raw)
    except GraphFormatError as exc:
        raise ApiError(400, "invalid_json", exc.message, exc.details) from exc


def api_error(exc: ApiError) -> web.Response:
    return web.json_response(exc.body, status=exc.status)


# -- prompts ----------------------------------------------------------------------------------------
async def post_prompt(request: web.Request) -> web.Response:
    """ComfyUI's POST /prompt; with ``?wait=true`` (Kiln) it answers when the prompt is done, with its result."""
    svc = service(request)
    try:
        data = await read_json(request)
        body = await svc.submit(data)
    except ApiError as exc:
        return api_error(exc)
    if request.query.get("wait", "").lower() in ("1", "true", "yes"):
        try:
            timeout = min(float(request.query.get("timeout", "300")), MAX_WAIT)
        except ValueError:
            timeout = 300.0
        await svc.wait(body["prompt_id"], timeout)
        st = svc.status(body["prompt_id"])
        body = {**body, **{k: v for k, v in st.items() if k in ("status", "outputs", "error")}}
    return web.json_response(body)


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": service(request).queue_remaining}})


async def prompt_status(request: web.Request) -> web.Response:
    svc = service(request)
    pid = request.match_info["prompt_id"]
    if request.query.get("wait", "").lower() in ("1", "true", "yes"):
        try:
            timeout = min(float(request.query.get("timeout", "300")), MAX_WAIT)
        except ValueError:
            return error_response(400, "bad_request", "timeout must be a number of seconds")
        await svc.wait(pid, timeout)
    body = svc.status(pid)
    return web.json_response(body, status=404 if body["status"] == "unknown" else 200)


async def prompt_events(request: web.Request) -> web.Response:
    svc = service(request)
    pid = request.match_info["prompt_id"]
    try:
        since = int(request.query.get("since", "0"))
        timeout = min(float(request.query.get("timeout", "30")), MAX_WAIT)
    except ValueError:
        return error_response(400, "bad_request", "since must be an integer sequence number, timeout seconds")
    if request.query.get("wait", "").lower() in ("1", "true", "yes") and svc.known(pid):
        await svc.wait_events(pid, since, timeout)  # long-poll: answer as soon as there is something new
    events = svc.events(pid, since)
    if events is None:
        return error_response(404, "prompt_not_found", f"No prompt with id {pid!r}")
    st = svc.status(pid)
    return web.json_response(
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
    return web.json_response(service(request).queue())


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
    try:
        max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        offset = int(request.query["offset"]) if "offset" in request.query else None
    except ValueError:
        return error_response(400, "bad_request", "max_items and offset must be integers")
    rows = store.history(max_items, offset)
    return web.json_response({r.prompt_id: r.history for r in rows if r.history is not None})


async def get_history_item(request: web.Request) -> web.Response:
    pid = request.match_info["prompt_id"]
    row = service(request).store.get(pid)
    if row is None or row.history is None:
        return web.json_response({})
    return web.json_response({pid: row.history})


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
        return web.json_response(reg.object_info())


async def object_info_one(request: web.Request) -> web.Response:
    reg = service(request).registry
    with use_folders(request.app[FOLDERS]):
        return web.json_response(reg.object_info([request.match_info["node_class"]]))


async def features(request: web.Request) -> web.Response:
    return web.json_response(protocol.server_features(request.app[CONFIG].max_upload_bytes))


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
    return web.json_response(
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
                "argv": sys.argv,
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


def _folders(request: web.Request):
    return request.app[FOLDERS]


async def embeddings(request: web.Request) -> web.Response:
    names = _folders(request).list_models("embeddings")
    return web.json_response([os.path.splitext(n)[0] for n in names])


async def models(request: web.Request) -> web.Response:
    return web.json_response(sorted(_folders(request).models))


async def models_in(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    f = _folders(request)
    if folder not in f.models:
        return error_response(404, "not_found", f"Unknown model folder {folder!r}")
    return web.json_response(f.list_models(folder))
