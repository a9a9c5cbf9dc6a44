"""Budgets refused before running, through a real server: uploads over ``max_image_pixels`` are a typed 400
before any pixel is decoded, LoadImage of such a file fails naming its input, and (once the service passes
``max_prompt_memory`` to validation) a prompt over the memory budget is a 400 naming node, estimate and limit.
"""

from __future__ import annotations

import io
import uuid

import pytest
import requests
from PIL import Image
from srv_helpers import SAFETY_S, make_registry, recv_until_done

from tests.nodes.test_memory_estimates import bomb_png

GiB = 1 << 30
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def _upload(server, data: bytes, route: str = "/upload/image", name: str = "pic.png") -> requests.Response:
    return requests.post(server.url + route, files={"image": (name, data, "image/png")}, timeout=SAFETY_S)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png(12000, 12000)


def test_a_12000_square_png_upload_is_refused_with_a_typed_400(live, bomb):
    s = live()
    assert len(bomb) < 1 << 20  # a small file holding 144 megapixels
    for route in ("/upload/image", "/upload/mask", "/api/upload/image"):
        r = _upload(s, bomb, route, name="bomb.png")
        assert r.status_code == 400, (route, r.text)
        err = r.json()["error"]
        assert err["type"] == "image_too_large"
        assert "12000x12000" in err["details"] and "144.0 megapixels" in err["details"]
        assert "67.1 megapixels" in err["details"]  # the default cap, 8192 x 8192
        assert err["extra_info"]["max_image_pixels"] == 8192 * 8192
        assert "--max-image-pixels" in err["extra_info"]["hint"]
    assert not (s.base / "input" / "bomb.png").exists()
    assert not any((s.config.upload_tmp_dir).iterdir()), "the refused upload's temporary file was removed"


def test_a_normal_image_is_accepted_and_the_cap_follows_the_config(live):
    s = live()
    r = _upload(s, _png(640, 480))
    assert r.status_code == 200, r.text
    assert (s.base / "input" / r.json()["name"]).is_file()
    small = live(max_image_pixels=100 * 100)
    r = _upload(small, _png(300, 200))
    assert r.status_code == 400 and r.json()["error"]["type"] == "image_too_large"
    assert "300x200" in r.json()["error"]["details"]
    off = live(max_image_pixels=0)  # 0: no cap of Kiln's own
    assert _upload(off, _png(300, 200)).status_code == 200


def test_a_non_image_is_still_a_415(live):
    r = _upload(live(), b"not a picture at all")
    assert r.status_code == 415 and r.json()["error"]["type"] == "not_an_image"


def test_load_image_of_a_bomb_placed_in_input_fails_naming_the_input(live, bomb):
    s = live(registry=make_registry(image_nodes=True))
    (s.base / "input").mkdir(parents=True, exist_ok=True)
    (s.base / "input" / "bomb.png").write_bytes(bomb)  # copied in by hand: no upload to refuse it
    cid = uuid.uuid4().hex
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "bomb.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with s.ws(cid) as ws:
        r = s.post("/prompt", {"prompt": graph, "client_id": cid})
        assert r.status_code == 200, r.text
        msgs = recv_until_done(ws, r.json()["prompt_id"])
    errors = [m["data"] for m in msgs if isinstance(m, dict) and m["type"] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "LoadImage"
    assert "12000x12000" in errors[0]["exception_message"] and "--max-image-pixels" in str(errors[0])


def test_a_prompt_over_the_memory_budget_is_a_400_naming_node_estimate_and_limit(live):
    s = live(registry=make_registry(image_nodes=True), max_prompt_memory=8 * GiB)
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 4096, "batch_size": 64}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    r = s.post("/prompt", {"prompt": graph})
    assert r.status_code == 400, r.text
    body = r.json()
    (issue,) = body["node_errors"]["1"]["errors"]
    assert issue["type"] == "prompt_memory_over_budget"
    assert issue["extra_info"]["estimate_bytes"] == 12 * GiB and issue["extra_info"]["limit_bytes"] == 8 * GiB
    assert "Node 1 (EmptyImage) needs about 12.0 GiB" in issue["extra_info"]["hint"]
    assert "limit of 8.0 GiB" in issue["extra_info"]["hint"]
    assert body["node_errors"]["1"]["class_type"] == "EmptyImage"
    # nothing was queued, and a small prompt on the same server is accepted
    small = {**graph, "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    assert s.post("/prompt", {"prompt": small}).status_code == 200
