"""Provenance records: what made an image, embedded in the file.

The record is shaped like a C2PA manifest definition (claim generator, assertions with ``label`` and
``data``) so a signer can turn it into a real manifest without reshaping:

- ``c2pa.actions.v2``: one ``c2pa.created`` action per provider call (provider, model, revised prompt,
  request id, time), with IPTC's ``trainedAlgorithmicMedia`` source type;
- ``kiln.graph``: the API-format graph that ran (it never holds keys: keys are not graph inputs);
- ``kiln.content_hash``: SHA-256 of the decoded pixels (``"<H>x<W>x<C>:"`` then the raw uint8 bytes),
  which survives re-encoding and can be checked by decoding the file.

PNG carries it as the ``kiln_provenance`` text chunk (next to ComfyUI's ``prompt``/``workflow``); JPEG
and WebP carry it as an XMP packet, plus EXIF Software and ImageDescription.

This record is unsigned and only Kiln reads it. With a signing key configured, the savers also embed a real,
signed C2PA manifest store that every C2PA reader verifies: see :mod:`.c2pa_sign` and ``kiln provenance``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import re
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from .config import redact

GENERATOR = "Kiln/0.1"
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CHUNK = "kiln_provenance"
_XMP_NS = "https://kiln.dev/ns/provenance/1.0/"


def pixel_hash(pixels: np.ndarray) -> str:
    """SHA-256 of ``"<H>x<W>x<C>:"`` + raw uint8 pixels (HxWxC)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    h = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]}:".encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return h.hexdigest()


def parse_generation_info(text: str | None) -> list[dict]:
    """The ``usage`` output of provider nodes (a JSON object, or a list of them) as a list of dicts."""
    if not text:
        return []
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return [{"note": str(text)[:2000]}]
    if isinstance(v, dict):
        return [v]
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def build(
    *,
    pixels: np.ndarray,
    graph: dict | None,
    generations: list[dict],
    prompt_id: str | None,
    node_id: str | None,
    mime: str,
    when: _dt.datetime | None = None,
) -> dict:
    when = when or _dt.datetime.now(_dt.timezone.utc)
    actions = []
    for g in generations or [{}]:
        params = {
            k: g[k]
            for k in ("provider", "model", "revised_prompt", "request_id", "response_id", "usd")
            if g.get(k) is not None
        }
        actions.append(
            {
                "action": "c2pa.created",
                "when": g.get("created") or when.isoformat(),
                "digitalSourceType": SOURCE_TYPE if g.get("provider") else None,
                "softwareAgent": {"name": "Kiln", "version": GENERATOR.split("/")[1]},
                "parameters": params,
            }
        )
    for a in actions:
        if a["digitalSourceType"] is None:
            del a["digitalSourceType"]
    assertions: list[dict[str, Any]] = [
        {"label": "c2pa.actions.v2", "data": {"actions": actions}},
        {
            "label": "kiln.content_hash",
            "data": {"alg": "sha256", "hash": pixel_hash(pixels), "over": "decoded pixels HxWxC uint8"},
        },
    ]
    if graph is not None:
        assertions.append({"label": "kiln.graph", "data": graph})
    return {
        "claim_generator": GENERATOR,
        "format": mime,
        "created": when.isoformat(),
        "kiln": {"prompt_id": prompt_id, "node": node_id},
        "assertions": assertions,
    }


def dumps(record: dict) -> str:
    """Compact JSON, with any known secret redacted (defence in depth: none should be there)."""
    return redact(json.dumps(record, separators=(",", ":"), sort_keys=True, default=str))


def xmp_packet(record: dict) -> bytes:
    gens = [a for a in record["assertions"] if a["label"] == "c2pa.actions.v2"]
    first = gens[0]["data"]["actions"][0].get("parameters", {}) if gens else {}
    desc = ", ".join(f"{k}={first[k]}" for k in ("provider", "model") if k in first) or "Kiln output"
    body = (
        f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:kiln="{_XMP_NS}" '
        f'xmp:CreatorTool="{GENERATOR}" kiln:manifest={quoteattr(dumps(record))}>'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(desc)}</rdf:li></rdf:Alt>'
        f"</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>' + body + '<?xpacket end="w"?>').encode()


def exif_bytes(record: dict) -> bytes:
    from PIL import Image

    ex = Image.Exif()
    ex[0x0131] = GENERATOR  # Software
    gens = [a for a in record["assertions"] if a["label"] == "c2pa.actions.v2"]
    p = gens[0]["data"]["actions"][0].get("parameters", {}) if gens else {}
    ex[0x010E] = json.dumps({k: p[k] for k in ("provider", "model") if k in p} | {"manifest": "XMP kiln:manifest"})
    return ex.tobytes()


def save_kwargs(fmt: str, record: dict | None, png_texts: dict | None = None) -> dict:
    """Keyword arguments for ``PIL.Image.save`` that embed ``record`` in format ``fmt`` (PNG/JPEG/WEBP)."""
    fmt = fmt.upper()
    if fmt == "PNG":
        from kiln.nodes.common import png_info

        texts = dict(png_texts or {})
        if record is not None:
            texts[CHUNK] = dumps(record)
        return {"pnginfo": png_info(texts)}
    if record is None:
        return {}
    return {"xmp": xmp_packet(record), "exif": exif_bytes(record)}


def read(data: bytes) -> dict | None:
    """The provenance record embedded in an image file, or None."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    text = getattr(img, "text", {}) or {}
    if CHUNK in text:
        return json.loads(text[CHUNK])
    xmp = img.info.get("xmp")
    if xmp:
        s = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
        m = re.search(r'kiln:manifest=("[^"]*"|\'[^\']*\')', s)
        if m:
            import html

            return json.loads(html.unescape(m.group(1)[1:-1]))
    return None


def png_chunks_for(pixels: np.ndarray, graph: dict | None, generation_info: str | None) -> dict[str, str]:
    """The ``kiln_provenance`` PNG text chunk for one image saved by the running node (SaveImage's option)."""
    from kiln import engine

    ctx = engine.current()
    rec = build(
        pixels=pixels,
        graph=graph,
        generations=parse_generation_info(generation_info),
        prompt_id=ctx.prompt_id if ctx else None,
        node_id=ctx.node_id if ctx else None,
        mime="image/png",
    )
    return {CHUNK: dumps(rec)}
