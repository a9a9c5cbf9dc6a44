"""S3 storage nodes (boto3): SaveImageS3, SaveFileS3, LoadImageS3.

Works with AWS and any S3-compatible store (MinIO, R2, Ceph...) through ``endpoint_url``, ``region`` and
the path-style switch. Credentials come from boto3's standard chain, never from the graph.

Keys come from a template: ``{prefix}`` (filename_prefix), ``{prompt_id}``, ``{node}``, ``{index}``,
``{date}`` (YYYY-MM-DD, UTC), ``{time}`` (HHMMSS), ``{hash}`` (first 16 hex of the content hash) and
``{ext}``. A batch is all-or-nothing: if one upload fails, the objects this node already wrote are
deleted, and no multipart upload is left behind. Saved objects are reported as ``s3://`` URIs (and
optional presigned URLs) in the outputs and in the UI dict, so clients see them in ``executed`` and
history.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import datetime as _dt
import hashlib
import io
import json
import mimetypes
import string
import threading
from typing import Annotated, Any

import torch

from kiln import engine
from kiln.engine import Boolean, Combo, Hidden, Int, NodeError, NodeResult, Output, Socket, String
from kiln.nodes.common import check_image, comfy_png_metadata, to_uint8
from kiln.nodes.providers import c2pa_sign, imageio, preflight, provenance, s3io
from kiln.nodes.providers.checks import check_images

STORAGE_CLASSES = ["STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "REDUCED_REDUNDANCY"]
FIELDS = {"prefix", "prompt_id", "node", "index", "date", "time", "hash", "ext"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

Bucket = Annotated[str, String(tooltip="bucket name")]
EndpointUrl = Annotated[str, String(tooltip="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO; empty: AWS")]
Region = Annotated[str, String(tooltip="bucket region; empty: from the AWS config/environment")]
PathStyle = Annotated[bool, Boolean(tooltip="path-style addressing (MinIO and most self-hosted stores need it)")]
Presign = Annotated[int, Int(min=0, max=604800, tooltip="seconds a presigned GET URL stays valid; 0: none")]


def render_key(template: str, values: dict[str, Any], *, batch: int) -> str:
    """Fill a key template; NodeError naming ``key_template`` for unknown fields or colliding keys."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise NodeError(
            f"key_template {template!r} is malformed: {exc}",
            input_name="key_template",
            hint="use {field} placeholders; write {{ and }} for literal braces",
        ) from exc
    unknown = names - FIELDS
    if unknown:
        raise NodeError(
            f"key_template uses unknown field(s) {sorted(unknown)}",
            input_name="key_template",
            hint=f"use only {sorted(FIELDS)}",
        )
    if batch > 1 and not names & {"index", "hash"}:
        raise NodeError(
            f"key_template {template!r} gives every image of the batch of {batch} the same key",
            input_name="key_template",
            hint="add {index} or {hash} to the template",
        )
    key = template.format(**values).lstrip("/")
    if not key or key.endswith("/"):
        raise NodeError(
            f"key_template {template!r} produced the empty or folder-like key {key!r}",
            input_name="key_template",
            hint="end the template with a file name such as {index}.{ext}",
        )
    return key


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _bucket_preflight(
    cls: type, bucket: Any = None, endpoint_url: Any = "", region: Any = "", path_style: Any = False, **_: Any
) -> bool | dict:
    """Before anything runs: boto3 installed, credentials found, the bucket answers."""
    return preflight.bucket_ready(bucket, endpoint_url, region, path_style)


def _target(endpoint_url: str, region: str, path_style: bool) -> s3io.Target:
    url = (endpoint_url or "").strip()
    if url and not url.startswith(("http://", "https://")):
        raise NodeError(
            f"endpoint_url {url!r} needs a scheme",
            input_name="endpoint_url",
            hint="write it like https://s3.example.com or http://127.0.0.1:9000",
        )
    return s3io.Target(url, (region or "").strip(), bool(path_style))


def _check_bucket(bucket: str) -> str:
    b = (bucket or "").strip()
    if not b:
        raise NodeError("no bucket given", input_name="bucket", hint="set the bucket to write to")
    return b


_pool: tuple[int, cf.ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _workers() -> cf.ThreadPoolExecutor:
    """The threads every S3 node encodes and uploads on: one pool, so concurrent nodes share the
    ``s3.max_concurrency`` limit instead of each starting its own threads. A changed setting gets a new
    pool; the old one is only dropped (not shut down, as a node may be submitting to it), and its idle
    threads exit once it is garbage-collected."""
    global _pool
    n = s3io.settings()["max_concurrency"]
    with _pool_lock:
        if _pool is None or _pool[0] != n:
            _pool = (n, cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix="kiln-s3"))
        return _pool[1]


async def _upload_all(c: Any, bucket: str, items: list[dict], storage_class: str, presign: int) -> list[dict]:
    """Upload every item concurrently; on any failure, cancellation or interrupt, wait for the uploads
    already running (a thread cannot be stopped mid-request), delete every object this call wrote, and
    raise. An interrupt that comes after the last upload has landed and been checked finds the node done:
    its objects stay."""
    sem = asyncio.Semaphore(s3io.settings()["max_concurrency"])
    puts: list[tuple[str, cf.Future]] = []

    async def one(item: dict) -> dict:
        async with sem:
            engine.check_interrupted()
            if "prepare" in item:  # hashing and encoding run in the worker too, overlapping other uploads
                item.update(await asyncio.wrap_future(_workers().submit(item.pop("prepare"))))
            fut = _workers().submit(
                s3io.put,
                c,
                bucket,
                item["key"],
                item["data"],
                content_type=item["content_type"],
                metadata=item["metadata"],
                storage_class=storage_class,
            )
            puts.append((item["key"], fut))
            r = await asyncio.wrap_future(fut)
            return {
                "bucket": bucket,
                "key": item["key"],
                "uri": f"s3://{bucket}/{item['key']}",
                "size": r["size"],
                "etag": r["etag"],
                "content_type": item["content_type"],
            }

    tasks = [asyncio.ensure_future(one(i)) for i in items]
    try:
        results = await asyncio.gather(*tasks)
        # the executor passes an interrupt on to an async node by cancelling it, but only when its thread
        # next looks, and not at all once the node has returned: an interrupt that came while the batch was
        # uploading must still take the batch back, so look once more now that every upload has landed
        engine.check_interrupted()
    except BaseException as exc:
        for t in tasks:
            t.cancel()
        # finish the roll-back even if this task is cancelled again meanwhile (an interrupt can cancel it
        # twice): a roll-back left running when the node's loop closes would leave objects in the bucket
        rb = asyncio.ensure_future(_roll_back(c, bucket, tasks, puts))
        while not rb.done():
            try:
                await asyncio.shield(rb)
            except asyncio.CancelledError:
                continue
        if isinstance(exc, (NodeError, engine.Interrupted)) or not isinstance(exc, Exception):
            raise
        failed = next(
            (i.get("key") for i, t in zip(items, tasks) if t.done() and not t.cancelled() and t.exception() is exc),
            None,
        )
        raise s3io.to_node_error(exc, action="uploading", bucket=bucket, key=failed) from None
    for entry in results:
        if presign:
            entry["url"] = c.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": entry["key"]}, ExpiresIn=presign
            )
    return list(results)


async def _roll_back(c: Any, bucket: str, tasks: list, puts: list[tuple[str, cf.Future]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    futs = [f for _, f in puts]
    if futs:
        await asyncio.to_thread(cf.wait, futs)
    for key, f in puts:
        if f.cancelled() or f.exception() is not None:
            continue  # never written (a failed multipart upload aborts itself)
        try:
            await asyncio.to_thread(c.delete_object, Bucket=bucket, Key=key)
        except Exception:  # best effort: report the original error, not the cleanup's
            pass


def _ui(entries: list[dict]) -> dict:
    return {"s3": entries, "text": [e.get("url") or e["uri"] for e in entries]}


def _encoder(arr: Any, fmt: str, quality: int, record: dict | None, texts: dict | None, sign: Any = None):
    """Encoding deferred to the upload worker; ``arr`` is the HxWxC uint8 image already hashed; ``sign``
    (c2pa_sign.signer_for) embeds a signed C2PA manifest in the encoded file."""

    def encode() -> bytes:
        from PIL import Image

        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        buf = io.BytesIO()
        kw = provenance.save_kwargs(fmt, record, texts)
        if fmt == "png":
            pil.save(buf, format="PNG", compress_level=4, **kw)
        elif fmt == "jpeg":
            pil.convert("RGB").save(buf, format="JPEG", quality=quality, **kw)
        else:
            pil.save(buf, format="WEBP", quality=quality, **kw)
        return sign(buf.getvalue(), fmt, arr) if sign is not None else buf.getvalue()

    return encode


class SaveImageS3(engine.Node):
    """Save images to S3 or an S3-compatible store, with provenance embedded in each file."""

    display_name = "Save Image (S3)"
    category = "image/storage"
    output_node = True
    outputs = [Output("STRING", "uri", is_list=True), Output("STRING", "url", is_list=True)]

    preflight = classmethod(_bucket_preflight)

    async def run(
        self,
        images: Annotated[torch.Tensor, Socket("IMAGE")],
        bucket: Bucket,
        key_template: Annotated[
            str, String(tooltip="fields: {prefix} {prompt_id} {node} {index} {date} {time} {hash} {ext}")
        ] = "{prefix}/{date}/{prompt_id}_{node}_{index}.{ext}",
        filename_prefix: Annotated[str, String()] = "kiln",
        format: Annotated[str, Combo(["png", "jpeg", "webp"])] = "png",
        quality: Annotated[int, Int(min=1, max=100, tooltip="jpeg/webp quality")] = 90,
        storage_class: Annotated[str, Combo(STORAGE_CLASSES)] = "STANDARD",
        endpoint_url: EndpointUrl = "",
        region: Region = "",
        path_style: PathStyle = False,
        presign_seconds: Presign = 0,
        embed_provenance: Annotated[
            bool, Boolean(tooltip="graph, provider, model, revised prompt, time and content hash in the file")
        ] = True,
        embed_workflow: Annotated[bool, Boolean(tooltip="ComfyUI's prompt/workflow PNG chunks")] = True,
        validate: Annotated[bool, Boolean(tooltip="refuse blank or single-colour images")] = True,
        metadata: Annotated[str, String(multiline=True, tooltip="extra S3 metadata as a JSON object")] = "",
        generation_info: Annotated[str, String(force_input=True, tooltip="a provider node's usage output")] = None,
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict, Hidden("EXTRA_PNGINFO")] = None,
    ) -> NodeResult:
        check_image(images, "SaveImageS3", "images")
        if validate:
            await asyncio.to_thread(check_images, images, "SaveImageS3", "images")
        bucket = _check_bucket(bucket)
        c = s3io.client(_target(endpoint_url, region, path_style))
        ctx = engine.current()
        prompt_id, node_id = (ctx.prompt_id, ctx.node_id) if ctx else ("none", "none")
        user_meta = _user_metadata(metadata)
        gens = provenance.parse_generation_info(generation_info)
        now = _now()
        n = int(images.shape[0])
        fields = {
            "prefix": filename_prefix.strip("/") or "kiln",
            "prompt_id": prompt_id,
            "node": node_id,
            "date": now.strftime("%Y-%m-%d"),
            "time": now.strftime("%H%M%S"),
            "ext": format,
        }
        render_key(key_template, {**fields, "index": "00000", "hash": "0" * 16}, batch=n)  # bad templates fail now
        texts = comfy_png_metadata(prompt, extra_pnginfo) if embed_workflow and format == "png" else None
        meta = {"kiln-prompt-id": prompt_id, "kiln-node": node_id, "kiln-created": now.isoformat()}
        # C2PA: a signing function when a key is configured (hashing model files may take a moment)
        sign = await asyncio.to_thread(c2pa_sign.signer_for, prompt, generation_info) if embed_provenance else None
        if gens:
            meta.update({"kiln-provider": gens[0].get("provider"), "kiln-model": gens[0].get("model")})

        def prepare(i: int) -> dict:
            pixels = to_uint8(images[i])
            digest = provenance.pixel_hash(pixels)
            record = (
                provenance.build(
                    pixels=pixels,
                    graph=prompt,
                    generations=gens,
                    prompt_id=prompt_id,
                    node_id=node_id,
                    mime=MIME[format],
                    when=now,
                )
                if embed_provenance
                else None
            )
            return {
                "key": render_key(key_template, {**fields, "index": f"{i:05d}", "hash": digest[:16]}, batch=n),
                "data": _encoder(pixels, format, quality, record, texts, sign)(),
                "metadata": s3io.ascii_metadata({**meta, "kiln-sha256": digest, **user_meta}),
            }

        items = [{"prepare": (lambda i=i: prepare(i)), "content_type": MIME[format]} for i in range(n)]
        entries = await _upload_all(c, bucket, items, storage_class, presign_seconds)
        return NodeResult([e["uri"] for e in entries], [e.get("url", "") for e in entries], ui=_ui(entries))


def _user_metadata(text: str) -> dict:
    if not (text or "").strip():
        return {}
    try:
        v = json.loads(text)
    except ValueError as exc:
        raise NodeError(
            f"metadata is not JSON: {exc}",
            input_name="metadata",
            hint='write a JSON object such as {"project": "spring"}',
        ) from exc
    if not isinstance(v, dict):
        raise NodeError("metadata must be a JSON object", input_name="metadata", hint='e.g. {"project": "spring"}')
    return v


def _as_bytes(data: Any) -> tuple[bytes, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), "application/octet-stream"
    if isinstance(data, str):
        return data.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(data, (dict, list, int, float, bool)) or data is None:
        return json.dumps(data, default=str).encode(), "application/json"
    if isinstance(data, torch.Tensor):
        raise NodeError(
            "SaveFileS3 got a tensor",
            input_name="data",
            hint="use SaveImageS3 for IMAGE data; SaveFileS3 stores bytes, text or JSON",
        )
    raise NodeError(
        f"SaveFileS3 cannot store a {type(data).__name__}",
        input_name="data",
        hint="connect bytes, text (STRING) or JSON-like values",
    )


class SaveFileS3(engine.Node):
    """Save bytes, text or JSON from any node to S3 or an S3-compatible store."""

    display_name = "Save File (S3)"
    category = "storage"
    output_node = True
    outputs = [Output("STRING", "uri"), Output("STRING", "url")]

    preflight = classmethod(_bucket_preflight)

    async def run(
        self,
        data: Annotated[Any, Socket("*")],
        bucket: Bucket,
        key_template: Annotated[str, String()] = "{prefix}/{date}/{prompt_id}_{node}.{ext}",
        filename_prefix: Annotated[str, String()] = "kiln",
        extension: Annotated[str, String(tooltip="fills {ext}; also picks the content type")] = "bin",
        content_type: Annotated[str, String(tooltip="empty: guessed from the extension")] = "",
        storage_class: Annotated[str, Combo(STORAGE_CLASSES)] = "STANDARD",
        endpoint_url: EndpointUrl = "",
        region: Region = "",
        path_style: PathStyle = False,
        presign_seconds: Presign = 0,
        metadata: Annotated[str, String(multiline=True)] = "",
        prompt: Annotated[dict, Hidden("PROMPT")] = None,
    ) -> NodeResult:
        bucket = _check_bucket(bucket)
        body, default_type = _as_bytes(data)
        body = await asyncio.to_thread(c2pa_sign.sign_file, body, prompt)  # image bytes: signed when a key is set
        ext = (extension or "bin").lstrip(".")
        ctype = content_type.strip() or mimetypes.guess_type(f"x.{ext}")[0] or default_type
        ctx = engine.current()
        prompt_id, node_id = (ctx.prompt_id, ctx.node_id) if ctx else ("none", "none")
        now = _now()
        digest = hashlib.sha256(body).hexdigest()
        key = render_key(
            key_template,
            {
                "prefix": filename_prefix.strip("/") or "kiln",
                "prompt_id": prompt_id,
                "node": node_id,
                "index": "00000",
                "date": now.strftime("%Y-%m-%d"),
                "time": now.strftime("%H%M%S"),
                "hash": digest[:16],
                "ext": ext,
            },
            batch=1,
        )
        meta = s3io.ascii_metadata(
            {"kiln-prompt-id": prompt_id, "kiln-node": node_id, "kiln-sha256": digest, **_user_metadata(metadata)}
        )
        c = s3io.client(_target(endpoint_url, region, path_style))
        entries = await _upload_all(
            c,
            bucket,
            [{"key": key, "data": body, "content_type": ctype, "metadata": meta}],
            storage_class,
            presign_seconds,
        )
        e = entries[0]
        return NodeResult(e["uri"], e.get("url", ""), ui=_ui(entries))


class LoadImageS3(engine.Node):
    """Load an image from S3 or an S3-compatible store (size limit, content-type check); IMAGE and MASK
    (1 - alpha). Re-runs when the object's ETag changes."""

    display_name = "Load Image (S3)"
    category = "image/storage"
    outputs = [Output("IMAGE", "image"), Output("MASK", "mask")]

    @staticmethod
    def fingerprint(
        bucket: str = "", key: str = "", endpoint_url: str = "", region: str = "", path_style: bool = False, **_: Any
    ) -> Any:
        try:
            c = s3io.client(_target(endpoint_url, region, path_style))
            return c.head_object(Bucket=bucket, Key=key)["ETag"]
        except Exception:
            return float("nan")  # unknown: load again (and report the real error when running)

    preflight = classmethod(_bucket_preflight)

    async def run(
        self,
        bucket: Bucket,
        key: Annotated[str, String(tooltip="object key")],
        endpoint_url: EndpointUrl = "",
        region: Region = "",
        path_style: PathStyle = False,
        max_bytes: Annotated[int, Int(min=1, max=1 << 31, tooltip="refuse larger objects")] = 64 << 20,
    ) -> tuple:
        bucket = _check_bucket(bucket)
        if not key.strip():
            raise NodeError("no key given", input_name="key", hint="set the object key to load")
        c = s3io.client(_target(endpoint_url, region, path_style))
        try:
            body, ctype, _ = await asyncio.to_thread(s3io.get, c, bucket, key, max_bytes=max_bytes)
        except NodeError:
            raise
        except Exception as exc:
            raise s3io.to_node_error(exc, action="loading", bucket=bucket, key=key) from None
        if ctype and ctype not in imageio.IMAGE_TYPES and ctype != "application/octet-stream":
            raise NodeError(
                f"s3://{bucket}/{key} has content type {ctype!r}, not an image",
                input_name="key",
                hint="point at an image object (png, jpeg, webp...)",
            )
        return await asyncio.to_thread(
            imageio.decode,
            body,
            f"s3://{bucket}/{key}",
            "key",
            "the object is corrupt or not an image; re-upload it or pick another key",
        )


NODES = [SaveImageS3, SaveFileS3, LoadImageS3]
