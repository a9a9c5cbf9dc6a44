"""Safe by default: token auth, Host/Origin checks, /view and upload confinement, size limits."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tempfile

import pytest
import requests
from PIL import Image
from srv_helpers import ROOT, SAFETY_S, die_with_parent, kiln_cmd, recv_json, wait_for

from kiln.server import InsecureBind, ServerConfig

pytestmark = pytest.mark.timeout(600)


def png_bytes(color=(1, 2, 3), size=(4, 4), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def test_non_loopback_bind_needs_a_token(tmp_path):
    with pytest.raises(InsecureBind):
        ServerConfig(host="0.0.0.0").check_bind()
    ServerConfig(host="0.0.0.0", auth_token="t").check_bind()
    ServerConfig(host="127.0.0.1,::1").check_bind()

    env = {k: v for k, v in os.environ.items() if k != "KILN_AUTH_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            kiln_cmd("serve", "--base-dir", str(tmp_path), *args),
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=SAFETY_S,
            preexec_fn=die_with_parent,
        )

    r = serve("--host", "0.0.0.0", "--port", "0")  # refused before it binds; port 0 were it ever to bind
    assert r.returncode == 2 and "--auth-token" in r.stderr
    r = serve("--port", "0", "--cache", "bogus")
    assert r.returncode == 2 and "cache policy" in r.stderr


def test_token_on_http_and_websocket(live):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    s = live(auth_token="s3cret")
    assert s.get("/prompt").status_code == 401
    assert s.get("/prompt", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = s.get("/prompt", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert s.get("/view", params={"filename": "x.png"}).status_code == 401
    with pytest.raises(InvalidStatus) as exc:
        connect(s.ws_url + "?clientId=a", open_timeout=SAFETY_S)
    assert exc.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        connect(s.ws_url + "?clientId=a&token=nope", open_timeout=SAFETY_S)
    with connect(s.ws_url + "?clientId=a&token=s3cret", open_timeout=SAFETY_S) as ws:
        assert recv_json(ws)["type"] == "status"
    with connect(s.ws_url, additional_headers={"Authorization": "Bearer s3cret"}, open_timeout=SAFETY_S) as ws:
        assert recv_json(ws)["type"] == "status"


def test_host_and_origin_checks(server):
    assert server.get("/prompt", headers={"Host": "evil.example:8188"}).status_code == 403  # DNS rebinding
    assert server.get("/prompt", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    r = server.post("/prompt", {"prompt": {}}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden_origin"
    ok = server.get("/prompt", headers={"Origin": f"http://localhost:{server.port}"})
    assert ok.status_code == 200
    assert server.get("/prompt", headers={"Origin": "http://127.0.0.1:1"}).status_code == 403
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus):
        connect(server.ws_url, origin="http://evil.example", open_timeout=SAFETY_S)


def test_view_confinement(server):
    out = server.folders.output_dir
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "a.png").write_bytes(png_bytes())
    (out / "page.html").write_text("<script>alert(1)</script>")
    secret = server.base / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, out / "link.txt")
    r = server.get("/view", params={"filename": "a.png", "subfolder": "sub", "type": "output", "junk": "1"})
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert r.headers["Content-Disposition"] == 'filename="a.png"' and r.headers["Content-Type"] == "image/png"
    assert server.get("/view", params={"filename": "page.html"}).headers["Content-Type"] == "application/octet-stream"
    r = server.get("/view", params={"filename": "a.png [output]", "subfolder": "sub", "type": "input"})
    assert r.status_code == 200
    bad = [
        ({"filename": "../secret.txt"}, 400),
        ({"filename": "/etc/passwd"}, 400),
        ({"filename": "a.png\0"}, 400),
        ({"filename": "..\\secret.txt"}, 400),
        ({"filename": "secret.txt", "subfolder": ".."}, 403),
        ({"filename": "passwd", "subfolder": "/etc"}, 403),
        ({"filename": "link.txt"}, 403),
        ({"filename": "a.png", "type": "models"}, 400),
        ({"filename": "missing.png"}, 404),
        ({}, 400),
    ]
    for params, status in bad:
        r = server.get("/view", params=params)
        assert r.status_code == status, (params, r.status_code, r.text)
        assert b"top secret" not in r.content
    r = server.get("/view", params={"filename": "a.png", "subfolder": "sub", "preview": "jpeg;50"})
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def _upload(server, name, data, path="/upload/image", **fields):
    return requests.post(
        server.url + path,
        files={"image": (name, data, "image/png")},
        data={k: v for k, v in fields.items()},
        timeout=SAFETY_S,
    )


@pytest.fixture
def upload_tmp(tmp_path, monkeypatch):
    """A private temp folder for the in-process server's upload temp files (``tempfile.tempdir`` is read at
    each call), so a check for leftovers sees this test's files only, never other processes'."""
    d = tmp_path / "private-tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def upload_temps(server, upload_tmp) -> list:
    """The upload temp files left in this test's private temp folder or anywhere under the server's own
    folders (where a server that keeps its upload temps private would put them)."""
    return sorted(upload_tmp.glob("kiln-upload-*")) + sorted(server.base.rglob("kiln-upload-*"))


def test_upload_names_collisions_and_confinement(server, upload_tmp):
    r = _upload(server, "cat.png", png_bytes())
    assert r.status_code == 200 and r.json() == {"name": "cat.png", "subfolder": "", "type": "input"}
    assert _upload(server, "cat.png", png_bytes()).json()["name"] == "cat.png"  # same content: reused
    assert _upload(server, "cat.png", png_bytes((9, 9, 9))).json()["name"] == "cat (1).png"
    assert _upload(server, "cat.png", png_bytes((8, 8, 8))).json()["name"] == "cat (2).png"
    r = _upload(server, "cat.png", png_bytes((7, 7, 7)), overwrite="true")
    assert r.json()["name"] == "cat.png"
    r = _upload(server, "dog.png", png_bytes(), subfolder="pets", type="temp")
    assert r.json() == {"name": "dog.png", "subfolder": "pets", "type": "temp"}
    assert (server.folders.temp_dir / "pets" / "dog.png").is_file()
    for name, fields in [
        ("../evil.png", {}),
        ("a/b.png", {}),
        ("ok.png", {"subfolder": "../.."}),
        ("ok.png", {"subfolder": "/tmp"}),
        ("ok.png", {"type": "models"}),
    ]:
        r = _upload(server, name, png_bytes(), **fields)
        assert r.status_code == 400, (name, fields, r.text)
    r = _upload(server, "fake.png", b"MZ\x90\x00 not an image")
    assert r.status_code == 415 and r.json()["error"]["type"] == "not_an_image"
    assert not (server.folders.input_dir / "fake.png").exists()
    r = requests.post(server.url + "/upload/image", data={"subfolder": ""}, timeout=SAFETY_S)
    assert r.status_code == 400
    r = requests.post(
        server.url + "/upload/image",
        files={"image": ("a.png", png_bytes())},
        data={"subfolder": "x" * 200_000},
        timeout=SAFETY_S,
    )
    assert r.status_code == 413
    r = requests.post(
        server.url + "/upload/image",
        files=[("image", ("a.png", png_bytes())), ("image", ("b.png", png_bytes()))],
        timeout=SAFETY_S,
    )
    assert r.status_code == 400
    assert upload_temps(server, upload_tmp) == []  # no temp file left behind


MULTIPART = "multipart/form-data; boundary=zz"
IMAGE_PART = b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'


def test_failed_uploads_leave_no_temp_file(server, upload_tmp):
    """A body that ends inside the image part, and a client that goes away in the middle of an upload, leave
    no ``kiln-upload-*`` temp file behind (the paths that leaked one file per failed upload)."""
    r = requests.post(
        server.url + "/upload/image",
        data=IMAGE_PART + png_bytes() + b"no closing boundary",
        headers={"Content-Type": MULTIPART},
        timeout=SAFETY_S,
    )
    assert 400 <= r.status_code < 500, r.text
    assert upload_temps(server, upload_tmp) == []
    body = IMAGE_PART + os.urandom(256 * 1024)
    with socket.create_connection(("127.0.0.1", server.port), timeout=SAFETY_S) as c:
        head = (
            f"POST /upload/image HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: {MULTIPART}\r\n"
            f"Content-Length: {len(body) * 4}\r\n\r\n"
        )
        c.sendall(head.encode() + body)
        # readiness: the server is streaming this upload into its temp file; then the client vanishes
        wait_for(lambda: upload_temps(server, upload_tmp), "the upload's temp file to appear")
    wait_for(lambda: not upload_temps(server, upload_tmp), "the abandoned upload's temp file to be removed")
    assert server.get("/prompt").status_code == 200  # and the server still serves


def test_upload_size_limit_and_mask(live):
    s = live(max_upload_bytes=2048)
    big = png_bytes(size=(200, 200), mode="RGB")
    noise = os.urandom(4096)
    r = _upload(s, "big.png", noise)
    assert r.status_code == 413
    assert not list(s.folders.input_dir.glob("big*")) if s.folders.input_dir.exists() else True
    assert _upload(s, "base.png", png_bytes(size=(8, 8))).status_code == 200
    mask = png_bytes((0, 0, 0, 0), size=(8, 8), mode="RGBA")
    r = _upload(
        s,
        "base_mask.png",
        mask,
        path="/upload/mask",
        original_ref=json.dumps({"filename": "base.png", "type": "input"}),
    )
    assert r.status_code == 200, r.text
    with Image.open(s.folders.input_dir / r.json()["name"]) as im:
        assert im.mode == "RGBA" and im.getpixel((0, 0))[3] == 0
    r = _upload(s, "m.png", mask, path="/upload/mask", original_ref=json.dumps({"filename": "../x.png"}))
    assert r.status_code == 400
    assert len(big) > 0
