"""Event-loop responsiveness of ``kiln serve`` while one client POSTs a huge body.

    python benchmarks/server_latency.py [--nodes 100000] [--string-mb 50]
    PYTHONPATH=/tmp/kiln-base python benchmarks/server_latency.py   # another checkout (e.g. a git worktree)

A second client polls ``GET /queue`` over its own keep-alive connection during each POST; the figure is the
worst (and median) latency it saw while the POST was being read, decoded and validated, and the server's
peak RSS so far. Cases, in this order:

1. a small graph whose ``_meta.title`` is a string of S MB;
2. a small graph whose SaveImage ``filename_prefix`` is a string of S MB (rejected by a string cap, if any);
3. a graph of N nodes (EmptyImage -> N x ImageInvert -> PreviewImage; interrupted once accepted).

The server under test is the checkout named by the first PYTHONPATH entry (default: this repository).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the checkout at argv[1]: its folders are the kiln.* subpackages, whatever is installed.
LAUNCHER = """
import sys
root = sys.argv.pop(1)
import kiln
kiln.__path__[:] = [root + "/kiln", root]
from kiln.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", LAUNCHER, str(root), "serve", "--port", str(port), "--base-dir", str(tmp)]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/api/features")
            if c.getresponse().status == 200:
                c.close()
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("kiln serve did not start")


class Prober(threading.Thread):
    """GET /queue in a loop on one keep-alive connection; records (start time, latency) pairs."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while not self.stop.is_set():
            t0 = time.perf_counter()
            conn.request("GET", "/queue")
            conn.getresponse().read()
            self.samples.append((t0, time.perf_counter() - t0))
            time.sleep(0.01)
        conn.close()

    def during(self, t0: float, t1: float) -> list[float]:
        """Latencies of the probes that were in flight at any time within [t0, t1]."""
        return [lat for start, lat in self.samples if start <= t1 and start + lat >= t0]


def post(port: int, body: bytes) -> tuple[int, float, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/prompt", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    dt = time.perf_counter() - t0
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = {"raw": data[:200].decode(errors="replace")}
    return r.status, dt, parsed


def request(port: int, method: str, path: str, body: bytes | None = None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    conn.getresponse().read()
    conn.close()


def chain_graph(n: int) -> dict:
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    prev = "1"
    for i in range(2, n + 2):
        g[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [prev, 0]}}
        prev = str(i)
    g["out"] = {"class_type": "PreviewImage", "inputs": {"images": [prev, 0]}}
    return g


def small_graph(title: str = "", prefix: str = "ComfyUI") -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": title or "t"}},
    }


def peak_rss_mb(pid: int) -> float:
    """The server's peak resident memory so far (Linux), in MB; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(port: int, prober: Prober, label: str, body: bytes, pid: int = 0) -> None:
    t0 = time.perf_counter()
    status, dt, parsed = post(port, body)
    t1 = time.perf_counter()
    lats = prober.during(t0, t1)
    request(port, "POST", "/interrupt", b"{}")
    request(port, "POST", "/queue", b'{"clear": true}')
    err = "" if status == 200 else f" ({(parsed.get('error') or {}).get('type', '')})"
    if lats:
        print(
            f"{label}: POST {status}{err} in {dt:.2f} s ({len(body) / 1e6:.1f} MB); other client's GET /queue "
            f"during it: max {max(lats) * 1000:.1f} ms, p50 {statistics.median(lats) * 1000:.1f} ms, "
            f"{len(lats)} probes; server peak RSS {peak_rss_mb(pid):.0f} MB",
            flush=True,
        )
    else:
        print(f"{label}: POST {status}{err} in {dt:.2f} s; no probe completed during it", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--string-mb", type=float, default=50)
    args = ap.parse_args()
    first = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    root = Path(first).resolve() if first else ROOT
    print(f"server checkout: {root}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-latency-") as d:
        proc, port = start_server(root, Path(d))
        try:
            prober = Prober(port)
            prober.start()
            time.sleep(1.0)
            idle = [lat for _, lat in prober.samples]
            print(f"idle GET /queue: p50 {statistics.median(idle) * 1000:.1f} ms over {len(idle)} probes", flush=True)
            pid = proc.pid
            print(f"server peak RSS at start: {peak_rss_mb(pid):.0f} MB", flush=True)
            s = "x" * int(args.string_mb * 1e6)
            # the string cases first, so each peak RSS is theirs (the big graph's run grows it for good)
            measure(
                port, prober, f"{args.string_mb:g} MB title", json.dumps({"prompt": small_graph(title=s)}).encode(), pid
            )
            body = json.dumps({"prompt": small_graph(prefix=s)}).encode()
            measure(port, prober, f"{args.string_mb:g} MB filename_prefix", body, pid)
            body = json.dumps({"prompt": chain_graph(args.nodes)}).encode()
            measure(port, prober, f"{args.nodes}-node graph", body, pid)
            prober.stop.set()
            prober.join(30)
        finally:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    main()
