"""Small prompts, Kiln vs ComfyUI, measured by one client speaking only ComfyUI's protocol.

    python benchmarks/side_by_side.py --comfy-dir /path/to/ComfyUI [--comfy-python PY] [--quick]
    python benchmarks/side_by_side.py --comfy-url http://127.0.0.1:8188      # a ComfyUI already running
    python benchmarks/side_by_side.py                                        # Kiln only

The client knows nothing of Kiln: it opens ``/ws?clientId=...``, POSTs ``/prompt`` with that client id, and
counts a prompt done when the websocket says ``executing`` with ``node: null`` for its prompt id (what
ComfyUI's own clients wait for). The same code drives both servers, in this one run.

Cases (graph: chain(N) = EmptyImage 64x64 -> N x ImageInvert -> PreviewImage, a new colour per prompt so
nothing is served from cache):
- latency: chain(10) one at a time, submit -> done, median of 30 after a warm-up prompt.
- throughput: 1000 chain(10) prompts POSTed back to back over one keep-alive connection while the websocket
  counts completions; completed prompts per second from the first POST to the last completion.
- loaded: both again beside a CPU hog (one busy process per core), since that is where small-prompt
  latency used to suffer.

Every server is up for the whole run and they take turns: latency prompts go to each server in turn (the
order rotating), throughput in blocks of a third, each server's block in turn, so a disturbance of the
machine (another process, a page reclaim) falls on all of them rather than on whichever ran then.

Kiln is started as ``kiln serve`` (its default: one worker process) and as ``kiln serve --workers 0``
(in-process executor), each in a private temp folder; ComfyUI with ``--cpu`` from ``--comfy-dir``. ComfyUI
is not part of Kiln and nothing from it is imported here: it runs as a separate server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


def chain(n: int, color: int) -> dict:
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}}
    prev = "1"
    for i in range(2, n + 2):
        g[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [prev, 0]}}
        prev = str(i)
    g[str(n + 2)] = {"class_type": "PreviewImage", "inputs": {"images": [prev, 0]}}
    return g


class Client:
    """A ComfyUI-protocol client: one websocket, one HTTP session, completions by prompt id."""

    def __init__(self, url: str):
        self.url = url
        self.cid = uuid.uuid4().hex
        self.done: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.errors: list[str] = []

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2)
        )  # the websocket + one keep-alive connection
        self.ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.cid}", max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # preview frames
            m = json.loads(msg.data)
            d = m.get("data") or {}
            if m.get("type") == "execution_error":
                self.errors.append(str(d.get("exception_message")))
            if m.get("type") == "executing" and d.get("node") is None and d.get("prompt_id"):
                pid = d["prompt_id"]
                self.done[pid] = time.perf_counter()
                fut = self.waiters.pop(pid, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def submit(self, graph: dict) -> str:
        body = json.dumps({"prompt": graph, "client_id": self.cid})
        async with self.session.post(
            f"{self.url}/prompt", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                raise SystemExit(f"{self.url} refused a prompt: {r.status} {data}")
            return data["prompt_id"]

    async def wait(self, pid: str) -> None:
        if pid in self.done:
            return
        fut = self.waiters.setdefault(pid, asyncio.get_running_loop().create_future())
        await asyncio.wait_for(fut, 600)

    async def latency(self, n: int, color0: int, warm: bool = True) -> list[float]:
        if warm:  # imports, the first PNG encoder call
            await self.wait(await self.submit(chain(10, color0)))
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            await self.wait(await self.submit(chain(10, color0 + 1 + i)))
            out.append((time.perf_counter() - t0) * 1000)
        return out

    async def throughput(self, n: int, color0: int) -> tuple[float, float, float]:
        """(completed/s, accepted/s, seconds) for n prompts POSTed back to back."""
        t0 = time.perf_counter()
        ids = [await self.submit(chain(10, (color0 + i) % 16777216)) for i in range(n)]
        accepted = n / (time.perf_counter() - t0)
        for pid in ids:
            await self.wait(pid)
        dt = max(self.done[p] for p in ids) - t0
        return n / dt, accepted, dt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess, ready once ``GET /queue`` answers; always stopped on exit."""

    def __init__(self, label: str, cmd: list[str], cwd: Path, port: int, log: Path, env: dict | None = None):
        self.label, self.cmd, self.cwd, self.log, self.env = label, cmd, cwd, log, env
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Proc:
        self.fh = open(self.log, "wb")
        self.p = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self.fh, stderr=subprocess.STDOUT)
        import urllib.request

        while True:
            if self.p.poll() is not None:
                raise SystemExit(f"{self.label} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/queue", timeout=5).read()
                break
            except OSError:
                time.sleep(0.2)
        if "kiln" in self.label:
            self._wait_workers()
        return self

    def _wait_workers(self) -> None:
        import urllib.request

        while True:
            ws = json.loads(urllib.request.urlopen(self.url + "/api/workers", timeout=30).read())["workers"]
            if all(w["state"] == "idle" for w in ws):
                return
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.fh.close()


def kiln_server(base: Path, *args: str) -> Proc:
    port = free_port()
    d = base / ("kiln" + "".join(a.strip("-") for a in args))
    d.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "kiln", "serve", "--port", str(port), "--base-dir", str(d)]
    cmd += ["--log-level", "WARNING", *args]
    return Proc("kiln serve " + " ".join(args), cmd, d, port, d / "serve.log", env)


def comfy_server(base: Path, comfy_dir: Path, python: str) -> Proc:
    port = free_port()
    d = base / "comfy"
    d.mkdir()
    cmd = [python, str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    cmd += ["--output-directory", str(d / "output"), "--temp-directory", str(d), "--disable-auto-launch"]
    return Proc("ComfyUI", cmd, comfy_dir, port, d / "serve.log", dict(os.environ))


def _spin() -> None:
    while True:
        pass


class Hog:
    """One busy process per core, for the 'loaded' runs."""

    def __enter__(self) -> Hog:
        self.ps = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
        for p in self.ps:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.ps:
            p.kill()
            p.join()


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>14}  {note}", flush=True)


async def measure(urls: dict[str, str], n_lat: int, n_tp: int, color0: int, blocks: int = 3) -> dict:
    """Latency and throughput of every server, taking turns (module docstring)."""
    out: dict[str, dict] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = {label: await stack.enter_async_context(Client(url)) for label, url in urls.items()}
        labels = list(clients)
        lat: dict[str, list[float]] = {label: [] for label in labels}
        for c in clients.values():
            await c.latency(0, color0)  # the warm-up prompt
        for i in range(n_lat):
            for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
                lat[label] += await clients[label].latency(1, color0 + 1 + i, warm=False)
        done = {label: 0.0 for label in labels}
        sent = {label: 0.0 for label in labels}
        per = max(1, n_tp // blocks)
        for b in range(blocks):
            for label in labels[b % len(labels) :] + labels[: b % len(labels)]:
                rate, accepted, dt = await clients[label].throughput(per, color0 + 10_000 + b * per)
                done[label] += dt
                sent[label] += per / accepted
        for label, c in clients.items():
            if c.errors:
                raise SystemExit(f"{urls[label]}: execution errors: {c.errors[:3]}")
            n = per * blocks
            out[label] = {
                "median": statistics.median(lat[label]),
                "min": min(lat[label]),
                "rate": n / done[label],
                "accepted": n / sent[label],
                "dt": done[label],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy-dir", type=Path, help="a ComfyUI checkout to start with --cpu")
    ap.add_argument("--comfy-python", default=sys.executable, help="the Python that has ComfyUI's requirements")
    ap.add_argument("--comfy-url", help="a ComfyUI server already running (instead of --comfy-dir)")
    ap.add_argument("--quick", action="store_true", help="10 latency prompts and 200 for throughput")
    ap.add_argument("--no-load", action="store_true", help="skip the runs beside a CPU hog")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    n_lat, n_tp = (10, 200) if args.quick else (30, 1000)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"chain(10): latency median of {n_lat} one at a time; throughput {n_tp} prompts, completed per second")
    base = Path(tempfile.mkdtemp(prefix="kiln-side-"))
    results: dict[str, dict] = {}
    servers: list[tuple[str, object]] = [
        ("kiln serve (1 worker)", lambda: kiln_server(base, "--workers", "1")),
        ("kiln serve --workers 0", lambda: kiln_server(base, "--workers", "0")),
    ]
    if args.comfy_dir:
        servers.append(("ComfyUI --cpu", lambda: comfy_server(base, args.comfy_dir, args.comfy_python)))
    try:
        with contextlib.ExitStack() as stack:
            urls = {label: stack.enter_context(make()).url for label, make in servers}
            if args.comfy_url:
                urls["ComfyUI at " + args.comfy_url] = args.comfy_url
            for k, loaded in enumerate((False, True) if not args.no_load else (False,)):
                print("\nbeside a CPU hog (one busy process per core):" if loaded else "\nquiet machine:")
                with Hog() if loaded else _Null():
                    rs = asyncio.run(measure(urls, n_lat, n_tp, 1 + 1_000_000 * k))
                for label, r in rs.items():
                    results[("loaded " if loaded else "quiet ") + label] = r
                    _print(label, r)
                _ratios(results, "loaded " if loaded else "quiet ")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _print(label: str, r: dict) -> None:
    row(f"{label}: one prompt", f"{r['median']:.1f} ms", f"median (min {r['min']:.1f})")
    row(f"{label}: throughput", f"{r['rate']:.0f}/s", f"completed in {r['dt']:.2f} s; accepted {r['accepted']:.0f}/s")


def _ratios(results: dict, prefix: str) -> None:
    comfy = next((v for k, v in results.items() if k.startswith(prefix) and "ComfyUI" in k), None)
    if comfy is None:
        return
    for k, v in results.items():
        if k.startswith(prefix) and "kiln" in k:
            name = re.sub(r"^\w+ ", "", k)
            row(
                f"{name} / ComfyUI",
                f"{v['rate'] / comfy['rate']:.2f}x",
                f"throughput; latency {v['median'] / comfy['median']:.2f}x of ComfyUI's",
            )


if __name__ == "__main__":
    main()
