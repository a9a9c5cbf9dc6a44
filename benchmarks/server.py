"""Server benchmarks against a running ``kiln serve`` (started here on a free loopback port unless --url).

    python benchmarks/server.py [--url http://127.0.0.1:8188] [--quick]

1. 1000 small unique prompts posted back-to-back over one keep-alive connection: prompts/s accepted.
   ComfyUI here: 81/s; target >= 10x.
2. chain(500) (EmptyImage -> 500 x ImageInvert -> PreviewImage), end to end over HTTP + websocket, and the
   websocket bytes the client received for it. ComfyUI: 17.95 s and 49.9 MB; targets <= 60 ms, <= 300 KB.
3. 100 concurrent websocket clients each running 10 prompts one after another: p50/p99 latency from a node finishing (a
   timestamp taken inside the node) to its ``executed`` message reaching its client.
4. The same with 10 more clients that submit prompts and then stop reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]

STAMP_NODE = '''
import time
from typing import Annotated
from kiln.engine import Int, Node, NodeResult


class BenchStamp(Node):
    """Output node whose UI is the wall-clock time at which it finished."""

    output_node = True
    cacheable = False

    def run(self, tag: Annotated[int, Int(min=0, max=10**9)] = 0):
        return NodeResult(ui={"t": [time.time()], "tag": [tag]})


NODES = [BenchStamp]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    nodes_dir = tmp / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / "bench_stamp.py").write_text(STAMP_NODE)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiln",
            "serve",
            "--port",
            str(port),
            "--base-dir",
            str(tmp),
            "--custom-nodes",
            str(nodes_dir),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/api/features", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("kiln serve did not start")


def small_prompt(i: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def chain_prompt(n: int, color: int) -> dict:
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}}
    prev = "1"
    for i in range(2, n + 2):
        g[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [prev, 0]}}
        prev = str(i)
    g["out"] = {"class_type": "PreviewImage", "inputs": {"images": [prev, 0]}}
    return g


def _post_many(url: str, bodies: list[bytes]) -> list[str]:
    """POST each body in turn over one keep-alive connection (a lean client, so the server is measured)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    ids = []
    for body in bodies:
        conn.request("POST", "/prompt", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200, data
        ids.append(json.loads(data)["prompt_id"])
    conn.close()
    return ids


async def bench_throughput(url: str, n: int, connections: int = 1) -> None:
    stamp = (int(time.time() * 10) % 1000) * 10000 + connections * 1000
    bodies = [json.dumps({"prompt": small_prompt((stamp + i) % 16777216)}).encode() for i in range(n)]
    per = [bodies[k::connections] for k in range(connections)]
    t0 = time.perf_counter()
    ids = await asyncio.gather(*[asyncio.to_thread(_post_many, url, chunk) for chunk in per])
    dt = time.perf_counter() - t0
    last = ids[0][-1]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/api/prompt/{last}", params={"wait": "true", "timeout": "600"}) as r:
            st = (await r.json())["status"]
    total = time.perf_counter() - t0
    how = "back-to-back on one connection" if connections == 1 else f"from {connections} connections at once"
    print(
        f"1. {n} small unique prompts posted {how}: {n / dt:,.0f} prompts/s accepted "
        f"({dt * 1000 / n:.2f} ms each; executed after {total:.2f} s, last: {st}). "
        f"ComfyUI: 81/s, target >= 810/s"
    )


async def run_one(s: aiohttp.ClientSession, url: str, ws, graph: dict, cid: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    async with s.post(url + "/prompt", data=json.dumps({"prompt": graph, "client_id": cid})) as r:
        pid = (await r.json())["prompt_id"]
    nbytes = nmsg = 0
    while True:
        m = await ws.receive()
        nbytes += len(m.data)
        nmsg += 1
        if m.type == aiohttp.WSMsgType.TEXT:
            j = json.loads(m.data)
            if j["type"] == "executing" and j["data"].get("node") is None and j["data"].get("prompt_id") == pid:
                return time.perf_counter() - t0, nbytes, nmsg


async def bench_chain(url: str, n: int, reps: int) -> None:
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url + "/ws?clientId=chainbench", max_msg_size=0)
        await ws.receive()
        await run_one(s, url, ws, chain_prompt(n, 1), "chainbench")  # warm-up (imports, first PNG)
        results = [await run_one(s, url, ws, chain_prompt(n, 100 + k), "chainbench") for k in range(reps)]
        await ws.close()
    times = sorted(r[0] for r in results)
    b = results[0][1]
    base = await asyncio.to_thread(_engine_alone, n, reps)
    print(
        f"2. chain({n}) end to end over HTTP+ws: median {statistics.median(times) * 1000:.1f} ms "
        f"(min {times[0] * 1000:.1f}, max {times[-1] * 1000:.1f}, {reps} uncached runs); "
        f"websocket {b / 1000:.1f} KB in {results[0][2]} messages. ComfyUI: 17.95 s, 49.9 MB; "
        f"targets <= 60 ms, <= 300 KB"
    )
    print(
        f"   the same graph in the engine alone, in this process, no server: median {base * 1000:.1f} ms "
        f"(the rest is HTTP, websocket, event log and this machine's load)"
    )


def _engine_alone(n: int, reps: int) -> float:
    sys.path.insert(0, str(ROOT))
    from kiln.engine import Graph, validate
    from kiln.runtime import make_executor

    with tempfile.TemporaryDirectory() as d:
        ex = make_executor(base_dir=d)
        times = []
        for k in range(reps + 1):
            g = Graph.from_json(chain_prompt(n, 5000 + k))
            t0 = time.perf_counter()
            ex.run(g, validation=validate(g, ex.registry), sink=lambda e: None)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _stamp_graph(tag: int) -> dict:
    return {"s": {"class_type": "BenchStamp", "inputs": {"tag": tag}}}


async def _client(s, url: str, idx: int, prompts: int, lat: list) -> None:
    """One client running its prompts one after the other: submit, read until its prompt is done, repeat."""
    cid = f"c{idx}"
    ws = await s.ws_connect(f"{url}/ws?clientId={cid}", max_msg_size=0)
    await ws.receive()
    for k in range(prompts):
        async with s.post(
            url + "/prompt", data=json.dumps({"prompt": _stamp_graph(idx * 1000 + k), "client_id": cid})
        ) as r:
            pid = (await r.json())["prompt_id"]
        while True:
            m = await ws.receive()
            if m.type != aiohttp.WSMsgType.TEXT:
                if m.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    raise RuntimeError(f"client {cid} was disconnected")
                continue
            j = json.loads(m.data)
            if j["type"] == "executed" and j["data"]["node"] == "s":
                lat.append(time.time() - j["data"]["output"]["t"][0])
            elif j["type"] == "executing" and j["data"].get("node") is None and j["data"]["prompt_id"] == pid:
                break
    await ws.close()


def _stalled_client(url: str, idx: int, prompts: int) -> socket.socket:
    """A raw websocket that completes the handshake, submits prompts addressed to it, and never reads."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(
        (
            f"GET /ws?clientId=stalled{idx} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


async def bench_fanout(url: str, clients: int, prompts: int, stalled: int) -> None:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:  # warm-up, not measured
        await asyncio.gather(*[_client(s, url, 500 + i, 2, []) for i in range(clients)])
    lat: list[float] = []
    socks = [_stalled_client(url, i, prompts) for i in range(stalled)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        for i in range(stalled):  # work addressed to the stalled clients, interleaved with the others'
            for k in range(prompts):
                await s.post(
                    url + "/prompt",
                    data=json.dumps({"prompt": _stamp_graph(900000 + i * 100 + k), "client_id": f"stalled{i}"}),
                )
        t0 = time.perf_counter()
        await asyncio.gather(*[_client(s, url, i, prompts, lat) for i in range(clients)])
        dt = time.perf_counter() - t0
    for sk in socks:
        sk.close()
    lat.sort()
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    label = "3." if not stalled else "4."
    extra = f" plus {stalled} clients that stopped reading" if stalled else ""
    print(
        f"{label} {clients} websocket clients x {prompts} prompts{extra}: node finished -> executed received "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(lat)} samples, {dt:.1f} s)"
    )


async def main(args) -> None:
    url = args.url
    proc = None
    tmp = None
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="kiln-bench-")
        proc, url = start_server(Path(tmp.name))
        print(f"started kiln serve at {url}")
    try:
        only = set(args.only.split(","))
        if "1" in only:
            await asyncio.to_thread(
                _post_many, url, [json.dumps({"prompt": small_prompt(16000000 + i)}).encode() for i in range(50)]
            )  # warm-up, not measured
            await bench_throughput(url, 200 if args.quick else 1000)
            await bench_throughput(url, 200 if args.quick else 1000, connections=8)
        if "2" in only:
            await bench_chain(url, 500, 3 if args.quick else 11)
        clients = 20 if args.quick else 100
        if "3" in only:
            await bench_fanout(url, clients, 10, 0)
        if "4" in only:
            await bench_fanout(url, clients, 10, 10)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
            tmp.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    p.add_argument("--only", default="1,2,3,4", help="which measurements to run, e.g. 2,3")
    asyncio.run(main(p.parse_args()))
