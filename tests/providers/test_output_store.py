"""Workers' outputs in object storage (``kiln serve --output-store s3://bucket/prefix``), against a real
S3-compatible server on loopback (moto) and real worker processes: outputs are stored under the prompt id,
history and ``executed`` name them there, ``/view`` streams them or redirects to a presigned URL, and a
prompt re-run after its worker died leaves one object per output."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # the server tests' helpers
from srv_helpers import SAFETY_S  # noqa: E402
from test_workers import _result, _submit, serving  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def _save_graph(marker: str | None = None) -> dict:
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "stored/pic"}},
    }
    if marker is not None:  # runs after the saver, and ends its worker once
        g["3"] = {"class_type": "TConst", "inputs": {"value": 1}}
        g["4"] = {"class_type": "WKill", "inputs": {"value": ["3", 0], "marker": marker}}
        g["5"] = {"class_type": "TShow", "inputs": {"value": ["4", 0]}}
    return g


def _objects(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])]


@pytest.mark.parametrize("serve", ["stream", "redirect"])
def test_outputs_are_stored_by_prompt_and_served(s3, moto_url, tmp_path, serve):
    with serving(
        1,
        tmp_path,
        "--workers", "1",
        "--output-store", f"s3://{s3.bucket}/kiln",
        "--output-store-endpoint", moto_url,
        "--output-serve", serve,
    ) as srv:  # fmt: skip
        pid = _submit(srv, _save_graph())
        st = _result(srv, pid)
        assert st["status"] == "success", st
        img = st["outputs"]["2"]["images"][0]
        assert img["subfolder"] == f"{pid}/stored" and img["type"] == "output"
        key = f"kiln/output/{pid}/stored/{img['filename']}"
        assert _objects(s3, f"kiln/output/{pid}/") == [key]
        stored = s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert stored == (tmp_path / "output" / "stored" / img["filename"]).read_bytes()
        assert stored[:8] == b"\x89PNG\r\n\x1a\n"
        view = requests.get(f"{srv.url}/view", params=img, timeout=SAFETY_S, allow_redirects=False)
        if serve == "stream":
            assert view.status_code == 200 and view.content == stored
        else:
            assert view.status_code == 307 and view.headers["Location"].startswith(moto_url)
            assert requests.get(view.headers["Location"], timeout=SAFETY_S).content == stored
        hist = requests.get(f"{srv.url}/history/{pid}", timeout=SAFETY_S).json()
        assert hist[pid]["outputs"]["2"]["images"][0] == img


def test_a_rerun_leaves_one_object_per_output(s3, moto_url, tmp_path):
    with serving(
        1, tmp_path, "--workers", "1", "--output-store", f"s3://{s3.bucket}/kiln", "--output-store-endpoint", moto_url
    ) as srv:
        marker = tmp_path / "first-attempt"
        pid = _submit(srv, _save_graph(str(marker)))
        st = _result(srv, pid)
        assert st["status"] == "success", st
        assert marker.exists() and "re-running it once" in srv.log()
        # the saver may have run before the kill (its object is deleted) or not: either way one object is left
        assert re.search(r"prompt \S+: \d stored outputs of the earlier attempt deleted", srv.log())
        keys = _objects(s3, f"kiln/output/{pid}/")
        assert len(keys) == 1 and keys[0].endswith(st["outputs"]["2"]["images"][0]["filename"]), keys
        assert json.dumps(st["outputs"]).count(".png") == 1


def test_delete_prompt_removes_every_object_of_that_prompt_only(s3, moto_url):
    from kiln.workers.output_store import OutputStore, StoreConfig

    store = OutputStore(StoreConfig(f"s3://{s3.bucket}/pre", moto_url))
    for key in ["pre/output/p1/a.png", "pre/output/p1/sub/b.png", "pre/temp/p1/c.png", "pre/output/p2/a.png"]:
        s3.put_object(Bucket=s3.bucket, Key=key, Body=b"x")
    assert store.delete_prompt("p1") == 3
    assert _objects(s3, "pre/") == ["pre/output/p2/a.png"]
    assert store.get("output", "p2", "a.png") == b"x" and store.get("output", "p1", "a.png") is None


def _png(color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_and_input_files_reach_a_worker_that_shares_no_disk(s3, moto_url, tmp_path):
    """The worker's base folder is not the server's (as on another machine): an uploaded image and a file
    copied into the server's input folder reach it through the store, and LoadImage reads them there."""
    elsewhere = tmp_path / "worker-machine"
    with serving(
        1,
        tmp_path / "server",
        "--workers", "1",
        "--worker-base-dir", str(elsewhere),
        "--output-store", f"s3://{s3.bucket}/kiln",
        "--output-store-endpoint", moto_url,
    ) as srv:  # fmt: skip
        red = _png((255, 0, 0))
        up = requests.post(
            f"{srv.url}/upload/image",
            files={"image": ("red.png", red, "image/png")},
            data={"subfolder": "shots"},
            timeout=SAFETY_S,
        )
        assert up.status_code == 200, up.text
        (tmp_path / "server" / "input").mkdir(exist_ok=True)
        (tmp_path / "server" / "input" / "blue.png").write_bytes(_png((0, 0, 255)))
        for name, rgb in (("shots/red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
            assert not (elsewhere / "input" / name).exists()
            graph = {
                "1": {"class_type": "LoadImage", "inputs": {"image": name}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}},
            }
            st = _result(srv, _submit(srv, graph))
            assert st["status"] == "success", st
            assert (elsewhere / "input" / name).read_bytes() == (tmp_path / "server" / "input" / name).read_bytes()
            assert _objects(s3, f"kiln/input/{name}") == [f"kiln/input/{name}"]
            img = st["outputs"]["2"]["images"][0]
            view = requests.get(f"{srv.url}/view", params=img, timeout=SAFETY_S)
            assert view.status_code == 200  # served from the store: the server's own output folder has no copy
            assert not list((tmp_path / "server").glob("output/**/*.png"))
            import io

            from PIL import Image

            assert Image.open(io.BytesIO(view.content)).convert("RGB").getpixel((0, 0)) == rgb
