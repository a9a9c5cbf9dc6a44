"""ComfyUI's websocket wire format: JSON messages and binary preview frames.

Binary frames start with a big-endian uint32 event type. Type 1: uint32 image format (1 JPEG, 2 PNG) then
the image bytes. Type 4: uint32 metadata length, metadata JSON, then the image bytes; only for sockets that
negotiated ``supports_preview_metadata``.

Per-prompt events carry a top-level ``"seq"`` (1, 2, ...) next to ``type`` and ``data``; ComfyUI clients
ignore it, Kiln's client uses it to ask for a replay from where it stopped.
"""
from __future__ import annotations

import json
import struct

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
FORMATS = {"JPEG": 1, "PNG": 2}
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}

# Kiln additions to the server feature flags
SERVER_FEATURES = {"submit_on_socket": True, "replay": True, "event_seq": True}


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def message(type_: str, data, seq: int | None = None) -> str:
    if seq is None:
        return dumps({"type": type_, "data": data})
    return dumps({"type": type_, "data": data, "seq": seq})


def message_from_json(type_: str, data_json: str, seq: int) -> str:
    """A logged event back into a message, without decoding its data."""
    return '{"type":%s,"data":%s,"seq":%d}' % (json.dumps(type_), data_json, seq)


def status_data(queue_remaining: int, sid: str | None = None) -> dict:
    d: dict = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
    if sid is not None:
        d["sid"] = sid
    return d


def preview_frame(fmt: str, data: bytes) -> bytes:
    return struct.pack(">II", PREVIEW_IMAGE, FORMATS.get(fmt.upper(), 1)) + data


def preview_frame_with_metadata(fmt: str, data: bytes, meta: dict) -> bytes:
    m = dumps({**meta, "image_type": MIME.get(fmt.upper(), "image/jpeg")}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(m)) + m + data


def error_message(type_: str, message_: str, details: str = "", **extra) -> str:
    return message("error", {"type": type_, "message": message_, "details": details, "extra_info": extra})


def server_features(max_upload: int) -> dict:
    return {"supports_preview_metadata": True, "max_upload_size": max_upload, "kiln": dict(SERVER_FEATURES)}
