"""Hardening of ``kiln serve`` against what fuzzing found: strict JSON in and out, typed 400s instead of 500s,
a data dir that a bad row cannot brick, crash-safe output files, public tracebacks, redacted argv, a
responsive loop under huge bodies, slow readers kept and late sockets served.

Servers run on loopback in private temp dirs; the crash tests use a real ``kiln serve`` subprocess and are
always killed (fixtures in srv_helpers). Nothing waits on fixed sleeps: readiness, files and messages are
polled for.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings, strategies as st
from srv_helpers import HERE, LiveServer, chain, make_registry, recv_until_done, types

try:
    from srv_helpers import SAFETY_S, wait_for
except ImportError:  # an srv_helpers without the shared wait helpers
    SAFETY_S = 300.0

    def wait_for(cond, what, bound=SAFETY_S, every=0.02):
        end = time.monotonic() + bound
        while not (got := cond()):
            assert time.monotonic() < end, f"gave up waiting for {what}"
            time.sleep(every)
        return got


from kiln.server import ROUTES

sys.path.insert(0, str(HERE / "hardening_pack"))
import kiln_hardening_nodes  # noqa: E402

HARDENING_PACK = HERE / "hardening_pack"
pytestmark = pytest.mark.timeout(300)


def strict_json(text: str | bytes):
    """Decode as strict JSON: NaN/Infinity are not JSON."""

    def bad(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def assert_typed_400(r: requests.Response, type_: str | None = None) -> dict:
    assert r.status_code == 400, (r.status_code, r.text[:500])
    body = strict_json(r.content)
    assert isinstance(body["error"], dict) and body["error"]["type"] and "node_errors" in body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body


@pytest.fixture(scope="module")
def hserver(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("hardening"))
    yield s
    s.stop()


# -- 1. numbers that do not fit ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": 1}}}, "number": 1e400}',
        b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": 1}}}, "number": ' + b"9" * 400 + b"}",
        b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": 1}}}, "number": NaN}',
        b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": -Infinity}}}}',
        b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": 1}}}, "number": 36028797018963968}',
    ],
)
def test_out_of_range_numbers_are_refused(hserver, raw):
    body = assert_typed_400(hserver.post("/prompt", data=raw))
    assert body["error"]["type"] in ("invalid_json", "invalid_prompt")


def test_nonfinite_outputs_are_written_as_null(live):
    reg = make_registry()
    for cls in kiln_hardening_nodes.NODES:
        reg.register(cls, python_module="custom_nodes.kiln_hardening_nodes")
    s = live(registry=reg)
    r = s.post("/prompt", {"prompt": {"1": {"class_type": "HNonFinite", "inputs": {}}}, "client_id": "nf"})
    pid = r.json()["prompt_id"]
    st_ = s.get(f"/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S)})
    assert strict_json(st_.content)["outputs"] == {"1": {"values": [None, None, None, 1.5]}}
    hist = strict_json(s.get(f"/history/{pid}").content)
    assert hist[pid]["outputs"]["1"]["values"] == [None, None, None, 1.5]
    events = strict_json(s.get(f"/api/prompt/{pid}/events").content)["events"]
    executed = [e for e in events if e["type"] == "executed"]
    assert executed[0]["data"]["output"]["values"] == [None, None, None, 1.5]


def test_restart_after_poison_rows_quarantines_and_serves(tmp_path, serve_proc):
    """Rows that cannot be read (an infinite number, broken JSON, a 5,000-digit integer) no longer brick the
    data dir: the server starts, moves them to the quarantine table, logs each, and serves the rest."""
    srv = serve_proc()
    pid = requests.post(f"{srv.url}/prompt", json={"prompt": chain(2, value=5)}, timeout=SAFETY_S).json()["prompt_id"]
    requests.get(f"{srv.url}/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S)}, timeout=SAFETY_S + 10)
    srv.kill()
    db = sqlite3.connect(tmp_path / "data" / "kiln.sqlite3")
    cols = "(prompt_id, number, status, client_id, prompt, extra_data, outputs_to_execute, body_hash, created"
    values = "VALUES (?, ?, ?, NULL, ?, '{}', '[]', 'x', 0, ?, ?)"
    good_prompt = json.dumps(chain(2))
    poison = [
        ("p-inf", float("inf"), "pending", good_prompt, None, None),
        ("p-json", 5.0, "pending", "{not json", None, None),
        (
            "p-digits",
            6.0,
            "pending",
            '{"1": {"class_type": "TConst", "inputs": {"value": 1' + "0" * 5000 + "}}}",
            None,
            None,
        ),
        ("p-history", 7.0, "success", good_prompt, "{broken", 99),
        ("p-running", 8.0, "running", "[1, 2]", None, None),
    ]
    for p, number, status, prompt, history, order in poison:
        db.execute(
            f"INSERT INTO prompts {cols}, history, history_order) {values}",
            (p, number, status, prompt, history, order),
        )
    db.commit()
    db.close()
    srv2 = serve_proc()  # raises if `kiln serve` exits
    hist = requests.get(f"{srv2.url}/history", timeout=SAFETY_S)
    assert hist.status_code == 200 and pid in strict_json(hist.content)
    assert requests.get(f"{srv2.url}/queue", timeout=SAFETY_S).status_code == 200
    # a new prompt runs and gets a number past the good ones
    r = requests.post(f"{srv2.url}/prompt", json={"prompt": chain(2, value=9)}, timeout=SAFETY_S)
    assert r.status_code == 200 and isinstance(r.json()["number"], int)
    srv2.stop()
    db = sqlite3.connect(tmp_path / "data" / "kiln.sqlite3")
    quarantined = {row[0] for row in db.execute("SELECT prompt_id FROM quarantine")}
    left = {row[0] for row in db.execute("SELECT prompt_id FROM prompts")}
    db.close()
    assert quarantined == {p[0] for p in poison}
    assert not quarantined & left
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("serve-*.log"))
    for p in poison:
        assert f"prompt '{p[0]}' cannot be read" in log
    assert "OverflowError" not in log


# -- 2. malformed input is a typed 400 ----------------------------------------------------------------
def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "body, headers",
    [
        # a part without Content-Disposition
        (
            b"--xx\r\nContent-Type: image/png\r\n\r\nabc\r\n--xx--\r\n",
            {"Content-Type": "multipart/form-data; boundary=xx"},
        ),
        # an empty boundary
        (b"--\r\n\r\n--\r\n", {"Content-Type": "multipart/form-data; boundary="}),
        # a boundary that does not match the body
        (
            b'--aa\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nx\r\n--aa--\r\n',
            {"Content-Type": "multipart/form-data; boundary=bb"},
        ),
        # no boundary at all
        (b"hello", {"Content-Type": "multipart/form-data"}),
    ],
)
def test_malformed_multipart_is_a_typed_400(hserver, body, headers):
    for route in ("/upload/image", "/upload/mask"):
        r = requests.post(hserver.url + route, data=body, headers=headers, timeout=SAFETY_S)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        strict_json(r.content)


def test_upload_over_a_directory_is_a_typed_400(hserver):
    (hserver.folders.input_dir / "adir.png").mkdir(parents=True, exist_ok=True)
    r = requests.post(
        hserver.url + "/upload/image",
        files={"image": ("adir.png", png_bytes(), "image/png")},
        data={"overwrite": "true"},
        timeout=SAFETY_S,
    )
    assert_typed_400(r, "invalid_target")


@pytest.mark.parametrize(
    "path",
    [
        "/history?max_items=" + "9" * 30,
        "/history?offset=" + "9" * 30,
        "/history?max_items=nan",
        "/api/prompt/x/events?since=" + "9" * 30,
        "/api/prompt/x/events?wait=true&timeout=nan",
        "/api/prompt/x/events?timeout=inf",
        "/api/prompt/x?wait=true&timeout=-inf",
        "/api/prompt/x?wait=true&timeout=1e400",
        "/view?filename=" + quote("a\udc80.png", errors="surrogatepass"),
    ],
)
def test_bad_query_parameters_are_typed_400s(hserver, path):
    r = requests.get(hserver.url + path, timeout=SAFETY_S)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    strict_json(r.content)


def test_post_prompt_wait_with_bad_timeout_is_refused_before_queueing(hserver):
    before = hserver.get("/queue").json()
    r = requests.post(
        hserver.url + "/prompt?wait=true&timeout=nan", json={"prompt": chain(2, value=123)}, timeout=SAFETY_S
    )
    assert_typed_400(r)
    assert hserver.get("/queue").json() == before


def test_lone_surrogate_client_id_is_refused(hserver):
    raw = b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": 1}}, "2": {"class_type": "TShow", '
    raw += b'"inputs": {"value": ["1", 0]}}}, "client_id": "ab\\ud800cd"}'
    assert_typed_400(hserver.post("/prompt", data=raw))
    r = requests.get(hserver.url + "/ws?clientId=" + quote("a\ud800", errors="surrogatepass"), timeout=SAFETY_S)
    assert 400 <= r.status_code < 500
    strict_json(r.content)


def test_websocket_huge_number_is_a_typed_error_and_the_socket_lives(hserver):
    with hserver.ws("digits") as ws:
        json.loads(ws.recv(timeout=SAFETY_S))
        ws.send('{"type": "prompt", "data": {"prompt": {}, "number": ' + "7" * 5000 + "}}")
        err = strict_json(ws.recv(timeout=SAFETY_S))
        assert err["type"] == "error" and err["data"]["type"] == "invalid_json"
        ws.send('{"type": "replay", "data": {"prompt_id": "x", "since": ' + "9" * 30 + "}}")
        assert strict_json(ws.recv(timeout=SAFETY_S))["data"]["type"] == "bad_message"
        pid = hserver.post("/prompt", {"prompt": chain(2, value=4), "client_id": "digits"}).json()["prompt_id"]
        assert types(recv_until_done(ws, pid))[-1] == "executing"


def test_long_strings_are_refused_naming_node_and_input(live):
    s = live(max_string_bytes=1000)
    g = chain(2)
    g["1"]["_meta"] = {"title": "t" * 5000}
    body = assert_typed_400(s.post("/prompt", {"prompt": g}), "value_too_long")
    assert body["error"]["extra_info"] == {"node_id": "1", "input_name": "_meta"}
    g = chain(2)
    g["out"] = {"class_type": "TWriteFile", "inputs": {"value": ["2", 0], "prefix": "é" * 600}}  # 1200 bytes
    body = assert_typed_400(s.post("/prompt", {"prompt": g}), "value_too_long")
    assert body["node_errors"]["out"]["errors"][0]["extra_info"]["input_name"] == "prefix"
    assert "'prefix'" in body["error"]["message"] and "'out'" in body["error"]["message"]
    # a big body takes the off-loop path and is refused the same way
    g["out"]["inputs"]["prefix"] = "p" * 400_000
    assert_typed_400(s.post("/prompt", {"prompt": g}), "value_too_long")


# -- 4. tracebacks without the server's paths --------------------------------------------------------
def test_validation_traceback_has_no_absolute_paths(live, caplog):
    import logging

    s = live(registry=make_registry(image_nodes=True))
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": True}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with caplog.at_level(logging.WARNING, logger="kiln.server"):
        body = assert_typed_400(s.post("/prompt", {"prompt": g}))
    tb = body["node_errors"]["1"]["errors"][0]["extra_info"]["traceback"]
    text = "".join(tb)
    assert "File " in text  # the field is kept (ComfyUI's shape)
    for leak in (str(Path.home()), str(HERE.parents[1]), sys.prefix, "site-packages"):
        assert leak not in text, leak
    assert '"nodes/image.py"' in text or '"engine/validation.py"' in text
    assert str(HERE.parents[1]) in caplog.text  # the full traceback went to the log


def test_execution_error_traceback_has_no_absolute_paths(hserver):
    g = chain(2)
    g["fail"] = {"class_type": "TFail", "inputs": {"value": ["2", 0], "message": "kaboom"}}
    g["out"] = {"class_type": "TShow", "inputs": {"value": ["fail", 0]}}
    pid = hserver.post("/prompt", {"prompt": g}).json()["prompt_id"]
    st_ = strict_json(hserver.get(f"/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S)}).content)
    tb = "".join(st_["error"]["traceback"])
    assert "kaboom" in tb and "File " in tb
    for leak in (str(Path.home()), str(HERE.parents[1]), sys.prefix):
        assert leak not in tb, leak


# -- 5. argv without secrets --------------------------------------------------------------------------
def test_system_stats_redacts_secret_arguments(hserver, monkeypatch):
    argv = ["kiln", "serve", "--auth-token", "s3cr3t-a", "--api-key=s3cr3t-b", "--port", "8188", "--my-password", "pw"]
    monkeypatch.setattr(sys, "argv", argv)
    got = strict_json(hserver.get("/system_stats").content)["system"]["argv"]
    assert "s3cr3t-a" not in str(got) and "s3cr3t-b" not in str(got) and "pw" not in got
    assert got[:3] == ["kiln", "serve", "--auth-token"] and "8188" in got and "--api-key=<redacted>" in got


# -- 3. crash-safe output files -----------------------------------------------------------------------
def test_sigkill_after_the_file_appears_leaves_one_complete_file_per_output(tmp_path, serve_proc):
    """Kill -9 as soon as the first saved image exists (before history is written), restart: the re-run
    rewrites the same files, so there is exactly one complete PNG per output and no temporary leftovers."""
    from PIL import Image

    srv = serve_proc(custom_nodes=HARDENING_PACK)
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 3, "color": 255}},
        "2": {"class_type": "HSaveSlow", "inputs": {"images": ["1", 0], "filename_prefix": "crash/img", "seconds": 60}},
    }
    r = requests.post(f"{srv.url}/prompt", json={"prompt": g, "prompt_id": "crash-1"}, timeout=SAFETY_S)
    assert r.status_code == 200, r.text
    out = tmp_path / "output" / "crash"
    wait_for(lambda: list(out.glob("*.png")), "the first saved image", every=0.002)
    srv.kill()
    srv2 = serve_proc(custom_nodes=HARDENING_PACK)
    st_ = requests.get(
        f"{srv2.url}/api/prompt/crash-1", params={"wait": "1", "timeout": str(SAFETY_S)}, timeout=SAFETY_S + 10
    ).json()
    assert st_["status"] == "success", st_
    files = sorted(p.name for p in out.iterdir())
    pngs = [f for f in files if f.endswith(".png") and not f.startswith(".")]
    assert files == pngs, files  # no temporary file left
    assert len(pngs) == 3, pngs
    assert sorted(i["filename"] for i in st_["outputs"]["2"]["images"]) == pngs
    for name in pngs:
        with Image.open(out / name) as im:
            im.load()  # complete
            assert im.size == (32, 32)


# -- 8. a late socket gets its prompt's end -----------------------------------------------------------
def _no_more_messages(ws) -> list:
    """Messages queued before a feature_flags answer (the server answers in order)."""
    ws.send(json.dumps({"type": "feature_flags", "data": {}}))
    seen = []
    while True:
        m = strict_json(ws.recv(timeout=SAFETY_S))
        if m["type"] == "feature_flags":
            return seen
        seen.append(m)


def test_late_socket_gets_final_events_once_and_in_order(hserver):
    pids = []
    for v in (11, 12):
        pid = hserver.post("/prompt", {"prompt": chain(2, value=v), "client_id": "latecomer"}).json()["prompt_id"]
        pids.append(pid)
    for pid in pids:
        assert (
            hserver.get(f"/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S)}).json()["status"]
            == "success"
        )
    with hserver.ws("latecomer") as ws:
        assert strict_json(ws.recv(timeout=SAFETY_S))["type"] == "status"
        got = _no_more_messages(ws)
    per_prompt = [[m["type"] for m in got if m["data"].get("prompt_id") == pid] for pid in pids]
    assert per_prompt == [["executed", "execution_success", "executing"]] * 2
    assert [m["data"]["prompt_id"] for m in got] == [pids[0]] * 3 + [pids[1]] * 3  # in finishing order
    assert got[0]["data"]["output"] == {"text": ["12"]} and got[3]["data"]["output"] == {"text": ["13"]}
    assert got[2]["data"]["node"] is None
    seqs = [m["seq"] for m in got]
    assert seqs[:3] == sorted(seqs[:3])
    with hserver.ws("latecomer") as ws:  # delivered once
        json.loads(ws.recv(timeout=SAFETY_S))
        assert _no_more_messages(ws) == []


def test_client_that_watched_its_run_gets_no_late_copy(hserver):
    with hserver.ws("watcher") as ws:
        json.loads(ws.recv(timeout=SAFETY_S))
        pid = hserver.post("/prompt", {"prompt": chain(2, value=21), "client_id": "watcher"}).json()["prompt_id"]
        recv_until_done(ws, pid)
    with hserver.ws("watcher") as ws:
        json.loads(ws.recv(timeout=SAFETY_S))
        assert _no_more_messages(ws) == []


# -- 7. a slow but reading client is never cut off ----------------------------------------------------
def test_slow_reading_client_is_not_cut_off_during_a_long_run(live):
    """A plain client reading with small pauses through a 10,000-node run, with small queue bounds, gets a
    coalesced stream and the final events instead of a disconnect."""
    s = live(max_queue=256, max_queue_bytes=256 * 1024)
    n = 10_000
    with s.ws("reader") as ws:
        json.loads(ws.recv(timeout=SAFETY_S))
        pid = s.post("/prompt", {"prompt": chain(n, value=1), "client_id": "reader"}).json()["prompt_id"]
        got = []
        while True:
            m = strict_json(ws.recv(timeout=SAFETY_S))  # raises ConnectionClosed if cut off
            got.append(m)
            if len(got) % 25 == 0:
                time.sleep(0.002)  # reading, just slower than the run
            if m["type"] == "executing" and m["data"]["node"] is None and m["data"].get("prompt_id") == pid:
                break
    kinds = [m["type"] for m in got if m["data"].get("prompt_id") == pid]
    assert "execution_success" in kinds and kinds[-1] == "executing"
    executed = [m for m in got if m["type"] == "executed"]
    assert executed and executed[-1]["data"]["output"] == {"text": [str(n)]}
    seqs = [m["seq"] for m in got if "seq" in m]
    assert seqs == sorted(seqs)  # coalesced, never reordered


def test_client_that_stops_reading_is_cut_off_once_stalled(live, caplog):
    """Over its byte bound, a socket that has taken nothing for ``stall_timeout`` seconds is disconnected,
    well before the hard bound (four times the limit); a reading client on the same server is not."""
    import logging
    import socket

    bound = 1024 * 1024
    s = live(max_queue_bytes=bound, stall_timeout=0.2)
    raw = socket.create_connection(("127.0.0.1", s.port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall(
        (
            f"GET /ws?clientId=stopped HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    hub = s.service.hub
    stopped = wait_for(lambda: hub.to_sid("stopped"), "the raw socket to connect")[0]
    heavy = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "out": {"class_type": "TBigShow", "inputs": {"value": ["1", 0], "size": 200_000}},
    }
    with caplog.at_level(logging.WARNING, logger="kiln.server"), s.ws("reading") as ws:
        json.loads(ws.recv(timeout=SAFETY_S))

        def both() -> None:  # a heavy message for each; returns once the reader has its prompt's end
            s.post("/prompt", {"prompt": heavy, "client_id": "stopped"})
            pid = s.post("/prompt", {"prompt": heavy, "client_id": "reading"}).json()["prompt_id"]
            assert types(recv_until_done(ws, pid))[-1] == "executing"

        # fill the kernel buffers, the transport and then the queue up to its bound
        while not stopped.closed and stopped.bytes <= bound:
            both()
            assert stopped.closed or stopped.bytes < 4 * bound
        if not stopped.closed:  # over the bound but not cut: it has not been stalled long enough yet
            wait_for(lambda: time.monotonic() - stopped.last_progress > 0.2, "the stall timeout to pass")
            both()
        assert stopped.closed and not hub.to_sid("stopped")
        assert hub.to_sid("reading")
    raw.close()
    assert "not reading" in caplog.text


# -- 6. the loop stays responsive during a huge POST --------------------------------------------------
def test_huge_post_is_decoded_prepared_and_stored_off_the_loop(live, monkeypatch):
    """Each step of accepting a huge graph (decode, prepare, validate, encode, store) runs in a worker thread,
    and the loop answers another client while that step is held. No clock is read: a step that ran on the
    loop is recorded as such (and not held), a step held off the loop waits for the probe to be answered.
    The latency figures themselves are printed by ``benchmarks/server_latency.py``."""
    from kiln.server import params as srv_params, service as srv_service

    s = live()
    svc = s.service
    steps = ["decode", "prepare", "validate", "encode", "store"]
    entered = {k: threading.Event() for k in steps}
    release = {k: threading.Event() for k in steps}
    on_loop: list[str] = []

    def held(step, fn, heavy=lambda *a, **k: True):
        def wrapper(*args, **kw):
            if heavy(*args, **kw):
                if threading.get_ident() == s.thread.ident:
                    on_loop.append(step)
                    entered[step].set()
                else:
                    entered[step].set()
                    assert release[step].wait(SAFETY_S), f"the test never released {step}"
            return fn(*args, **kw)

        return wrapper

    monkeypatch.setattr(srv_params, "loads", held("decode", srv_params.loads, lambda raw, *_: len(raw) > 100_000))
    monkeypatch.setattr(svc, "_prepare", held("prepare", svc._prepare))
    big = lambda graph, *a, **k: len(graph.nodes) > 1000  # noqa: E731
    monkeypatch.setattr(srv_service, "validate", held("validate", srv_service.validate, big))
    monkeypatch.setattr(srv_service, "_encoded", held("encode", srv_service._encoded, big))
    monkeypatch.setattr(svc.store, "add", held("store", svc.store.add))

    body = json.dumps({"prompt": chain(5_000, value=3)}).encode()
    result = {}
    th = threading.Thread(target=lambda: result.update(r=requests.post(s.url + "/prompt", data=body, timeout=SAFETY_S)))
    th.start()
    try:
        for step in steps:
            assert entered[step].wait(SAFETY_S), f"{step} never ran"
            assert s.get("/queue").status_code == 200  # answered while the step is held in its thread
            release[step].set()
    finally:
        for ev_ in release.values():
            ev_.set()
        th.join(SAFETY_S)
    assert result["r"].status_code == 200, result["r"].text[:300]
    assert on_loop == []
    s.post("/interrupt")
    s.post("/queue", {"clear": True})


# -- property-based: every route, every socket message ------------------------------------------------
ROUTES_GET = [path for method, path, _ in ROUTES if method == "GET"] + ["/"]
ROUTES_POST = [path for method, path, _ in ROUTES if method == "POST"]
PARAMS = [
    "max_items",
    "offset",
    "since",
    "timeout",
    "wait",
    "filename",
    "type",
    "subfolder",
    "preview",
    "channel",
    "clientId",
]
weird_values = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "9" * 400, "-1", "0", "", "true", "1.5", " 3 ", "0x10"]),
    st.text(max_size=12),
)
weird_json = st.one_of(
    st.sampled_from(
        [
            b'{"prompt": {}, "number": 1e400}',
            b'{"prompt": {"1": {"class_type": "TConst", "inputs": {"value": 1}}}, "number": ' + b"1" * 500 + b"}",
            b'{"delete": ["\\ud800"]}',
            b'{"clear": true, "delete": [1e308, -0.0]}',
            b'{"prompt_id": "\\udfff"}',
            b"[" * 5000,
            b'{"a": NaN}',
            b"\xff\xfe",
        ]
    ),
    st.binary(max_size=64),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=8)),
        lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
)


def _check_answer(r: requests.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.headers.get("Content-Type", "").startswith("application/json") and r.content:
        strict_json(r.content)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES_GET),
    pid=st.text(max_size=10),
    query=st.dictionaries(st.sampled_from(PARAMS), weird_values, max_size=3),
)
@example(route="/history", pid="", query={"max_items": "9" * 30})
@example(route="/prompt/{prompt_id}/events", pid="x", query={"since": "9" * 30})
@example(route="/prompt/{prompt_id}/events", pid="x", query={"wait": "true", "timeout": "nan"})
@example(route="/ws", pid="", query={"clientId": "\ud800"})
def test_fuzz_get_routes(hserver, route, pid, query):
    path = re.sub(r"\{\w+\}", quote(pid, safe="", errors="surrogatepass") or "x", route)
    qs = "&".join(f"{k}={quote(v, safe='', errors='surrogatepass')}" for k, v in query.items())
    for prefix in ("", "/api") if route != "/" else ("",):
        _check_answer(requests.get(hserver.url + prefix + path + ("?" + qs if qs else ""), timeout=SAFETY_S))


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES_POST),
    body=weird_json,
    ctype=st.sampled_from(["application/json", "", "multipart/form-data; boundary=zz", "multipart/form-data"]),
)
@example(route="/prompt", body=b'{"prompt": {}, "number": 1e400}', ctype="application/json")
@example(route="/upload/image", body=b"--zz\r\n\r\nx\r\n--zz--\r\n", ctype="multipart/form-data; boundary=zz")
def test_fuzz_post_routes(hserver, route, body, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    _check_answer(requests.post(hserver.url + route, data=body, headers=headers, timeout=SAFETY_S))


socket_messages = st.one_of(
    st.sampled_from(
        [
            '{"type": "prompt", "data": {"prompt": {}, "number": ' + "5" * 5000 + "}}",
            '{"type": "prompt", "data": {"prompt": {"1": {"class_type": "TConst"}}, "number": 1e400}}',
            '{"type": "replay", "data": {"prompt_id": "\\ud800", "since": 0}}',
            '{"type": "replay", "data": {"prompt_id": "x", "since": 1e300}}',
            '{"type": "interrupt", "data": {"prompt_id": 1e999}}',
            '{"type": "feature_flags", "data": NaN}',
            "[" * 3000,
            "not json",
        ]
    ),
    st.text(max_size=40),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=6)),
        lambda kids: st.dictionaries(
            st.sampled_from(["type", "data", "prompt", "since", "prompt_id"]), kids, max_size=3
        ),
        max_leaves=8,
    ).map(json.dumps),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(socket_messages, min_size=1, max_size=4))
def test_fuzz_socket_messages(hserver, msgs):
    with hserver.ws("fuzz-sock") as ws:
        strict_json(ws.recv(timeout=SAFETY_S))
        for m in msgs:
            ws.send(m)
        for m in _no_more_messages(ws):
            if m["type"] == "error":
                assert m["data"]["type"] != "internal_error", m
    assert math.isfinite(1.0)


# -- 9. inputs a node does not declare: accepted (ComfyUI's clients send extras), reported when asked -----------
def test_unknown_inputs_are_reported_only_to_a_client_that_asks(hserver):
    g = chain(2, value=4)
    g["out"]["inputs"]["valeu"] = 3  # TShow takes `value`
    plain = hserver.post("/prompt", {"prompt": g})
    assert plain.status_code == 200 and "warnings" not in plain.json()
    asked = requests.post(hserver.url + "/prompt?warnings=true", json={"prompt": g}, timeout=SAFETY_S)
    assert asked.status_code == 200
    body = strict_json(asked.content)
    w = body["warnings"]["out"]
    assert w["class_type"] == "TShow"
    assert w["errors"][0]["type"] == "unknown_input" and w["errors"][0]["details"] == "valeu"
    assert "did you mean 'value'" in w["errors"][0]["extra_info"]["hint"]
    assert body["node_errors"] == {}


def test_history_is_answered_from_stored_text_without_decoding_graphs(live, monkeypatch):
    """GET /history and /history/{id} never decode the stored entries (a huge graph would hold the loop for a
    good part of a second each way): the decoder is made to fail, and both still answer the stored entry."""
    s = live()
    pid = s.post("/prompt?wait=true", {"prompt": chain(3, value=2)}).json()["prompt_id"]

    def no_decoding(*a, **k):
        raise AssertionError("a history answer decoded stored rows")

    monkeypatch.setattr(s.service.store, "_rows", no_decoding)
    whole = strict_json(s.get("/history").content)
    one = strict_json(s.get(f"/history/{pid}").content)
    assert whole[pid] == one[pid]
    assert one[pid]["outputs"]["out"]["text"] == ["4"] and one[pid]["status"]["completed"] is True  # 2 + 1 + 1
    assert strict_json(s.get("/history?max_items=1").content).keys() == {pid}
