"""The websocket protocol against real clients: ComfyUI's message order, previews, socket submission,
replay, status and waiting."""

from __future__ import annotations

import json
import re
import struct
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from srv_helpers import SAFETY_S, Gate, chain, recv, recv_json, recv_until_done, sleeper, types, wait_for

pytestmark = pytest.mark.timeout(600)


def first(ws) -> dict:
    return recv_json(ws)


def no_state(msgs: list) -> list:
    """Without ``progress_state`` snapshots: their exact sequence is compared with ComfyUI's recordings in
    test_editor_protocol.py; they are not logged, so a replay has none."""
    return [m for m in msgs if isinstance(m, bytes) or m["type"] != "progress_state"]


def test_status_first_with_sid(server):
    with server.ws("abc") as ws:
        m = first(ws)
        assert m == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}}
    with server.ws() as ws:
        assert re.fullmatch(r"[0-9a-f]{32}", first(ws)["data"]["sid"])
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{server.port}/api/ws?clientId=viaapi", open_timeout=SAFETY_S) as ws:
        assert first(ws)["data"]["sid"] == "viaapi"


@pytest.mark.parametrize("deflate", [False, True], ids=["raw-frames", "permessage-deflate"])
def test_success_order_matches_comfyui_and_history_is_written_first(server, deflate):
    with server.ws("c1", deflate=deflate) as ws:
        first(ws)
        r = server.post("/prompt", {"prompt": chain(3), "client_id": "c1", "prompt_id": "p-1"})
        assert r.status_code == 200 and r.json() == {"prompt_id": "p-1", "number": 0, "node_errors": {}}
        msgs = no_state(recv_until_done(ws, "p-1"))
        # history must exist when executing null arrives (ComfyUI's script examples rely on it)
        assert "p-1" in server.get("/history/p-1").json()
    assert types(msgs) == [
        "status",
        "status",
        "execution_start",
        "execution_cached",
        "executing",
        "executing",
        "executing",
        "executing",
        "executed",
        "execution_success",
        "status",
        "executing",
    ]
    ex = [m for m in msgs if m["type"] == "executing"]
    assert [m["data"]["node"] for m in ex] == ["1", "2", "3", "out", None]
    assert all(m["data"]["prompt_id"] == "p-1" for m in ex)
    assert msgs[8]["data"] == {"node": "out", "display_node": "out", "output": {"text": ["3"]}, "prompt_id": "p-1"}
    assert msgs[1]["data"]["status"]["exec_info"]["queue_remaining"] == 1
    assert msgs[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 0
    seqs = [m.get("seq") for m in msgs if m["type"] != "status"]
    assert seqs == list(range(1, len(seqs) + 1))  # every per-prompt event numbered, in order
    h = server.get("/api/history/p-1").json()["p-1"]
    assert h["status"]["status_str"] == "success" and h["status"]["completed"] is True
    assert [m[0] for m in h["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert h["prompt"][:2] == [0, "p-1"] and h["prompt"][4] == ["out"]
    assert h["outputs"] == {"out": {"text": ["3"]}}


def test_cached_rerun_sends_executed_but_no_executing(server):
    with server.ws("c1") as ws:
        first(ws)
        server.post("/prompt", {"prompt": chain(3), "client_id": "c1", "prompt_id": "a"})
        recv_until_done(ws, "a")
        server.post("/prompt", {"prompt": chain(3), "client_id": "c1", "prompt_id": "b"})
        msgs = no_state(recv_until_done(ws, "b"))
    assert types(msgs) == [
        "status",
        "status",
        "execution_start",
        "execution_cached",
        "executed",
        "execution_success",
        "status",
        "executing",
    ]
    assert sorted(msgs[3]["data"]["nodes"]) == ["1", "2", "3", "out"]


def test_runtime_error_sequence(server):
    g = chain(2)
    g["f"] = {"class_type": "TFail", "inputs": {"value": ["2", 0], "message": "kaputt"}}
    g["out"]["inputs"]["value"] = ["f", 0]
    with server.ws("c1") as ws:
        first(ws)
        pid = server.post("/prompt", {"prompt": g, "client_id": "c1"}).json()["prompt_id"]
        msgs = recv_until_done(ws, pid)
    assert types(msgs)[-3:] == ["execution_error", "status", "executing"]
    assert "execution_success" not in types(msgs)
    err = msgs[-3]["data"]
    assert err["node_id"] == "f" and err["node_type"] == "TFail" and "kaputt" in err["exception_message"]
    assert err["exception_type"] == "RuntimeError"
    h = server.get(f"/history/{pid}").json()[pid]
    assert h["status"]["status_str"] == "error" and h["status"]["completed"] is False
    assert server.get(f"/api/prompt/{pid}").json()["status"] == "error"


def test_a_node_calling_sys_exit_fails_only_its_prompt(server):
    g = chain(1)
    g["x"] = {"class_type": "TExit", "inputs": {"value": ["1", 0]}}
    g["out"]["inputs"]["value"] = ["x", 0]
    with server.ws("c1") as ws:
        first(ws)
        pid = server.post("/prompt", {"prompt": g, "client_id": "c1"}).json()["prompt_id"]
        msgs = recv_until_done(ws, pid)
        assert types(msgs).count("execution_error") == 1
        assert types(msgs)[-3:] == ["execution_error", "status", "executing"]
        pid2 = server.post("/prompt", {"prompt": chain(2), "client_id": "c1"}).json()["prompt_id"]
        assert "execution_success" in types(recv_until_done(ws, pid2))


def test_interrupt_running_prompt_only(server):
    gate = Gate()  # never opened: "a" runs until it is interrupted
    with server.ws("c1") as ws:
        first(ws)
        a = server.post("/prompt", {"prompt": gate.graph(), "client_id": "c1"}).json()["prompt_id"]
        b = server.post("/prompt", {"prompt": chain(2), "client_id": "c1"}).json()["prompt_id"]
        while first(ws)["type"] != "progress":  # wait until it runs
            pass
        assert server.post("/interrupt", {"prompt_id": "nope"}).status_code == 404
        assert server.post("/interrupt", {"prompt_id": b}).status_code == 200  # pending: cancelled alone
        assert server.post("/api/interrupt", {"prompt_id": a}).status_code == 200
        msgs = recv_until_done(ws, a)
        assert "execution_interrupted" in types(msgs)
    assert server.get(f"/api/prompt/{a}").json()["status"] == "interrupted"
    assert server.get(f"/api/prompt/{b}").json()["status"] == "interrupted"
    assert server.get(f"/history/{a}").json()[a]["status"]["status_str"] == "error"
    r = server.post("/interrupt", {"prompt_id": a})
    assert r.status_code == 409 and r.json()["error"]["type"] == "prompt_finished"
    assert server.post("/interrupt", data="not json").status_code == 200  # global, tolerant like ComfyUI


def test_prompt_without_client_id_broadcasts_only_progress(server):
    with server.ws("watcher") as ws:
        first(ws)
        server.post("/prompt", {"prompt": sleeper(0.05, 2)})
        seen = []
        # everything about the run reaches this socket before the broadcast that the queue is empty again
        while True:
            m = first(ws)
            seen.append(m["type"])
            if (
                "progress" in seen
                and m["type"] == "status"
                and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
            ):
                break
    assert "progress" in seen and "status" in seen
    assert not {"execution_start", "executing", "executed", "execution_success"} & set(seen)


def _preview_graph():
    return {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "p": {"class_type": "TPreview", "inputs": {"value": ["1", 0], "steps": 2}},
        "w": {"class_type": "TWsOut", "inputs": {"value": ["1", 0]}},
    }


def test_previews_only_when_asked_and_output_frames_always(server):
    with server.ws("c1") as ws:
        first(ws)
        pid = server.post("/prompt", {"prompt": _preview_graph(), "client_id": "c1"}).json()["prompt_id"]
        msgs = recv_until_done(ws, pid)
    frames = [m for m in msgs if isinstance(m, bytes)]
    assert len(frames) == 1  # only the output frame: previews were not asked for
    assert struct.unpack(">II", frames[0][:8]) == (1, 2) and frames[0][8:12] == b"\x89PNG"


def test_preview_frames_type1_and_type4(server):
    g = _preview_graph()
    with server.ws("plain") as ws:
        first(ws)
        pid = server.post(
            "/prompt", {"prompt": g, "client_id": "plain", "extra_data": {"preview_method": "auto"}}
        ).json()["prompt_id"]
        msgs = no_state(recv_until_done(ws, pid))
    t = types(msgs)
    i = next(
        k for k, m in enumerate(msgs) if isinstance(m, dict) and m["type"] == "progress" and m["data"]["node"] == "p"
    )
    assert t[i + 1] == "bin1"  # ComfyUI order for plain clients: progress, then the frame
    f = msgs[i + 1]
    assert struct.unpack(">II", f[:8]) == (1, 1) and f[8:10] == b"\xff\xd8"
    assert t.count("bin1") == 3  # two previews and the output frame
    with server.ws("meta") as ws:
        first(ws)
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        flags = first(ws)
        assert flags["type"] == "feature_flags" and flags["data"]["supports_preview_metadata"] is True
        assert flags["data"]["max_upload_size"] == server.config.max_upload_bytes
        g["1"]["inputs"]["value"] = 2  # not a cache hit
        pid = server.post(
            "/prompt", {"prompt": g, "client_id": "meta", "extra_data": {"preview_method": "auto"}}
        ).json()["prompt_id"]
        msgs = recv_until_done(ws, pid)
    msgs2 = [m for m in msgs if isinstance(m, bytes) or m["type"] != "progress_state"]
    frames = [m for m in msgs2 if isinstance(m, bytes)]
    assert all(f[:4] == b"\x00\x00\x00\x04" for f in frames)
    f = next(f for f in frames if b'"image/jpeg"' in f)
    i = next(k for k, m in enumerate(msgs2) if m is f)
    assert msgs2[i + 1]["type"] == "progress"  # ComfyUI order with metadata: the frame, then progress
    n = struct.unpack(">I", f[4:8])[0]
    meta = json.loads(f[8 : 8 + n])
    assert meta == {
        "node_id": "p",
        "prompt_id": pid,
        "display_node_id": "p",
        "parent_node_id": None,
        "real_node_id": "p",
        "image_type": "image/jpeg",
    }
    assert f[8 + n : 10 + n] == b"\xff\xd8"
    assert "progress_state" in types(msgs)  # negotiated clients get progress_state deltas


def test_submit_on_socket_and_errors_on_it(server):
    with server.ws("sock") as ws:
        first(ws)
        ws.send(json.dumps({"type": "prompt", "data": {"prompt": chain(2), "prompt_id": "s1", "request_id": 7}}))
        reply = first(ws)
        assert reply["type"] == "prompt_queued"
        assert reply["data"] == {"prompt_id": "s1", "number": 0, "node_errors": {}, "request_id": 7}
        msgs = recv_until_done(ws, "s1")
        assert types(msgs)[-3:] == ["execution_success", "status", "executing"]
        ws.send(json.dumps({"prompt": chain(2, value=5)}))  # the bare form
        reply = first(ws)
        assert reply["type"] == "prompt_queued"
        recv_until_done(ws, reply["data"]["prompt_id"])
        bad = chain(2)
        del bad["2"]["inputs"]["a"]
        ws.send(json.dumps({"type": "prompt", "data": {"prompt": bad}}))
        reply = first(ws)
        assert reply["type"] == "prompt_rejected"
        assert reply["data"]["node_errors"]["2"]["errors"][0]["type"] == "required_input_missing"
        ws.send("{not json")
        assert first(ws)["data"]["type"] == "invalid_json"
        ws.send(json.dumps({"type": "launch_missiles"}))
        assert first(ws)["data"]["type"] == "unknown_message_type"
        ws.send(json.dumps([1, 2]))
        assert first(ws)["data"]["type"] == "bad_message"


def test_binary_garbage_closes_only_that_socket(server):
    from websockets.exceptions import ConnectionClosed

    with server.ws("good") as good, server.ws("bad") as bad:
        first(good), first(bad)
        bad.send(b"\x00\xffgarbage")
        with pytest.raises(ConnectionClosed) as exc:
            while True:
                recv(bad)
        assert exc.value.rcvd.code == 1003
        pid = server.post("/prompt", {"prompt": chain(2), "client_id": "good"}).json()["prompt_id"]
        assert types(recv_until_done(good, pid))[-1] == "executing"


def test_replay_over_socket_and_http(server):
    with server.ws("r1") as ws:
        first(ws)
        pid = server.post("/prompt", {"prompt": chain(3), "client_id": "r1"}).json()["prompt_id"]
        live = [m for m in recv_until_done(ws, pid) if isinstance(m, dict) and "seq" in m]
    with server.ws("r1") as ws:  # a reconnect
        first(ws)
        ws.send(json.dumps({"type": "replay", "data": {"prompt_id": pid, "since": 3}}))
        replayed = []
        while True:
            m = first(ws)
            if m["type"] == "replay_done":
                break
            replayed.append(m)
        assert m["data"] == {"prompt_id": pid, "status": "success", "last_seq": live[-1]["seq"]}
        ws.send(json.dumps({"type": "replay", "data": {"prompt_id": "nope", "since": 0}}))
        assert first(ws)["data"]["type"] == "prompt_not_found"
    assert replayed == live[3:]
    assert replayed[-1]["type"] == "executing" and replayed[-1]["data"]["node"] is None
    body = server.get(f"/api/prompt/{pid}/events", params={"since": 0}).json()
    assert body["done"] and body["status"] == "success"
    assert [(e["seq"], e["type"], e["data"]) for e in body["events"]] == [
        (m["seq"], m["type"], m["data"]) for m in live
    ]
    assert server.get("/api/prompt/nope/events").status_code == 404


def test_status_pending_running_unknown_and_wait(server):
    gate = Gate()  # "a" keeps running (and "b" waiting) until the checks are done
    a = server.post("/prompt", {"prompt": gate.graph()}).json()["prompt_id"]
    b = server.post("/prompt", {"prompt": chain(2)}).json()["prompt_id"]
    wait_for(lambda: server.get(f"/api/prompt/{a}").json()["status"] == "running", "a to run")
    sb = server.get(f"/api/prompt/{b}").json()
    assert sb["status"] == "pending" and sb["queue_position"] == 1
    r = server.get("/api/prompt/never-seen")
    assert r.status_code == 404 and r.json()["status"] == "unknown"
    assert server.get("/history/never-seen").json() == {}  # ComfyUI's answer is unchanged
    assert server.get(f"/api/prompt/{b}").json()["status"] == "pending"
    gate.open()
    done = server.get(f"/api/prompt/{b}", params={"wait": "true", "timeout": str(SAFETY_S - 30)}).json()
    assert done["status"] == "success" and done["outputs"] == {"out": {"text": ["2"]}}
    assert server.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}
    r = server.post("/api/prompt?wait=true", {"prompt": chain(3, value=10)}).json()  # a synchronous run
    assert r["status"] == "success" and r["outputs"] == {"out": {"text": ["12"]}} and r["node_errors"] == {}


def test_webhook_gets_a_post_on_completion(server):
    got = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/done"
        pid = server.post("/prompt", {"prompt": chain(2), "extra_data": {"webhook": url}}).json()["prompt_id"]
        wait_for(lambda: got, "the webhook's POST")
    finally:
        httpd.shutdown()
    assert got == [{"prompt_id": pid, "status": "success", "outputs": {"out": {"text": ["2"]}}, "error": None}]
    r = server.post("/prompt", {"prompt": chain(2), "extra_data": {"webhook": "file:///etc/passwd"}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_webhook"


def test_output_frames_are_replayed_in_place(server):
    g = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "w": {"class_type": "TWsOut", "inputs": {"value": ["1", 0]}},
    }
    with server.ws("frames") as ws:
        first(ws)
        pid = server.post("/prompt", {"prompt": g, "client_id": "frames"}).json()["prompt_id"]
        live = recv_until_done(ws, pid)
    with server.ws("frames") as ws:
        first(ws)
        ws.send(json.dumps({"type": "replay", "data": {"prompt_id": pid, "since": 0}}))
        replayed = recv_until_done(ws, pid)
    strip = [m for m in no_state(live) if isinstance(m, bytes) or m["type"] != "status"]
    assert replayed == strip  # the PNG frame comes back right after its progress event, as it was sent
    assert any(isinstance(m, bytes) and m[8:12] == b"\x89PNG" for m in replayed)
    ev = server.get(f"/api/prompt/{pid}/events").json()["events"]
    assert [e for e in ev if "frame" in e][0]["frame"]["format"] == "PNG"


def test_events_long_poll_follows_a_run_to_its_final_event(server):
    pid = server.post("/prompt", {"prompt": sleeper(0.6, 6)}).json()["prompt_id"]
    since, seen, polls = 0, [], 0
    while True:
        body = server.get(f"/api/prompt/{pid}/events", params={"since": since, "wait": "true", "timeout": "10"}).json()
        polls += 1
        seen += body["events"]
        since = body["last_seq"]
        if seen and seen[-1]["type"] == "executing" and seen[-1]["data"]["node"] is None:
            break
        assert polls < 100
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert sum(e["type"] == "progress" for e in seen) == 6 and body["done"]
