"""Image bytes in and out of provider calls, and bounded downloads.

Decoding happens in a worker thread (``asyncio.to_thread``) so twenty provider nodes finishing together
do not queue behind each other's PNG decoding on the event loop.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kiln.engine import NodeError
from kiln.nodes.common import tensor_to_pil

Image.MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs well above any provider's output

IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff"}


PROVIDER_HINT = "the provider sent a broken or non-image payload; retry, or report it"


def decode(
    data: bytes, what: str, input_name: str | None = None, hint: str = PROVIDER_HINT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(IMAGE [1,H,W,3], MASK [1,H,W]) from encoded bytes; NodeError naming ``what`` if unreadable."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise NodeError(
            f"{what} is not an image Kiln can decode ({len(data)} bytes: {type(exc).__name__})",
            input_name=input_name,
            hint=hint,
        ) from exc
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    if b"c2pa" in data:  # a provider's own C2PA manifest: kept for the saver (c2pa_sign.remember_source)
        from . import c2pa_sign

        c2pa_sign.remember_source(data, arr)
    # one pass to float32 (same values as nodes.common.pil_to_tensor, a third of its time)
    image = torch.from_numpy(np.divide(arr[..., :3], np.float32(255), dtype=np.float32)).unsqueeze(0)
    if has_alpha:
        mask = torch.from_numpy(
            np.subtract(np.float32(1), np.divide(arr[..., 3], np.float32(255), dtype=np.float32))
        ).unsqueeze(0)
    else:
        mask = torch.zeros((1, img.height, img.width), dtype=torch.float32)
    return image, mask


async def decode_all(blobs: list[bytes], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode several images off the loop and batch them (all must share a size)."""
    pairs = await asyncio.gather(*(asyncio.to_thread(decode, b, f"{what} #{i}") for i, b in enumerate(blobs)))
    sizes = {tuple(p[0].shape[1:3]) for p in pairs}
    if len(sizes) > 1:
        raise NodeError(
            f"{what}: the images came back in different sizes {sorted(sizes)} and cannot form one IMAGE batch",
            hint="request one image per node, or set an explicit size",
        )
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def encode_png(image: torch.Tensor, alpha: np.ndarray | None = None) -> bytes:
    """One ``[H,W,C]`` image (or ``[1,H,W,C]``) as PNG bytes, optionally with an alpha plane (uint8 HxW)."""
    img = tensor_to_pil(image if image.ndim == 4 else image.unsqueeze(0))[0].convert("RGB")
    if alpha is not None:
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(alpha))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mask_to_alpha(mask: torch.Tensor, height: int, width: int, input_name: str = "mask") -> np.ndarray:
    """A MASK (1 = change) as the alpha plane the OpenAI edit API wants (transparent = change)."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise NodeError(f"expected a MASK [batch, height, width], got shape {tuple(mask.shape)}", input_name=input_name)
    m = mask[0]
    if tuple(m.shape) != (height, width):
        raise NodeError(
            f"the mask is {m.shape[1]}x{m.shape[0]} but the image is {width}x{height}",
            input_name=input_name,
            hint="resize the mask to the image size (e.g. with a mask resize node) or draw it on this image",
        )
    return np.clip(255.0 * (1.0 - m.detach().cpu().float().numpy()), 0, 255).astype(np.uint8)


@dataclass
class Fetched:
    data: bytes
    content_type: str
    url: str


def check_url(url: str, input_name: str = "url") -> None:
    """Refuse non-http(s) URLs, and private or link-local hosts unless ``KILN_ALLOW_PRIVATE_URLS=1``
    (a graph must not turn Kiln into a probe of the machine's own network or cloud metadata)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise NodeError(
            f"{url!r} is not an http(s) URL",
            input_name=input_name,
            hint="give a full URL such as https://example.com/image.png",
        )
    if os.environ.get("KILN_ALLOW_PRIVATE_URLS") == "1":
        return
    try:
        infos = socket.getaddrinfo(u.hostname, None)
    except socket.gaierror as exc:
        raise NodeError(f"cannot resolve host {u.hostname!r}: {exc}", input_name=input_name) from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise NodeError(
                f"{url!r} points at a private address ({ip})",
                input_name=input_name,
                hint="set KILN_ALLOW_PRIVATE_URLS=1 in Kiln's environment to allow local hosts",
            )


async def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    what: str,
    input_name: str = "url",
    allowed_types: set[str] | None = IMAGE_TYPES,
    check: bool = True,
) -> Fetched:
    """GET ``url`` with a size limit (enforced while streaming), a timeout and a content-type check.

    Redirects are followed by hand (at most 5), and each hop's host is checked like the first, so a
    public URL cannot redirect into the private network."""
    from urllib.parse import urljoin

    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(6):
                if check:
                    check_url(url, input_name)
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    return await _read(resp, url, max_bytes, what, input_name, allowed_types)
            raise NodeError(f"{what}: too many redirects", input_name=input_name, hint="use the final URL")
    except asyncio.TimeoutError as exc:
        raise NodeError(
            f"{what}: GET {url} took longer than {timeout_s:g}s",
            input_name=input_name,
            hint="raise timeout_s or check the host",
        ) from exc
    except aiohttp.ClientError as exc:
        raise NodeError(f"{what}: GET {url} failed: {exc}", input_name=input_name) from exc


async def _read(resp, url: str, max_bytes: int, what: str, input_name: str, allowed_types: set[str] | None) -> Fetched:
    if resp.status != 200:
        raise NodeError(
            f"{what}: GET {url} returned HTTP {resp.status}",
            input_name=input_name,
            hint="check the URL; provider URLs expire after about an hour",
        )
    ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if allowed_types is not None and ctype not in allowed_types:
        raise NodeError(
            f"{what}: {url} has content type {ctype or 'none'!r}, not an image",
            input_name=input_name,
            hint=f"point at a file of type {sorted(allowed_types)}",
        )
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise NodeError(
            f"{what}: {url} is {declared} bytes, over the limit of {max_bytes}",
            input_name=input_name,
            hint="raise max_bytes or use a smaller file",
        )
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > max_bytes:
            raise NodeError(
                f"{what}: {url} is larger than the limit of {max_bytes} bytes",
                input_name=input_name,
                hint="raise max_bytes or use a smaller file",
            )
    return Fetched(bytes(buf), ctype, url)
