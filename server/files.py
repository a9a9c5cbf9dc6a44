"""``/view`` and ``/upload/image|mask``: files confined to the input, output and temp folders.

Every name from a request goes through ``Folders.safe_path`` (no ``..``, absolute paths, NUL bytes,
backslashes or symlinks out). Uploads stream to a temporary file with a size limit, must decode as an
image no larger than ``max_image_pixels`` (read from the header before any pixel is decoded: a few KB of PNG
can hold a 12000x12000 blank image), and never overwrite unless asked: an identical file is reused, a
different one gets " (n)".
Temporary files live in the server's private ``DATA_DIR/tmp-uploads`` (never the shared temp dir), are
removed on every path, and whatever a killed server left there is removed at the next start-up.

Also ``/internal/files/{type}``: the image names of a folder, newest first (the editor's output picker).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import mimetypes
import os
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import BodyPartReader, web

from kiln.engine import KilnError, UnsafePath

from . import params
from .keys import CONFIG, FOLDERS, SERVICE
from .params import json_response
from .security import error_response

FOLDER_TYPES = ("output", "input", "temp")
MAX_FIELD = 64 * 1024  # a form field other than the file (subfolder, type, original_ref)
UNSAFE_TYPES = {"text/html", "text/javascript", "application/javascript", "text/css", "image/svg+xml"}


def _clean_name(name: str) -> str | None:
    """A bare file name, or None if it carries a path or forbidden characters."""
    if not name or "\0" in name or "/" in name or "\\" in name or name in (".", "..") or ":" in name[:2]:
        return None
    return name


def _split_annotation(filename: str, type_: str | None) -> tuple[str, str]:
    for t in FOLDER_TYPES:
        suffix = f" [{t}]"
        if filename.endswith(suffix):
            return filename[: -len(suffix)], t
    return filename, type_ or "output"


async def view(request: web.Request) -> web.StreamResponse:
    folders = request.app[FOLDERS]
    q = {k: params.query_str(request, k) for k in ("filename", "type", "subfolder", "preview", "channel")}
    raw = q.get("filename", "")
    if not raw:
        return error_response(400, "bad_request", "filename is required")
    filename, type_ = _split_annotation(raw, q.get("type") or None)
    if type_ not in FOLDER_TYPES:
        return error_response(400, "bad_request", f"unknown type {type_!r}", "use output, input or temp")
    name = _clean_name(filename)
    if name is None:
        return error_response(400, "unsafe_path", "Invalid file name", "a bare file name is expected")
    try:
        path = folders.safe_path(type_, name, q.get("subfolder", ""))
    except UnsafePath as exc:
        return error_response(403, "unsafe_path", "Path not allowed", str(exc))
    source: Path | io.BytesIO = path
    if not path.is_file():
        stored = await _from_store(request, type_, q.get("subfolder", ""), name)
        if isinstance(stored, web.StreamResponse):
            return stored
        if stored is None:
            return error_response(404, "not_found", "File not found", name)
        source = stored
    headers = {"Content-Disposition": f'filename="{name}"'}
    preview, channel = q.get("preview") or None, q.get("channel") or "rgba"
    if preview or channel in ("rgb", "a"):
        try:
            body, ctype = await asyncio.to_thread(_reencode, source, preview, channel)
        except Exception as exc:
            return error_response(415, "not_an_image", "Cannot convert this file", str(exc))
        return web.Response(body=body, content_type=ctype, headers=headers)
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if ctype in UNSAFE_TYPES:
        ctype = "application/octet-stream"
    headers["Content-Type"] = ctype
    headers["X-Content-Type-Options"] = "nosniff"
    if isinstance(source, io.BytesIO):
        return web.Response(body=source.getvalue(), headers=headers)
    return web.FileResponse(path, headers=headers)


async def _from_store(request: web.Request, type_: str, subfolder: str, name: str):
    """A worker's output kept in the output store (``--output-store``): its bytes, a redirect to a presigned
    URL (``--output-serve redirect``), or None when the store has no such object (or there is no store)."""
    store = request.app[SERVICE].output_store
    if store is None or type_ not in ("output", "temp") or not subfolder:
        return None
    if request.app[CONFIG].output_serve == "redirect" and not request.query.get("preview"):
        if not await asyncio.to_thread(store.exists, type_, subfolder, name):
            return None
        raise web.HTTPTemporaryRedirect(await asyncio.to_thread(store.presigned, type_, subfolder, name))
    data = await asyncio.to_thread(store.get, type_, subfolder, name)
    return None if data is None else io.BytesIO(data)


def _reencode(path: Path | io.BytesIO, preview: str | None, channel: str) -> tuple[bytes, str]:
    from PIL import Image

    img: Image.Image = Image.open(path)
    if channel == "rgb":
        img, fmt = img.convert("RGB"), "png"
    elif channel == "a":
        alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
        img = Image.new("RGBA", img.size, (0, 0, 0, 0))
        img.putalpha(alpha)
        fmt = "webp" if preview else "png"
    else:
        fmt = "png"
    quality = 90
    if preview:
        f, _, qual = preview.partition(";")
        fmt = "jpeg" if f == "jpeg" and channel != "a" else "webp"
        if qual.isdigit():
            quality = max(1, min(100, int(qual)))
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, fmt.upper(), quality=quality) if fmt == "webp" else img.save(buf, "PNG")
    return buf.getvalue(), f"image/{fmt}"


async def _read_upload(request: web.Request, limit: int) -> tuple[dict, tuple[str, Path] | None]:
    """Form fields and (filename, temp path) of the ``image`` part; a malformed body is a typed 400 and
    leaves no temporary file behind."""
    temps: list[Path] = []
    try:
        return await _read_parts(request, limit, temps)
    except BaseException as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (ValueError, AssertionError, LookupError, TypeError, aiohttp.ClientError)):
            # no or an empty boundary, a boundary that never comes, a part without Content-Disposition, ...
            raise params.BadParam(
                "Malformed multipart body", f"{type(exc).__name__}: {str(exc)[:200]}", "bad_multipart"
            ) from None
        raise


async def _read_parts(request: web.Request, limit: int, temps: list[Path]) -> tuple[dict, tuple[str, Path] | None]:
    """Form fields and (filename, temp path) of the ``image`` part, streamed with a size limit."""
    fields: dict[str, str] = {}
    upload = None
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):  # a nested multipart/* part: not a form field
            raise web.HTTPBadRequest(text="nested multipart parts are not supported")
        if part.name == "image" and part.filename is not None:
            if upload is not None:
                raise web.HTTPBadRequest(text="only one 'image' file per upload")
            tmp_dir = request.app[CONFIG].upload_tmp_dir
            tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="kiln-upload-", dir=tmp_dir)
            tmp = Path(name)
            temps.append(tmp)
            size = 0
            with os.fdopen(fd, "wb") as f:
                while chunk := await part.read_chunk(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                    f.write(chunk)
            upload = (params.check_text(part.filename, "the file name"), tmp)
        elif part.name:
            buf = bytearray()
            while chunk := await part.read_chunk(4096):
                buf += chunk
                if len(buf) > MAX_FIELD:
                    raise web.HTTPRequestEntityTooLarge(max_size=MAX_FIELD, actual_size=len(buf))
            fields[params.check_text(part.name, "a form field name")] = buf.decode("utf-8", "replace")
    return fields, upload


class ImageTooLarge(KilnError, ValueError):
    """An upload whose header declares more pixels than the server's cap (or PIL's own bomb guard)."""


def _check_image(path: Path, max_pixels: int = 0) -> None:
    """Refuse what is not an image, or an image of more than ``max_pixels`` pixels (0: no cap of Kiln's own),
    reading only the header; then let PIL verify the file's structure without keeping any pixels."""
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:  # PIL's own guard, past twice Image.MAX_IMAGE_PIXELS
        raise ImageTooLarge(str(exc)) from None
    with im:
        w, h = im.size
        if max_pixels and w * h > max_pixels:
            raise ImageTooLarge(
                f"the image is {w}x{h} ({w * h / 1e6:.1f} megapixels), over this server's limit of "
                f"{max_pixels / 1e6:.1f} megapixels"
            )
        im.verify()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _place(folder: Path, name: str, tmp: Path, overwrite: bool) -> str:
    """Move the upload into ``folder``; returns the final name (" (n)" on a collision with other content)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not overwrite and target.exists():
        if target.is_file() and _digest(target) == _digest(tmp):
            tmp.unlink()
            return name
        stem, ext = os.path.splitext(name)
        i = 1
        while (folder / f"{stem} ({i}){ext}").exists():
            i += 1
        name = f"{stem} ({i}){ext}"
        target = folder / name
    os.replace(tmp, target) if tmp.stat().st_dev == folder.stat().st_dev else _copy(tmp, target)
    return name


def _copy(tmp: Path, target: Path) -> None:
    import shutil

    shutil.copyfile(tmp, target)
    tmp.unlink()


async def upload_image(request: web.Request) -> web.Response:
    return await _upload(request, mask=False)


async def upload_mask(request: web.Request) -> web.Response:
    return await _upload(request, mask=True)


async def _upload(request: web.Request, mask: bool) -> web.Response:
    folders = request.app[FOLDERS]
    limit = request.app[CONFIG].max_upload_bytes
    if not request.content_type.startswith("multipart/"):
        return error_response(400, "bad_request", "Expected multipart/form-data with an 'image' file")
    fields, upload = await _read_upload(request, limit)
    if upload is None:
        return error_response(400, "bad_request", "No 'image' file in the form")
    filename, tmp = upload
    try:
        type_ = fields.get("type") or "input"
        name = _clean_name(filename or "")
        if type_ not in FOLDER_TYPES:
            return error_response(400, "bad_request", f"unknown type {type_!r}", "use input, temp or output")
        if name is None:
            return error_response(400, "unsafe_path", "Invalid file name", repr(filename))
        subfolder = fields.get("subfolder", "")
        try:
            folder = folders.safe_path(type_, "", subfolder) if subfolder else folders.dir_for(type_)
            folders.safe_path(type_, name, subfolder)
        except UnsafePath as exc:
            return error_response(400, "unsafe_path", "Path not allowed", str(exc))
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        ref = fields.get("original_ref", "") if mask else None
        # one worker-thread call that removes the temporary file itself: a request cancelled meanwhile
        # (the client went away) cannot leave a file that the thread writes after this coroutine is gone
        max_pixels = request.app[CONFIG].max_image_pixels
        answer = await asyncio.to_thread(_store_upload, folders, Path(folder), name, tmp, ref, overwrite, max_pixels)
        if isinstance(answer, web.Response):
            return answer
        return json_response({"name": answer, "subfolder": subfolder, "type": type_})
    finally:
        tmp.unlink(missing_ok=True)


def _store_upload(
    folders, folder: Path, name: str, tmp: Path, original_ref: str | None, overwrite: bool, max_pixels: int = 0
) -> str | web.Response:
    """Check the image, apply a mask, move it into place; the final name or an error answer. The temporary
    file is gone when this returns, whatever happened."""
    try:
        try:
            _check_image(tmp, max_pixels)
        except ImageTooLarge as exc:
            return error_response(
                400,
                "image_too_large",
                "The image has more pixels than this server accepts",
                str(exc),
                max_image_pixels=max_pixels,
                hint="shrink the image before uploading it, or start the server with a larger --max-image-pixels",
            )
        except Exception as exc:
            return error_response(415, "not_an_image", "The upload is not an image Kiln can read", str(exc))
        if original_ref is not None:
            try:
                _apply_mask(folders, original_ref, tmp)
            except UnsafePath as exc:
                return error_response(400, "unsafe_path", "Path not allowed", str(exc))
            except Exception as exc:  # anything about the reference or the images themselves
                return error_response(400, "bad_request", "Cannot apply the mask", f"{type(exc).__name__}: {exc}")
        try:
            return _place(folder, name, tmp, overwrite)
        except OSError as exc:  # the name is a folder, the folder is a file, ...
            return error_response(
                400, "invalid_target", "Cannot store the upload under this name", exc.strerror or type(exc).__name__
            )
    finally:
        tmp.unlink(missing_ok=True)


def clear_upload_tmp(folder: Path) -> int:
    """Remove what a server that was killed mid-upload left in its private upload folder; returns how many
    files went. Called at start-up, once the data dir's lock is held (no other server uses the folder)."""
    n = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith("kiln-upload-") and entry.is_file():
                entry.unlink(missing_ok=True)
                n += 1
    return n


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


async def internal_files(request: web.Request) -> web.Response:
    """The image file names directly in the output (or input, temp) folder, newest first."""
    type_ = request.match_info["directory_type"]
    if type_ not in FOLDER_TYPES:
        return error_response(400, "bad_request", f"unknown folder {type_!r}", "use output, input or temp")
    folder = request.app[FOLDERS].dir_for(type_)
    return json_response(await asyncio.to_thread(_images_newest_first, Path(folder)))


def _images_newest_first(folder: Path) -> list[str]:
    found = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.lower().endswith(IMAGE_EXTS) and e.is_file(follow_symlinks=False):
                    found.append((e.stat().st_mtime, e.name))
    except FileNotFoundError:
        return []
    found.sort(key=lambda t: (-t[0], t[1]))
    return [name for _, name in found]


def _apply_mask(folders, original_ref: str, tmp: Path) -> None:
    """Copy the uploaded image's alpha onto the referenced original; the result replaces the upload."""
    from PIL import Image, PngImagePlugin

    try:
        ref = json.loads(original_ref)
    except json.JSONDecodeError as exc:
        raise ValueError("original_ref must be JSON {filename, subfolder, type}") from exc
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise ValueError("original_ref must name a filename")
    name = _clean_name(ref["filename"])
    if name is None:
        raise UnsafePath(f"invalid file name {ref['filename']!r}")
    src = folders.safe_path(ref.get("type") or "input", name, ref.get("subfolder") or "")
    if not src.is_file():
        raise ValueError(f"original {name!r} not found")
    with Image.open(src) as orig, Image.open(tmp) as m:
        info = PngImagePlugin.PngInfo()
        for k, v in (orig.text if hasattr(orig, "text") else {}).items():
            info.add_text(k, v)
        out = orig.convert("RGBA")
        alpha = m.getchannel("A") if "A" in m.getbands() else m.convert("L")
        out.putalpha(alpha.resize(out.size))
        out.save(tmp, "PNG", pnginfo=info)
