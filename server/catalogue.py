"""The graph editor's catalogue routes: translations, subgraph blueprints, templates, model folders and files,
and the metadata in a safetensors model's header. Kiln ships none of the editor's optional content, so most
answer an empty object; the model routes read this server's folders."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from . import params
from .keys import FOLDERS
from .params import json_response
from .security import error_response


def _folders(request: web.Request):
    return request.app[FOLDERS]


MAX_SAFETENSORS_HEADER = 8 * 1024 * 1024
HIDDEN_MODEL_FOLDERS = ("configs", "custom_nodes")


async def i18n(request: web.Request) -> web.Response:
    """Translations of node names for the editor: Kiln ships none (the editor keeps its own)."""
    return json_response({})


async def global_subgraphs(request: web.Request) -> web.Response:
    """Subgraph blueprints offered to every workflow: none."""
    return json_response({})


async def node_replacements(request: web.Request) -> web.Response:
    """Nodes the editor should swap for newer ones when it opens a workflow: none."""
    return json_response({})


async def experiment_models(request: web.Request) -> web.Response:
    """The model folders and where each looks: ``[{"name", "folders"}]``."""
    f = _folders(request)
    return json_response(
        [
            {"name": kind, "folders": [str(p) for p in f.model_dirs(kind)]}
            for kind in sorted(f.models)
            if kind not in HIDDEN_MODEL_FOLDERS
        ]
    )


async def internal_folder_paths(request: web.Request) -> web.Response:
    """``{folder name: [path, ...]}``: where each model folder kind looks (the editor's model browser)."""
    f = _folders(request)
    return json_response({kind: [str(p) for p in f.model_dirs(kind)] for kind in sorted(f.models)})


def _models_with_index(f, kind: str) -> list[dict]:
    out, seen = [], set()
    for idx, root in enumerate(f.model_dirs(kind)):
        for name in _list_one_root(f, kind, root):
            if name not in seen:
                seen.add(name)
                out.append({"name": name, "pathIndex": idx})
    return out


def _list_one_root(f, kind: str, root) -> list[str]:
    """The model files under one of a kind's folders (the names ``Folders.list_models`` gives)."""
    from kiln.engine.folders import MODEL_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        return []
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in MODEL_EXTENSIONS:
                names.append((Path(dirpath) / name).relative_to(root).as_posix())
    return names


async def experiment_models_in(request: web.Request) -> web.Response:
    """The files of one model folder: ``[{"name", "pathIndex"}]`` (the index of the folder holding it)."""
    folder = request.match_info["folder"]
    f = _folders(request)
    if folder not in f.models or folder in HIDDEN_MODEL_FOLDERS:
        return error_response(404, "not_found", f"Unknown model folder {folder!r}")
    return json_response(await asyncio.to_thread(_models_with_index, f, folder))


def _safetensors_metadata(path) -> dict | None:
    """The ``__metadata__`` of a safetensors file's header, or None when it is not one."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        if n <= 0 or n > MAX_SAFETENSORS_HEADER:
            return None
        raw = fh.read(n)
    try:
        header = params.loads(raw)
    except params.BadParam:
        return None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


async def view_metadata(request: web.Request) -> web.Response:
    """``/view_metadata/{folder}?filename=``: the metadata stored in a safetensors model's header."""
    folder = request.match_info["folder"]
    name = params.query_str(request, "filename")
    f = _folders(request)
    if folder not in f.models:
        return error_response(404, "not_found", f"Unknown model folder {folder!r}")
    if not name.lower().endswith(".safetensors"):
        return error_response(404, "not_found", "Only safetensors files carry metadata", name)
    path = f.find_model(folder, name)
    if path is None or not path.is_file():
        return error_response(404, "not_found", "No such model", name)
    meta = await asyncio.to_thread(_safetensors_metadata, path)
    if meta is None:
        return error_response(404, "not_found", "Not a safetensors file", name)
    return json_response(meta)
