"""The editor's user files: ``/users``, ``/settings`` and ``/userdata``, in the shapes of ComfyUI's routes.

Kiln has one user: everything lives in ``DATA_DIR/userdata`` (settings in ``comfy.settings.json`` there,
saved workflows under ``workflows/``, ...). Every name from a request is confined to that folder the way
``/view`` confines names (``kiln.engine.safe_join``): ``..``, absolute paths, NUL bytes, backslashes and
symlinks leading out are refused with a 400, so nothing is read or written outside. A stored file is at
most ``max_userdata_bytes``; writes go to a temporary file in the same folder and are renamed into
place, so a file is never half written.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from kiln.engine import UnsafePath, safe_join

from . import params
from .keys import CONFIG, SETTINGS_LOCK
from .params import BadParam, json_response, query_bool, query_str
from .security import error_response

SETTINGS_FILE = "comfy.settings.json"
USER = "default"


def _root(request: web.Request) -> Path:
    return request.app[CONFIG].userdata_dir


def confined(root: Path, rel: str) -> Path:
    """``root / rel`` or a 400 (``BadParam``) when the name would leave ``root`` or names ``root`` itself."""
    try:
        params.check_text(rel, "a file name")
        path = safe_join(root, rel)
    except (UnsafePath, BadParam) as exc:
        raise BadParam("Path not allowed", str(getattr(exc, "message", exc)), "unsafe_path") from None
    if path == root.resolve():
        raise BadParam("Path not allowed", "a file name is required", "unsafe_path")
    return path


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root.resolve()).as_posix()


async def _body(request: web.Request) -> bytes:
    """The raw body, refused past the size cap before it is read whole."""
    limit = request.app[CONFIG].max_userdata_bytes
    n = request.content_length
    if n is not None and n > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=n)
    buf = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(buf))
    return bytes(buf)


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kiln-write-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _info(root: Path, path: Path) -> dict:
    st = path.stat()
    return {"path": _rel(root, path), "size": st.st_size, "modified": st.st_mtime}


# -- users and settings -----------------------------------------------------------------------------
async def get_users(request: web.Request) -> web.Response:
    """A single-user server: the editor keeps its settings on the server and needs no login."""
    return json_response({"storage": "server", "migrated": True})


def _load_settings(root: Path) -> dict:
    path = root / SETTINGS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged settings file reads as no settings; the next save replaces it
    return data if isinstance(data, dict) else {}


def _save_settings(root: Path, settings: dict) -> None:
    _write(root / SETTINGS_FILE, params.dumps(settings, compact=False).encode())


async def _read_json_body(request: web.Request) -> Any:
    raw = await _body(request)
    if not raw.strip():
        raise BadParam("Empty request body", "send JSON")
    return params.loads(raw, request.app[CONFIG].max_string_bytes)


async def get_settings(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(_load_settings, _root(request)))


async def post_settings(request: web.Request) -> web.Response:
    data = await _read_json_body(request)
    if not isinstance(data, dict):
        raise BadParam("Expected a JSON object of settings")
    await _update_settings(request, lambda settings: settings.update(data))
    return web.Response(status=200)


async def get_setting(request: web.Request) -> web.Response:
    settings = await asyncio.to_thread(_load_settings, _root(request))
    return json_response(settings.get(request.match_info["setting_id"]))


async def post_setting(request: web.Request) -> web.Response:
    value = await _read_json_body(request)
    key = request.match_info["setting_id"]
    await _update_settings(request, lambda settings: settings.__setitem__(key, value))
    return web.Response(status=200)


async def _update_settings(request: web.Request, change) -> None:
    """Read, change and write the settings file, one update at a time (no lost update between two)."""
    root = _root(request)

    def update() -> None:
        settings = _load_settings(root)
        change(settings)
        _save_settings(root, settings)

    async with request.app[SETTINGS_LOCK]:
        await asyncio.to_thread(update)


# -- userdata ---------------------------------------------------------------------------------------
def _listing(root: Path, folder: Path, recurse: bool, full_info: bool, split: bool) -> list:
    out: list = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".kiln-write-") or p.is_symlink() or not p.is_file():
                continue
            rel = p.relative_to(folder).as_posix()
            if full_info:
                out.append({**_info(root, p), "path": rel})
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        if not recurse:
            break
    return out


async def list_userdata(request: web.Request) -> web.Response:
    """``?dir=workflows&recurse=true&split=false&full_info=false``: the files under one folder."""
    rel = query_str(request, "dir")
    if not rel:
        raise BadParam("dir is required", "for example ?dir=workflows")
    root = _root(request)
    folder = confined(root, rel)
    if not folder.is_dir():
        return error_response(404, "not_found", "No such folder", rel)
    recurse, split = query_bool(request, "recurse"), query_bool(request, "split")
    full = query_bool(request, "full_info")
    return json_response(await asyncio.to_thread(_listing, root, folder, recurse, full, split))


def _file(request: web.Request, key: str = "file") -> Path:
    return confined(_root(request), request.match_info[key])


async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _file(request)
    if not path.is_file():
        return error_response(404, "not_found", "No such file", request.match_info["file"])
    return web.FileResponse(
        path, headers={"Content-Type": "application/octet-stream", "X-Content-Type-Options": "nosniff"}
    )


def _overwrite(request: web.Request) -> bool:
    raw = query_str(request, "overwrite")
    return True if raw == "" else query_bool(request, "overwrite")


def _answer(request: web.Request, root: Path, path: Path) -> web.Response:
    if query_bool(request, "full_info"):
        return json_response(_info(root, path))
    return json_response(_rel(root, path))


async def post_userdata(request: web.Request) -> web.Response:
    """Store the body as a file; ``overwrite=false`` refuses (409) an existing one."""
    root = _root(request)
    path = _file(request)
    overwrite = _overwrite(request)
    data = await _body(request)
    if path.exists() and (not overwrite or not path.is_file()):
        return error_response(409, "file_exists", "The file exists", request.match_info["file"])
    try:
        await asyncio.to_thread(_write, path, data)
    except OSError as exc:  # a parent is a file, say
        return error_response(400, "invalid_target", "Cannot store a file under this name", exc.strerror or "")
    return _answer(request, root, path)


async def delete_userdata(request: web.Request) -> web.Response:
    path = _file(request)
    if not path.is_file():
        return error_response(404, "not_found", "No such file", request.match_info["file"])
    path.unlink()
    return web.Response(status=204)


async def move_userdata(request: web.Request) -> web.Response:
    root = _root(request)
    src = _file(request)
    dest = _file(request, "dest")
    if not src.is_file():
        return error_response(404, "not_found", "No such file", request.match_info["file"])
    if dest.exists() and (not _overwrite(request) or not dest.is_file()):
        return error_response(409, "file_exists", "The destination exists", request.match_info["dest"])
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    except OSError as exc:
        return error_response(400, "invalid_target", "Cannot move the file there", exc.strerror or "")
    return _answer(request, root, dest)
