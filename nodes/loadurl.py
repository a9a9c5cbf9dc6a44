"""LoadImageURL: bring an image in over HTTP(S), with a size limit, a content-type check and a timeout.

Private, loopback and link-local hosts are refused unless Kiln runs with ``KILN_ALLOW_PRIVATE_URLS=1``,
so a shared graph cannot probe the machine's network or a cloud metadata service.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

from kiln import engine
from kiln.engine import Boolean, Float, Int, Output, String
from kiln.nodes.providers import imageio


class LoadImageURL(engine.Node):
    """Download an image from a URL; IMAGE and MASK (1 - alpha, as LoadImage)."""

    display_name = "Load Image (URL)"
    category = "image"
    outputs = [Output("IMAGE", "image"), Output("MASK", "mask")]

    @staticmethod
    def fingerprint(reload: bool = False, **_: Any) -> Any:
        return math.nan if reload else 0

    async def run(
        self,
        url: Annotated[str, String(tooltip="http(s) URL of a png, jpeg, webp... image")],
        max_bytes: Annotated[int, Int(min=1, max=1 << 31, tooltip="refuse larger files")] = 32 << 20,
        timeout_s: Annotated[float, Float(min=0.1, max=600.0, step=0.1)] = 30.0,
        reload: Annotated[bool, Boolean(tooltip="download again on every run instead of caching by URL")] = False,
    ) -> tuple:
        url = (url or "").strip()
        got = await imageio.fetch(url, max_bytes=max_bytes, timeout_s=timeout_s, what="LoadImageURL")
        return await asyncio.to_thread(
            imageio.decode, got.data, url, "url", "the file is corrupt or not an image; check the URL"
        )


NODES = [LoadImageURL]
