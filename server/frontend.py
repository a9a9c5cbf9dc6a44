"""The graph editor at ``/``: a built ComfyUI frontend, the custom packs' web files, and the landing page.

Kiln does not ship the editor. ComfyUI's frontend (GPL-3.0) is an optional install, ``pip install
'.[ui]'`` from the checkout (the ``comfyui-frontend-package`` distribution); ``kiln serve`` finds its ``static/`` folder
through the installed package and serves those files as they are, or serves the build given with
``--front-end-root DIR``. Without one, ``/`` is a short HTML page saying what Kiln is and how to install
the editor.

Custom node packs that declare ``WEB_DIRECTORY`` have their ``.js`` files listed by ``/extensions`` and
served under ``/extensions/<pack>/`` (names confined to the pack's folder).

Workflow templates, as ComfyUI serves them:
- ``/templates/<file>``: the editor's template browser reads ``index.json`` (or ``index.<locale>.json``),
  then each template's ``.json`` and thumbnails. They come from the ``comfyui-workflow-templates``
  distribution when it is installed (not a dependency of Kiln, not even of the ``ui`` extra): the asset list
  its ``iter_templates()``/``get_asset_path()`` give, or the ``templates/`` folder of older releases.
  Without it every such request is a 404, as on a ComfyUI without the package; the editor shows no
  templates and goes on.
- ``/workflow_templates``: ``{pack: [template names]}`` for custom packs with an ``*example*`` or
  ``*workflow*`` folder of ``.json`` files (``{}`` when none has one); the files are served under
  ``/api/workflow_templates/<pack>/``.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import logging
import mimetypes
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from kiln.engine import UnsafePath, safe_join

from .keys import CONFIG, SERVICE
from .params import json_response
from .security import error_response

FRONTEND_PACKAGE = "comfyui_frontend_package"
FRONTEND_DIST = "comfyui-frontend-package"
TEMPLATES_PACKAGE = "comfyui_workflow_templates"

log = logging.getLogger("kiln.server")


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


# -- workflow templates ----------------------------------------------------------------------------------


class TemplateAssets:
    """The installed ``comfyui-workflow-templates``' files by name, found on first use (importing the
    package and listing its assets is slow, and most servers never need them)."""

    def __init__(self, package: str = TEMPLATES_PACKAGE) -> None:
        self.package = package
        self._lock = threading.Lock()
        self._found = False
        self.assets: dict[str, Path] = {}  # file name -> path (the asset API)
        self.folder: Path | None = None  # or a folder of files (older releases)

    def _find(self) -> None:
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return
        try:
            module: Any = importlib.import_module(self.package)
        except Exception as exc:  # a broken install is a missing one, with a reason in the log
            log.warning("%s cannot be imported (%s): no workflow templates", self.package, exc)
            return
        iter_templates = getattr(module, "iter_templates", None)
        get_asset_path = getattr(module, "get_asset_path", None)
        if callable(iter_templates) and callable(get_asset_path):
            try:
                for entry in iter_templates():
                    for asset in entry.assets:
                        self.assets[str(asset.filename)] = Path(get_asset_path(entry.template_id, asset.filename))
            except Exception as exc:
                log.warning("%s's template list cannot be read (%s): no workflow templates", self.package, exc)
                self.assets = {}
            return
        for loc in spec.submodule_search_locations or ():
            folder = Path(loc) / "templates"
            if folder.is_dir():
                self.folder = folder
                return

    def lookup(self, name: str) -> Path | None:
        with self._lock:
            if not self._found:
                self._find()
                self._found = True
        if self.assets:
            path = self.assets.get(name)
            return path if path is not None and path.is_file() else None
        if self.folder is not None:
            try:
                path = safe_join(self.folder, name)
            except UnsafePath:
                return None
            return path if path.is_file() else None
        return None


TEMPLATES = web.AppKey("kiln_template_assets", TemplateAssets)


async def template_file(request: web.Request) -> web.StreamResponse:
    """``/templates/<file>``: a file of the installed workflow-templates package, else 404 (see above)."""
    path = request.app[TEMPLATES].lookup(request.match_info["tail"])
    if path is None:
        return error_response(404, "not_found", "No such workflow template file", request.match_info["tail"][:200])
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.FileResponse(path, headers={"Content-Type": ctype, "X-Content-Type-Options": "nosniff"})


def install_templates(app: web.Application, package: str = TEMPLATES_PACKAGE) -> None:
    app[TEMPLATES] = TemplateAssets(package)
    app.router.add_get("/templates/{tail:.+}", template_file)


def _example_folders(request: web.Request) -> dict[str, list[Path]]:
    """Each loaded custom pack's folders of example workflows (named like ``*example*`` or ``*workflow*``)."""
    registry = request.app[SERVICE].registry
    out: dict[str, list[Path]] = {}
    for report in getattr(registry, "pack_reports", ()):
        if not report.ok:
            continue
        root = Path(report.path)
        if not root.is_dir():
            continue
        folders = [
            d
            for d in sorted(root.iterdir())
            if d.is_dir() and not d.is_symlink() and ("example" in d.name.lower() or "workflow" in d.name.lower())
        ]
        if folders:
            out[report.pack] = folders
    return out


async def workflow_templates(request: web.Request) -> web.Response:
    """``{pack: [example workflow names]}`` for the custom packs that ship some; ``{}`` when none does."""
    listing: dict[str, list[str]] = {}
    for pack, folders in _example_folders(request).items():
        names = sorted({f.stem for d in folders for f in d.glob("*.json") if f.is_file()})
        if names:
            listing[pack] = names
    return json_response(listing)


async def workflow_template_file(request: web.Request) -> web.StreamResponse:
    """A custom pack's example workflow (or its thumbnail), confined to the pack's example folders."""
    pack, tail = request.match_info["pack"], request.match_info["tail"]
    for folder in _example_folders(request).get(pack, ()):
        try:
            path = safe_join(folder, tail)
        except UnsafePath:
            break
        if path.is_file():
            return _serve_file(folder, tail)
    return error_response(404, "not_found", "No such workflow template", f"{pack[:100]}/{tail[:200]}")
