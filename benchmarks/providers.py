"""Provider and storage benchmarks, printed side by side with their references.

1. Overlap: N provider nodes in one graph against the loopback OpenAI-compatible server with a fixed
   latency per request, versus one call alone and versus N calls back to back.
   Target: N nodes take at most 2x one call.
2. S3 throughput: SaveImageS3 storing a batch of images (PNG, provenance embedded) to a moto server,
   versus boto3 alone encoding and uploading the same images in a loop, and with a thread pool.
   Target: Kiln / boto3 loop <= 1.1.

    python benchmarks/providers.py [--nodes 20] [--latency 0.2] [--images 100] [--size 512]

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kiln import (
    engine,  # noqa: E402
    nodes,  # noqa: E402
)

KEY = "sk-bench-000000000000"


def _executor(tmp: str) -> engine.Executor:
    reg = engine.Registry()
    nodes.register_builtin(reg)
    return engine.Executor(reg, folders=engine.Folders(tmp))


def _gen_graph(n: int, model: str, size: str, tag: str) -> dict:
    return {
        str(i): {
            "class_type": "OpenAIImageGenerate",
            "inputs": {
                "prompt": f"bench {tag} {i}",
                "model": model,
                "size": size,
                "quality": "low" if model == "gpt-image-1" else "auto",
            },
        }
        for i in range(n)
    }


def _serve_fake(latency: float) -> tuple[subprocess.Popen, str]:
    """The fake provider in its own process, so its CPU is not Kiln's (as with a real provider)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.providers.fake_providers", "--latency", str(latency), "--key", KEY],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def bench_overlap(n: int, latency: float, model: str, size: str, tmp: str) -> dict:
    proc, base_url = _serve_fake(latency)
    cfg = Path(tmp) / f"kiln-{model}.yaml"
    cfg.write_text(f"providers:\n  openai:\n    base_url: {base_url}\n    api_key_env: KILN_BENCH_KEY\n")
    os.environ.update(KILN_CONFIG=str(cfg), KILN_BENCH_KEY=KEY)
    ex = _executor(tmp)
    try:
        # warm up: SDK import, client, the server's renders; both sides then measure steady state
        for tag, count in (("single", 1), ("many", n)):
            g = _gen_graph(count, model, size, tag)
            assert ex.run(engine.Graph.from_json(g), targets=list(g)).status == "success"
            ex.cache.clear()
        singles = []
        for _ in range(3):
            ex.cache.clear()
            t = time.perf_counter()
            r = ex.run(engine.Graph.from_json(_gen_graph(1, model, size, "single")), targets=["0"])
            singles.append(time.perf_counter() - t)
            assert r.status == "success", r.error
        many = []
        for _ in range(2):
            ex.cache.clear()
            g = _gen_graph(n, model, size, "many")
            t = time.perf_counter()
            r = ex.run(engine.Graph.from_json(g), targets=list(g))
            many.append(time.perf_counter() - t)
            assert r.status == "success", r.error
    finally:
        proc.stdin.close()
        proc.wait(10)
    single = min(singles)
    return {
        "single": single,
        "many": min(many),
        "serial": n * latency,
        "ratio": min(many) / single,
        "decode": _decode_floor(n, size),
    }


def _decode_floor(n: int, size: str) -> float:
    """Seconds to decode n such images to IMAGE tensors one after another: CPU work no overlap can hide."""
    from kiln.nodes.providers.imageio import decode
    from tests.providers.fake_providers import render

    blobs = [render(size, f"floor {i}") for i in range(n)]
    t = time.perf_counter()
    for b in blobs:
        decode(b, "floor")
    return time.perf_counter() - t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto did not start")


def _images(count: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 1, size, dtype=np.float32)
    img = np.broadcast_to(base[None, None, :, None], (count, size, size, 3)).copy()
    img += rng.random((count, size, size, 3), dtype=np.float32) * 0.1
    return torch.from_numpy(np.clip(img, 0, 1))


def bench_s3(count: int, size: int, tmp: str) -> dict:
    import boto3
    from botocore.config import Config
    from PIL import Image

    from kiln.nodes.common import to_uint8

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    proc, url = _moto()
    try:
        c = boto3.client(
            "s3", endpoint_url=url, config=Config(s3={"addressing_style": "path"}, max_pool_connections=20)
        )
        c.create_bucket(Bucket="bench")
        images = _images(count, size)

        def encode(i: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(to_uint8(images[i])).save(buf, format="PNG", compress_level=4)
            return buf.getvalue()

        c.put_object(Bucket="bench", Key="warm", Body=b"warm")  # connection and signer warmed

        def put(i: int) -> None:
            c.put_object(Bucket="bench", Key=f"boto/{i:05d}.png", Body=encode(i), ContentType="image/png")

        t = time.perf_counter()
        for i in range(count):
            put(i)
        loop = time.perf_counter() - t

        t = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(count)))
        pooled = time.perf_counter() - t

        class Source(engine.Node):
            outputs = ("IMAGE",)

            def run(self):
                return images

        ex = _executor(tmp)
        ex.registry.register(Source, "BenchImages")
        g = {
            "src": {"class_type": "BenchImages", "inputs": {}},
            "s": {
                "class_type": "SaveImageS3",
                "inputs": {
                    "images": ["src", 0],
                    "bucket": "bench",
                    "endpoint_url": url,
                    "path_style": True,
                    "key_template": "kiln/{index}.{ext}",
                    "embed_workflow": False,
                },
            },
        }
        os.environ["KILN_CONFIG"] = str(Path(tmp) / "none.yaml")
        warm = {
            "w": {
                "class_type": "SaveFileS3",
                "inputs": {"data": "warm", "bucket": "bench", "endpoint_url": url, "path_style": True},
            }
        }
        assert ex.run(engine.Graph.from_json(warm)).status == "success"  # client set up, as boto3's above
        t = time.perf_counter()
        r = ex.run(engine.Graph.from_json(g))
        kiln = time.perf_counter() - t
        assert r.status == "success", r.error
        assert len(r.outputs["s"]["s3"]) == count
    finally:
        proc.terminate()
        proc.wait(10)
    return {"loop": loop, "pooled": pooled, "kiln": kiln}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Provider overlap: {args.nodes} nodes, {args.latency * 1000:.0f} ms server latency each")
        print(
            f"{'images':<22}{'1 call':>10}{f'{args.nodes} nodes':>12}{'back to back':>14}{'nodes/1 call':>14}"
            f"{'target':>8}{'decode only':>13}"
        )
        for model, size in (("dall-e-2", "256x256"), ("gpt-image-1", "1024x1024")):
            o = bench_overlap(args.nodes, args.latency, model, size, tmp)
            print(
                f"{model + ' ' + size:<22}{o['single']:>9.3f}s{o['many']:>11.3f}s{o['serial']:>13.3f}s"
                f"{o['ratio']:>13.2f}x{'<= 2x':>8}{o['decode']:>12.3f}s"
            )
        print(
            "(decode only: decoding the same images to IMAGE tensors back to back, in one thread; CPU work "
            "that\n overlapping requests cannot hide, bounded below by decode only / cores)"
        )
        print()
        s = bench_s3(args.images, args.size, tmp)
        print(f"S3 upload: {args.images} PNG images {args.size}x{args.size} to moto (loopback)")
        print(f"{'':<28}{'seconds':>9}{'images/s':>10}{'vs boto3 loop':>15}")
        for name, key in (
            ("boto3 loop (encode+put)", "loop"),
            ("boto3 + 8 threads", "pooled"),
            ("Kiln SaveImageS3", "kiln"),
        ):
            v = s[key]
            print(f"{name:<28}{v:>8.2f}s{args.images / v:>10.1f}{v / s['loop']:>14.2f}x")
        print("target: Kiln / boto3 loop <= 1.1 (Kiln also embeds provenance and hashes every image)")


if __name__ == "__main__":
    main()
