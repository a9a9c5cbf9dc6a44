"""The completion webhook: one JSON POST per finished prompt, retried on network errors and 5xx."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("kiln.server")


async def post_webhook(session: aiohttp.ClientSession, url: str, body: dict, attempts: int = 3) -> bool:
    for attempt in range(attempts):
        try:
            async with session.post(url, json=body) as resp:
                if resp.status < 500:
                    return True
        except Exception as exc:
            log.warning("webhook %s for prompt %s failed: %s", url, body.get("prompt_id"), exc)
        await asyncio.sleep(0.5 * 2**attempt)
    return False
