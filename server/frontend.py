"""The graph editor at ``/``: a built ComfyUI frontend, the custom packs' web files, and the landing page.

Kiln does not ship the editor. ComfyUI's frontend (GPL-3.0) is an optional install, ``pip install
'.[ui]'`` from the checkout (the ``comfyui-frontend-package`` distribution); ``kiln serve`` finds its ``static/`` folder
through the installed package and serves those files as they are, or serves the build given with
``--front-end-root DIR``. Without one, ``/`` is a short HTML page saying what Kiln is and how to install
the editor.

Custom node packs that declare ``WEB_DIRECTORY`` have their ``.js`` files listed by ``/extensions`` and
served under ``/extensions/<pack>/`` (names confined to the pack's folder).
"""

from __future__ import annotations

import html
import importlib.util
import mimetypes
from pathlib import Path

from aiohttp import web

from kiln.engine import UnsafePath, safe_join

from .keys import CONFIG, SERVICE
from .params import json_response
from .security import error_response

FRONTEND_PACKAGE = "comfyui_frontend_package"
FRONTEND_DIST = "comfyui-frontend-package"


def installed_front_end() -> Path | None:
    """The ``static/`` folder of the installed ``comfyui-frontend-package``, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(FRONTEND_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        static = Path(loc) / "static"
        if (static / "index.html").is_file():
            return static
    return None


LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;line-height:1.5}}
code{{background:#eee;padding:.1em .3em}}</style></head>
<body><h1>Kiln</h1>
<p>Kiln is a node-graph workflow engine for image generation that speaks ComfyUI's graph format and API.
This server runs graphs submitted to <code>/prompt</code> (also at <code>/api/prompt</code>) and streams
progress on the websocket <code>/ws</code>.</p>
<p>{editor}</p>
</body></html>
"""
NO_EDITOR = (
    "The graph editor is not installed. To edit graphs in the browser, install ComfyUI's frontend "
    "(GPL-3.0, installed separately, not part of Kiln) with <code>pip install -e '.[ui]'</code> and "
    "restart <code>kiln serve</code>, or pass <code>--front-end-root DIR</code> with a frontend build."
)


def _root(request: web.Request) -> Path | None:
    return request.app[CONFIG].front_end_root


async def index(request: web.Request) -> web.StreamResponse:
    root = _root(request)
    if root is not None and (root / "index.html").is_file():
        return web.FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})
    missing = f" (no index.html in {html.escape(str(root))})" if root is not None else ""
    return web.Response(text=LANDING.format(editor=NO_EDITOR + missing), content_type="text/html")


def _serve_file(root: Path, rel: str) -> web.StreamResponse:
    try:
        path = safe_join(root, rel)
    except UnsafePath:
        raise web.HTTPNotFound() from None
    if not path.is_file():
        raise web.HTTPNotFound()
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.FileResponse(path, headers={"Content-Type": ctype, "X-Content-Type-Options": "nosniff"})


async def static(request: web.Request) -> web.StreamResponse:
    """Any other GET: a file of the frontend build (registered last, only when there is a build)."""
    root = _root(request)
    if root is None:
        raise web.HTTPNotFound()
    return _serve_file(root, request.match_info["tail"])


def _web_dirs(request: web.Request) -> dict[str, Path]:
    registry = request.app[SERVICE].registry
    dirs = getattr(registry, "web_directories", None)
    return dict(dirs) if isinstance(dirs, dict) else {}


async def extensions(request: web.Request) -> web.Response:
    """The URLs of the custom packs' scripts, for the editor to import (``[]`` with no such pack)."""
    urls = []
    for pack, folder in sorted(_web_dirs(request).items()):
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for js in sorted(folder.rglob("*.js")):
            if js.is_file():
                urls.append(f"/extensions/{pack}/{js.relative_to(folder).as_posix()}")
    return json_response(urls)


async def extension_file(request: web.Request) -> web.StreamResponse:
    pack, tail = request.match_info["pack"], request.match_info["tail"]
    folder = _web_dirs(request).get(pack)
    if folder is not None:
        return _serve_file(Path(folder), tail)
    root = _root(request)
    if root is not None and (root / "extensions").is_dir():  # the build's own extensions (core, ...)
        return _serve_file(root / "extensions", f"{pack}/{tail}")
    return error_response(404, "not_found", "No such extension", pack)
