"""Helpers and fixtures: a real server on loopback (in-process, in its own thread and loop, or a `kiln serve`
subprocess), real websocket clients, the test node pack."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated

import pytest
import requests
from aiohttp import web
from websockets.sync.client import connect

from kiln.engine import Executor, Folders, Node, Registry, Socket, String, current
from kiln.server import ServerConfig, create_app
from tests.conftest import SAFETY_S, die_with_parent, wait_for

__all__ = ["SAFETY_S", "die_with_parent", "wait_for"]  # re-exported for the server test modules

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PACK_DIR = HERE / "testpack"
sys.path.insert(0, str(PACK_DIR))
import kiln_testnodes  # noqa: E402

_GATES: dict[str, tuple[threading.Event, threading.Event]] = {}


class Gate:
    """A run that stays inside its node until the test opens the gate: no race against a sleeper's clock.

    ``graph()`` is a prompt whose ``TGate`` node signals ``entered`` and then holds (interruptible) until
    ``open()``. In-process servers only (``LiveServer``): the gate is a ``threading.Event`` of this process."""

    def __init__(self) -> None:
        self.name = uuid.uuid4().hex
        self.entered, self.opened = _GATES.setdefault(self.name, (threading.Event(), threading.Event()))

    def graph(self, value: int = 7, out: str = "TShow") -> dict:
        return {
            "1": {"class_type": "TConst", "inputs": {"value": value}},
            "2": {"class_type": "TGate", "inputs": {"value": ["1", 0], "gate": self.name}},
            "out": {"class_type": out, "inputs": {"value": ["2", 0]}},
        }

    def open(self) -> None:
        self.opened.set()


class TGate(Node):
    """Signals that it runs, then holds until its ``Gate`` opens (checking for an interrupt meanwhile)."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], gate: Annotated[str, String()] = ""):
        ctx = current()
        entered, opened = _GATES[gate]
        ctx.progress(0, 1)
        entered.set()
        end = time.monotonic() + SAFETY_S
        while not opened.wait(0.02):
            ctx.check_interrupted()
            if time.monotonic() > end:
                raise RuntimeError("the test never opened this gate")
        ctx.progress(1, 1)
        return value


def make_registry(image_nodes: bool = False) -> Registry:
    reg = Registry()
    for cls in kiln_testnodes.NODES:
        reg.register(cls, python_module="custom_nodes.kiln_testnodes")
    reg.register(TGate, python_module="custom_nodes.kiln_testnodes")
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
        self.stopped = False
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
        return fut.result(SAFETY_S)

    def stop(self) -> None:
        """Stop serving and wait for the loop thread to clean up (idempotent). Gates still closed are opened
        so that no run of this server stays parked."""
        if self.stopped:
            return
        self.stopped = True
        for _, opened in _GATES.values():
            opened.set()
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # the loop is closed already: the thread has ended
            pass
        self.thread.join(SAFETY_S)
        assert not self.thread.is_alive(), "the server thread did not stop"

    # helpers ---------------------------------------------------------------------------------------
    def post(self, path: str, body=None, **kw):
        if body is not None:
            kw["data"] = json.dumps(body)
        return requests.post(self.url + path, timeout=SAFETY_S, **kw)

    def get(self, path: str, **kw):
        return requests.get(self.url + path, timeout=SAFETY_S, **kw)

    def ws(self, client_id: str | None = None, deflate: bool = False, **kw):
        """A websocket client; without ``deflate`` the server takes its batched raw-frame path."""
        url = self.ws_url + (f"?clientId={client_id}" if client_id else "")
        if not deflate:
            kw.setdefault("compression", None)
        return connect(url, open_timeout=SAFETY_S, max_size=None, **kw)


async def _acall(fn, *args):
    return fn(*args)


@pytest.fixture
def live(tmp_path):
    servers = []

    def start(**kw) -> LiveServer:
        s = LiveServer(tmp_path / f"s{len(servers)}", **kw)
        servers.append(s)
        return s

    try:
        yield start
    finally:
        stop_all(servers, LiveServer.stop)


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


def stop_all(things: list, stop) -> None:
    """``stop`` every one of ``things``, even when stopping one of them fails (the first error is raised)."""
    errors = []
    for t in things:
        try:
            stop(t)
        except Exception as exc:  # keep stopping the others
            errors.append(exc)
    if errors:
        raise errors[0]


def recv(ws):
    """The next message; a message that should come is waited for as long as the server is healthy."""
    return ws.recv(timeout=SAFETY_S)


def recv_json(ws) -> dict:
    return json.loads(recv(ws))


def recv_until_done(ws, prompt_id: str) -> list:
    """Messages (dicts for text, bytes for binary) up to and including ``executing {node: null}``."""
    msgs = []
    while True:
        m = recv(ws)
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


def kiln_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", SERVE_HARNESS, *args]


class ServeProcess:
    """A `kiln serve` subprocess on its own port (``--port 0`` unless one is given: no race for a "free" port
    with other processes); its output goes to a log file in the base folder."""

    _logs = itertools.count()

    def __init__(self, base: Path, *extra: str, port: int | None = None, custom_nodes: Path = PACK_DIR):
        self.base = base
        self.port = port or 0
        self.extra = extra
        self.custom_nodes = custom_nodes
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServeProcess:
        """Start and wait until it listens and answers. No fixed deadline: a loaded machine may take minutes to
        import torch; the wait ends when the server answers or the process exits (``SAFETY_S`` only bounds a
        hang). The temp folder is private to this server (its own TMPDIR), so nothing it leaves behind is
        mixed up with other processes' files."""
        self.tmp = self.base / f"tmp-{os.getpid()}-{next(self._logs)}"
        self.tmp.mkdir(parents=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TMPDIR=str(self.tmp))
        self.log_path = self.tmp.with_name(self.tmp.name.replace("tmp-", "serve-") + ".log")
        args = ["serve", "--port", str(self.port), "--base-dir", str(self.base)]
        args += ["--custom-nodes", str(self.custom_nodes), *self.extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                kiln_cmd(*args),
                cwd=self.base,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.port = wait_for(self._listening, "kiln serve to listen", every=0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self._answers, "kiln serve to answer", every=0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _listening(self) -> int | None:
        m = re.search(r"Kiln server listening on http://[^ ]*:(\d+)", self.log())
        if m:
            return int(m.group(1))
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return None

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return requests.get(self.url + "/api/features", timeout=SAFETY_S).status_code == 200
        except requests.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL (a crash); waits until the process is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(SAFETY_S)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SAFETY_S)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def serve_proc(tmp_path):
    """Start ``kiln serve`` subprocesses; every one started (even one that never became ready) is killed at
    the end of the test, and each dies with the test process if that is killed."""
    procs: list[ServeProcess] = []

    def start(*extra: str, base: Path | None = None, **kw) -> ServeProcess:
        p = ServeProcess(base or tmp_path, *extra, **kw)
        procs.append(p)  # before start(): a start that fails or times out is still cleaned up
        return p.start()

    try:
        yield start
    finally:
        stop_all(procs, ServeProcess.kill)
