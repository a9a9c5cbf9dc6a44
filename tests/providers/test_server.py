"""Provider nodes through the real server: ComfyUI's HTTP + websocket protocol on loopback.

Costs and S3 URIs reach clients in ``executed`` and history; partial images arrive as binary preview
frames; the API key appears in no websocket message, no history entry and nothing the server stores.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path

import pytest
import requests
from aiohttp import web
from websockets.sync.client import connect

from kiln import engine
from tests.conftest import SAFETY_S
from tests.providers.conftest import API_KEY
from tests.providers.test_graph import load_graph


class Server:
    def __init__(self, base: Path, registry: engine.Registry):
        from kiln.server import ServerConfig, create_app

        self.executor = engine.Executor(registry, folders=engine.Folders(base))
        self.app = create_app(self.executor, ServerConfig(port=0, data_dir=base / "data"))
        self.data_dir = base / "data"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.app, handle_signals=False)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        while not ready.wait(0.5):  # readiness, bounded by the server thread being alive
            assert self.thread.is_alive(), "the server thread died before it was ready"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SAFETY_S)

    def run(self, graph: dict, **extra_data) -> tuple[str, list, list]:
        """Submit ``graph`` as a websocket client would; (prompt_id, JSON messages, binary frames)."""
        client_id = uuid.uuid4().hex
        texts, frames = [], []
        with connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", open_timeout=SAFETY_S, max_size=None) as ws:
            r = requests.post(
                self.url + "/prompt",
                timeout=SAFETY_S,
                data=json.dumps({"prompt": graph, "client_id": client_id, "extra_data": extra_data}),
            )
            assert r.status_code == 200, r.text
            pid = r.json()["prompt_id"]
            while True:
                msg = ws.recv(timeout=SAFETY_S)
                if isinstance(msg, bytes):
                    frames.append(msg)
                    continue
                texts.append(msg)
                m = json.loads(msg)
                if m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == pid:
                    return pid, texts, frames


@pytest.fixture()
def server(registry, tmp_path):
    s = Server(tmp_path, registry)
    try:
        yield s
    finally:
        s.stop()


def test_costs_uris_and_no_keys_over_the_protocol(server, openai_server, s3, moto_url):
    pid, texts, frames = server.run(load_graph(s3.bucket, moto_url), max_cost=1.0)
    executed = {
        json.loads(t)["data"]["node"]: json.loads(t)["data"]["output"]
        for t in texts
        if json.loads(t)["type"] == "executed"
    }
    assert executed["2"]["kiln_cost"][0]["model"] == "gpt-image-1" and executed["2"]["kiln_cost"][0]["usd"] > 0
    assert executed["4"]["s3"][0]["uri"].startswith(f"s3://{s3.bucket}/kiln/")
    hist = requests.get(f"{server.url}/history/{pid}", timeout=SAFETY_S).json()[pid]
    assert hist["status"]["status_str"] == "success"
    assert hist["outputs"]["2"] == executed["2"] and hist["outputs"]["4"] == executed["4"]
    everything = "".join(texts) + json.dumps(hist)
    assert API_KEY not in everything
    for f in server.data_dir.rglob("*"):
        if f.is_file():
            assert API_KEY.encode() not in f.read_bytes(), f


def test_partial_images_arrive_as_preview_frames(server, openai_server):
    g = {
        "r": {
            "class_type": "OpenAIResponsesImage",
            "inputs": {"prompt": "a kettle", "size": "1024x1024", "quality": "low", "partial_images": 2},
        },
        "s": {"class_type": "PreviewImage", "inputs": {"images": ["r", 0]}},
    }
    pid, texts, frames = server.run(g, preview_method="auto")
    types = [json.loads(t)["type"] for t in texts]
    assert "execution_success" in types, texts[-3:]
    previews = [f for f in frames if int.from_bytes(f[:4], "big") == 1]
    assert len(previews) >= 2  # the two partial images (PreviewImage itself sends no frame)
    fmt = int.from_bytes(previews[0][4:8], "big")
    assert fmt in (1, 2) and previews[0][8:12] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
