"""A fault-injecting HTTP proxy in front of the moto S3 server (127.0.0.1 only).

Requests pass through unchanged (Host header kept, so signatures still hold) unless a rule matches:
then the proxy answers with an S3-style XML error instead, ``times`` times (or forever with -1).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.conftest import SAFETY_S

_HOP = {"transfer-encoding", "content-length", "connection", "content-encoding", "keep-alive"}


@dataclass
class Rule:
    method: str
    query_has: str = ""  # e.g. "partNumber=2"
    path_has: str = ""
    status: int = 500
    code: str = "InternalError"
    times: int = 1
    delay: float = 0.0  # with status 0: forward after this many seconds instead of failing
    # with status 0: set when a matching request arrives; it is forwarded only once ``hold`` is set
    arrived: threading.Event | None = None
    hold: threading.Event | None = None


class S3FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int]] = []
        self.port = 0

    def start(self) -> S3FaultProxy:
        ready = threading.Event()

        def main() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self.handle)
            self.runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            self.session = self.loop.run_until_complete(self._session())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True, name="s3-fault-proxy")
        self.thread.start()
        while not ready.wait(0.5):  # readiness, bounded by the thread being alive
            assert self.thread.is_alive(), "the S3 proxy thread died before it was ready"
        return self

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(auto_decompress=False)

    def stop(self) -> None:
        async def close() -> None:
            await self.session.close()
            await self.runner.cleanup()

        for rule in self.rules:  # nothing held stays parked
            if rule.hold is not None:
                rule.hold.set()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(SAFETY_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SAFETY_S)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _match(self, request: web.Request) -> Rule | None:
        for rule in self.rules:
            if rule.times == 0 or rule.method != request.method:
                continue
            if rule.query_has and rule.query_has not in request.query_string:
                continue
            if rule.path_has and rule.path_has not in request.path:
                continue
            if rule.times > 0:
                rule.times -= 1
            return rule
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rule = self._match(request)
        if rule is not None and rule.status == 0:
            if rule.arrived is not None:
                rule.arrived.set()
            end = time.monotonic() + SAFETY_S
            while rule.hold is not None and not rule.hold.is_set() and time.monotonic() < end:
                await asyncio.sleep(0.01)
            await asyncio.sleep(rule.delay)
            rule = None
        if rule is not None:
            self.log.append((request.method, request.path_qs, rule.status))
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                f"<Message>injected {rule.code}</Message><RequestId>FAULT123</RequestId></Error>"
            )
            return web.Response(
                status=rule.status,
                body=xml.encode(),
                content_type="application/xml",
                headers={"x-amz-request-id": "FAULT123"},
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self.session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
        ) as up:
            data = await up.read()
            self.log.append((request.method, request.path_qs, up.status))
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            return web.Response(status=up.status, body=data, headers=out_headers)
