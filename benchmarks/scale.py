"""Worker processes and scale-out: completed prompts per second with 0 (in-process), 1, 2 and 4 workers.

    python benchmarks/scale.py                  # every case (several minutes on 2 cores)
    python benchmarks/scale.py --only latency,small
    python benchmarks/scale.py --quick          # fewer prompts per case

Every figure counts COMPLETED work: one client submits all prompts over HTTP, then waits for each with
``GET /api/prompt/{id}?wait=1``; the time is from the first submission to the last completion. Each case
starts real ``kiln serve`` subprocesses side by side in this one run, so the ratios compare like with like.

Cases:
- latency: prompts bound by an outside service's latency (a node that waits 200 ms, as a provider call does;
  no CPU) with 1, 2 and 4 workers. Target: N workers >= 0.9 N x one worker.
- cpu: the shipped model's txt2img (64x64, 20 Euler steps) with 1 worker at 1 torch thread, vs 2 workers at 1
  thread each (2 cores). Target >= 1.7x.
- small: chain(10) (EmptyImage -> 10 x ImageInvert -> PreviewImage) one at a time (cold latency per prompt)
  and 200 at once (completed throughput), in-process vs one worker.
- big: chain(500) end to end through a worker vs in-process, both servers up, prompts alternating. Target <= 1.2x.
- affinity: prompts over two checkpoint files (A A B B A B A B) on 2 workers: model loads with affinity
  dispatch vs least-recently-used. Target: 2 loads.
- fairness: client A queues 20 prompts of 0.1 s, then client B sends one: how long B waits, fair share vs FIFO.
- ray: the latency-bound case on 2 Ray actors (a local instance the server starts) vs 2 local workers.
  Target: within 10%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]

PACK = '''
import time
from typing import Annotated

from kiln.engine import Float, Int, Node, NodeResult, Socket


class BenchLatency(Node):
    """Waits like a call to an outside service (no CPU)."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Int()] = 0, seconds: Annotated[float, Float(min=0, max=60)] = 0.2):
        time.sleep(seconds)
        return value


class BenchShow(Node):
    output_node = True

    def run(self, value: Annotated[int, Socket("INT")]):
        return NodeResult(ui={"text": [str(value)]})


NODES = [BenchLatency, BenchShow]
'''


class Server:
    def __init__(self, base: Path, *args: str):
        self.base = base
        self.args = args
        self.log = base / f"serve-{abs(hash(args))}.log"

    def __enter__(self) -> Server:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "kiln", "serve", "--port", "0", "--base-dir", str(self.base)]
        cmd += ["--custom-nodes", str(self.base / "custom_nodes"), "--log-level", "WARNING", *self.args]
        self.fh = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.base, env=env, stdout=self.fh, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"kiln serve {' '.join(self.args)} exited:\n{self.log.read_text()[-2000:]}")
            m = re.search(r"listening on http://[^ ]*:(\d+)", self.log.read_text(errors="replace"))
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
            time.sleep(0.1)
        n = int(self.args[self.args.index("--workers") + 1]) if "--workers" in self.args else 1
        if "--ray" in self.args:
            n = int(self.args[self.args.index("--ray-workers") + 1])
        while True:  # every worker started (a worker imports torch and the nodes: seconds)
            try:
                ws = requests.get(self.url + "/api/workers", timeout=30).json()["workers"]
                if len(ws) == max(n, 1) and all(w["state"] == "idle" for w in ws):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.fh.close()

    def submit(self, graph: dict, client_id: str = "bench") -> str:
        r = requests.post(self.url + "/prompt", json={"prompt": graph, "client_id": client_id}, timeout=600)
        r.raise_for_status()
        return r.json()["prompt_id"]

    def wait(self, pid: str) -> dict:
        r = requests.get(f"{self.url}/api/prompt/{pid}", params={"wait": "1", "timeout": "600"}, timeout=610)
        st = r.json()
        if st["status"] != "success":
            raise SystemExit(f"prompt {pid} ended {st['status']}: {st.get('error')}")
        return st

    def completed_rate(self, graphs: list[dict]) -> tuple[float, float]:
        """(prompts per second, seconds) for submitting all, then waiting for all."""
        t0 = time.perf_counter()
        ids = [self.submit(g) for g in graphs]
        for pid in ids:
            self.wait(pid)
        dt = time.perf_counter() - t0
        return len(graphs) / dt, dt

    def workers(self) -> list[dict]:
        return requests.get(self.url + "/api/workers", timeout=30).json()["workers"]


def latency_graph(i: int, seconds: float = 0.2) -> dict:
    return {
        "1": {"class_type": "BenchLatency", "inputs": {"value": i, "seconds": seconds}},
        "2": {"class_type": "BenchShow", "inputs": {"value": ["1", 0]}},
    }


def chain_graph(n: int, color: int = 0) -> dict:
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}}}
    prev = "1"
    for i in range(2, n + 2):
        g[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [prev, 0]}}
        prev = str(i)
    g["out"] = {"class_type": "PreviewImage", "inputs": {"images": [prev, 0]}}
    return g


def txt2img(seed: int, ckpt: str = "kiln-shapes.safetensors") -> dict:
    g = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    g["3"]["inputs"]["seed"] = seed
    g["4"]["inputs"]["ckpt_name"] = ckpt
    g["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return g


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<46} {value:>18}  {note}")


def case_latency(base: Path, quick: bool) -> None:
    n = 12 if quick else 40
    print(f"\nlatency-bound prompts ({n} x a 200 ms wait, no CPU), completed per second:")
    rates = {}
    for w in (1, 2, 4):
        with Server(base, "--workers", str(w)) as s:
            rates[w], dt = s.completed_rate([latency_graph(i) for i in range(n)])
        note = f"{dt:.2f} s; {rates[w] / rates[1]:.2f}x one worker (target >= {0.9 * w:.1f}x)"
        row(f"{w} worker(s)", f"{rates[w]:.2f}/s", note)


def case_cpu(base: Path, quick: bool) -> None:
    n = 6 if quick else 16
    print(f"\nCPU-bound: shipped-model txt2img 64x64, 20 steps, {n} prompts, completed per second:")
    with Server(base, "--workers", "1", "--worker-threads", "1") as s:
        s.wait(s.submit(txt2img(0)))  # models loaded before timing
        one, dt1 = s.completed_rate([txt2img(i + 1) for i in range(n)])
    row("1 worker, 1 thread", f"{one:.2f}/s", f"{dt1:.1f} s")
    with Server(base, "--workers", "2", "--worker-threads", "1") as s:
        for pid in [s.submit(txt2img(0)), s.submit(txt2img(100))]:  # both workers loaded
            s.wait(pid)
        two, dt2 = s.completed_rate([txt2img(i + 1) for i in range(n)])
    row("2 workers, 1 thread each", f"{two:.2f}/s", f"{dt2:.1f} s; {two / one:.2f}x (target >= 1.7x)")


def case_small(base: Path, quick: bool) -> None:
    n = 60 if quick else 200
    print(f"\nsmall prompts, chain(10): cold end-to-end latency (one at a time) and {n} at once:")
    for label, args in (("in-process (--workers 0)", ("--workers", "0")), ("1 worker", ("--workers", "1"))):
        with Server(base, *args) as s:
            s.wait(s.submit(chain_graph(10, 255)))  # warm the server's and the worker's imports
            lat = []
            for i in range(20):
                t0 = time.perf_counter()
                s.wait(s.submit(chain_graph(10, i)))
                lat.append((time.perf_counter() - t0) * 1000)
            rate, dt = s.completed_rate([chain_graph(10, i % 256) for i in range(n)])
        row(f"{label}: one prompt", f"{statistics.median(lat):.1f} ms", f"median of 20 (min {min(lat):.1f})")
        row(f"{label}: {n} prompts", f"{rate:.0f}/s", f"{dt:.2f} s, completed")


def case_big(base: Path, quick: bool) -> None:
    """Both servers up at once, prompts alternating between them (which goes first alternates too), so a
    disturbance of the machine falls on both and not on whichever happened to run then."""
    reps = 7 if quick else 25
    print("\nchain(500) end to end (submit -> completed), the two servers alternating:")
    labels = {"in-process": ("--workers", "0"), "1 worker": ("--workers", "1")}
    times: dict[str, list[float]] = {label: [] for label in labels}
    with contextlib.ExitStack() as stack:
        servers = {}
        for label, args in labels.items():
            home = base / ("big-" + label.replace(" ", "-"))
            home.mkdir(exist_ok=True)
            if not (home / "custom_nodes").exists():
                (home / "custom_nodes").symlink_to(base / "custom_nodes")
            servers[label] = s = stack.enter_context(Server(home, *args))
            s.wait(s.submit(chain_graph(500, 255)))
        for i in range(reps):
            for label in list(labels)[:: 1 if i % 2 == 0 else -1]:
                s = servers[label]
                t0 = time.perf_counter()
                s.wait(s.submit(chain_graph(500, i)))
                times[label].append((time.perf_counter() - t0) * 1000)
    out = {label: statistics.median(ts) for label, ts in times.items()}
    for label in labels:
        row(label, f"{out[label]:.1f} ms", f"median of {reps} (min {min(times[label]):.1f})")
    pairs = statistics.median(w / p for w, p in zip(times["1 worker"], times["in-process"]))
    ratio = out["1 worker"] / out["in-process"]
    row("worker / in-process", f"{ratio:.2f}x", f"(target <= 1.2x; per pair {pairs:.2f}x)")


def case_affinity(base: Path, quick: bool) -> None:
    ckpts = base / "models" / "checkpoints"
    for name in ("a.safetensors", "b.safetensors"):
        if not (ckpts / name).exists():  # copies: the model manager knows a file by its real path
            shutil.copyfile(ROOT / "models" / "checkpoints" / "kiln-shapes.safetensors", ckpts / name)
    order = ["a", "a", "b", "b", "a", "b", "a", "b"]
    print(f"\nmodel affinity, 2 workers, prompts over two checkpoints one after another ({' '.join(order)}):")
    for label, mode in (("affinity", "affinity"), ("least recently used", "lru")):
        with Server(base, "--workers", "2", "--worker-threads", "1", "--dispatch", mode) as s:
            for i, name in enumerate(order):
                g = txt2img(i, f"{name}.safetensors")
                g["3"]["inputs"]["steps"] = 2
                s.wait(s.submit(g))
            loads = sum(w.get("model_loads", 0) for w in s.workers())
        row(label, f"{loads} loads", "(target: 2)" if mode == "affinity" else "")


def case_fairness(base: Path, quick: bool) -> None:
    n = 10 if quick else 20
    print(f"\nfairness, 1 worker: client A queues {n} prompts of 0.1 s, then client B sends one; B waits:")
    for label, mode in (("fair share", "fair"), ("FIFO (ComfyUI's order)", "fifo")):
        with Server(base, "--workers", "1", "--queue-order", mode) as s:
            ids = [s.submit(latency_graph(i, 0.1), client_id="A") for i in range(n)]
            t0 = time.perf_counter()
            s.wait(s.submit(latency_graph(99, 0.1), client_id="B"))
            waited = time.perf_counter() - t0
            for pid in ids:
                s.wait(pid)
        row(label, f"{waited:.2f} s")


def case_ray(base: Path, quick: bool) -> None:
    n = 12 if quick else 40
    print(f"\nRay actors vs local workers, 2 each, {n} latency-bound prompts (200 ms), completed per second:")
    with Server(base, "--workers", "2") as s:
        local, dt = s.completed_rate([latency_graph(i) for i in range(n)])
    row("2 local workers", f"{local:.2f}/s", f"{dt:.2f} s")
    with Server(base, "--ray", "auto", "--ray-workers", "2") as s:
        s.wait(s.submit(latency_graph(0, 0.0)))
        remote, dt = s.completed_rate([latency_graph(i) for i in range(n)])
    row("2 Ray actors (local instance)", f"{remote:.2f}/s", f"{dt:.2f} s; {remote / local:.2f}x local (target >= 0.9x)")


CASES = {
    "latency": case_latency,
    "cpu": case_cpu,
    "small": case_small,
    "big": case_big,
    "affinity": case_affinity,
    "fairness": case_fairness,
    "ray": case_ray,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated cases: " + ", ".join(CASES))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    chosen = [c for c in args.only.split(",") if c] or list(CASES)
    print(f"kiln serve, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    base = Path(tempfile.mkdtemp(prefix="kiln-scale-"))
    try:
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / "kiln_bench_nodes.py").write_text(PACK)
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "models" / "checkpoints" / "kiln-shapes.safetensors").symlink_to(
            ROOT / "models" / "checkpoints" / "kiln-shapes.safetensors"
        )
        for name in chosen:
            CASES[name](base, args.quick)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
