"""Helpers and fixtures: a real server on loopback (in-process, in its own thread and loop, or a `kiln serve`
subprocess), real websocket clients, the test node pack."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from aiohttp import web
from websockets.sync.client import connect

from kiln.engine import Executor, Folders, Registry
from kiln.server import ServerConfig, create_app

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PACK_DIR = HERE / "testpack"
sys.path.insert(0, str(PACK_DIR))
import kiln_testnodes  # noqa: E402


def make_registry(image_nodes: bool = False) -> Registry:
    reg = Registry()
    for cls in kiln_testnodes.NODES:
        reg.register(cls, python_module="custom_nodes.kiln_testnodes")
    if image_nodes:
        from kiln import nodes

        nodes.register_builtin(reg)
    return reg


class LiveServer:
    """The aiohttp app on 127.0.0.1:<free port>, served from a background thread."""

    def __init__(self, base: Path, registry: Registry | None = None, cache: str | None = None, **cfg):
        self.base = base
        self.folders = Folders(base)
        self.executor = Executor(registry or make_registry(), cache=cache, folders=self.folders)
        cfg.setdefault("data_dir", base / "data")
        self.config = ServerConfig(port=0, **cfg)
        self.app = create_app(self.executor, self.config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        # readiness, not a deadline: wait as long as the server thread is alive (a loaded machine is slow)
        while not self._ready.wait(0.5):
            assert self.thread.is_alive(), "server thread died before it was ready"
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    @property
    def service(self):
        from kiln.server.keys import SERVICE

        return self.app[SERVICE]

    def call(self, fn, *args):
        """Run ``fn`` on the server's loop thread and return its result."""
        fut = asyncio.run_coroutine_threadsafe(_acall(fn, *args), self.loop)
        return fut.result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)

    # helpers ---------------------------------------------------------------------------------------
    def post(self, path: str, body=None, **kw):
        if body is not None:
            kw["data"] = json.dumps(body)
        return requests.post(self.url + path, timeout=300, **kw)

    def get(self, path: str, **kw):
        return requests.get(self.url + path, timeout=300, **kw)

    def ws(self, client_id: str | None = None, deflate: bool = False, **kw):
        """A websocket client; without ``deflate`` the server takes its batched raw-frame path."""
        url = self.ws_url + (f"?clientId={client_id}" if client_id else "")
        if not deflate:
            kw.setdefault("compression", None)
        return connect(url, open_timeout=10, max_size=None, **kw)


async def _acall(fn, *args):
    return fn(*args)


@pytest.fixture
def live(tmp_path):
    servers = []

    def start(**kw) -> LiveServer:
        s = LiveServer(tmp_path / f"s{len(servers)}", **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(live) -> LiveServer:
    return live()


# -- graphs -----------------------------------------------------------------------------------------
def chain(n: int = 3, value: int = 1, out: str = "TShow") -> dict:
    g = {"1": {"class_type": "TConst", "inputs": {"value": value}}}
    for i in range(2, n + 1):
        g[str(i)] = {"class_type": "TAdd", "inputs": {"a": [str(i - 1), 0], "b": 1}}
    g["out"] = {"class_type": out, "inputs": {"value": [str(n), 0]}}
    return g


def sleeper(seconds: float = 1.0, steps: int = 10, value: int = 7, out: str = "TShow", **out_inputs) -> dict:
    return {
        "1": {"class_type": "TConst", "inputs": {"value": value}},
        "2": {"class_type": "TSleep", "inputs": {"value": ["1", 0], "seconds": seconds, "steps": steps}},
        "out": {"class_type": out, "inputs": {"value": ["2", 0], **out_inputs}},
    }


def recv_until_done(ws, prompt_id: str, timeout: float = 20) -> list:
    """Messages (dicts for text, bytes for binary) up to and including ``executing {node: null}``."""
    msgs = []
    deadline = time.time() + timeout
    while True:
        m = ws.recv(timeout=max(0.1, deadline - time.time()))
        if isinstance(m, bytes):
            msgs.append(m)
            continue
        j = json.loads(m)
        msgs.append(j)
        d = j.get("data") or {}
        if j["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id:
            return msgs


def types(msgs) -> list:
    return [m["type"] if isinstance(m, dict) else f"bin{int.from_bytes(m[:4], 'big')}" for m in msgs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a real `kiln serve` subprocess -----------------------------------------------------------------
SERVE_HARNESS = """
import argparse, sys
from kiln.cli_server import add_serve_parser, add_submit_parser
p = argparse.ArgumentParser(prog="kiln")
sub = p.add_subparsers(required=True)
add_serve_parser(sub); add_submit_parser(sub)
args = p.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def die_with_parent() -> None:
    """In the child before exec: be killed when the test process dies, so no server outlives a killed run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def kiln_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", SERVE_HARNESS, *args]


class ServeProcess:
    def __init__(self, base: Path, *extra: str, port: int | None = None, custom_nodes: Path = PACK_DIR):
        self.base = base
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "serve",
            "--port",
            str(self.port),
            "--base-dir",
            str(base),
            "--custom-nodes",
            str(custom_nodes),
            *extra,
        ]
        self.proc = None

    def start(self) -> ServeProcess:
        """Start and wait until it answers. No fixed deadline: a loaded machine may take minutes to import
        torch; the wait ends when the server answers or the process exits (and pytest's own timeout bounds it)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.log = open(self.base / f"serve-{time.time():.0f}.log", "ab")
        self.proc = subprocess.Popen(
            kiln_cmd(*self.args),
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}")
            try:
                if requests.get(self.url + "/api/features", timeout=5).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def serve_proc(tmp_path):
    procs = []

    def start(*extra: str, base: Path | None = None, **kw) -> ServeProcess:
        p = ServeProcess(base or tmp_path, *extra, **kw).start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
