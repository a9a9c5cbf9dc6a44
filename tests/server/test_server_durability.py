"""Nothing accepted is lost: a real `kiln serve` subprocess killed with SIGKILL mid-run and restarted."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from srv_helpers import SAFETY_S, chain, recv_json, recv_until_done, types, wait_for

pytestmark = pytest.mark.timeout(600)


def writer(value: int, seconds: float, prefix: str = "out") -> dict:
    return {
        "1": {"class_type": "TConst", "inputs": {"value": value}},
        "w": {"class_type": "TWriteFile", "inputs": {"value": ["1", 0], "prefix": prefix, "seconds": seconds}},
    }


def wait_status(url, pid, want):
    def status():
        st = requests.get(f"{url}/api/prompt/{pid}", timeout=SAFETY_S).json()["status"]
        return st if st in want else None

    return wait_for(status, f"{pid} to reach {want}", every=0.05)


def post(url, body) -> requests.Response:
    return requests.post(f"{url}/prompt", json=body, timeout=SAFETY_S)


def in_its_node(url, pid) -> bool:
    """The prompt has reported progress from inside its writer node (it is mid-run, not just dequeued)."""
    ev = requests.get(f"{url}/api/prompt/{pid}/events", timeout=SAFETY_S).json()["events"]
    return any(e["type"] == "progress" and e["data"].get("node") == "w" for e in ev)


def test_sigkill_mid_run_then_restart_finishes_everything_once(tmp_path, serve_proc):
    srv = serve_proc()
    url = srv.url
    # one finished before the crash, one running when it dies, three waiting
    done = post(url, {"prompt": writer(0, 0.0), "prompt_id": "done"}).json()
    wait_status(url, "done", ("success",))
    ids = ["slow", "p1", "p2", "p3"]
    post(url, {"prompt": writer(1, 3.0), "prompt_id": "slow"})
    for i, pid in enumerate(ids[1:], start=2):
        post(url, {"prompt": writer(i, 0.0), "prompt_id": pid})
    wait_for(lambda: in_its_node(url, "slow"), "slow to be inside its node", every=0.05)
    srv.kill()  # SIGKILL while "slow" is in the middle of its node
    out_dir = tmp_path / "output"
    before = {p.name: p.read_bytes() for p in out_dir.glob("out_*.txt")}

    srv2 = serve_proc()
    for pid in ids:
        assert wait_status(srv2.url, pid, ("success", "error", "interrupted")) == "success"
    hist = requests.get(f"{srv2.url}/history", timeout=SAFETY_S).json()
    assert list(hist) == ["done", "slow", "p1", "p2", "p3"]  # the old entry is intact, each once
    assert done["prompt_id"] == "done" and hist["done"]["status"]["status_str"] == "success"
    runs = (out_dir / "runs.log").read_text().split()
    assert sorted(runs) == sorted(["done"] + ids)  # no prompt ran twice to completion
    for name, data in before.items():  # nothing written before the crash was overwritten
        assert (out_dir / name).read_bytes() == data
    files = sorted(p.name for p in out_dir.glob("out_*.txt"))
    assert len(files) == len(set(files)) == 5
    # replay survives the restart and ends with the final event
    ev = requests.get(f"{srv2.url}/api/prompt/slow/events", timeout=SAFETY_S).json()
    assert ev["done"] and ev["events"][-1]["type"] == "executing" and ev["events"][-1]["data"]["node"] is None
    seqs = [e["seq"] for e in ev["events"]]
    assert seqs == sorted(set(seqs))
    # re-posting an accepted prompt_id after the restart does not run it again
    again = post(srv2.url, {"prompt": writer(1, 3.0), "prompt_id": "slow"})
    assert again.status_code == 200 and again.json()["prompt_id"] == "slow"
    # a prompt queued after it has finished, so a second run of "slow" would have finished too
    post(srv2.url, {"prompt": chain(2), "prompt_id": "sentinel"})
    assert wait_status(srv2.url, "sentinel", ("success", "error", "interrupted")) == "success"
    assert (out_dir / "runs.log").read_text().split().count("slow") == 1


def test_on_crash_fail_marks_the_running_prompt_failed(tmp_path, serve_proc):
    srv = serve_proc("--on-crash", "fail")
    # the victim's node takes a minute (it never finishes: it is killed, then marked failed, not re-run)
    post(srv.url, {"prompt": writer(1, 60.0), "prompt_id": "victim"})
    post(srv.url, {"prompt": writer(2, 0.0), "prompt_id": "next"})
    wait_status(srv.url, "victim", ("running",))
    srv.kill()
    srv2 = serve_proc("--on-crash", "fail")
    assert wait_status(srv2.url, "next", ("success",)) == "success"
    st = requests.get(f"{srv2.url}/api/prompt/victim", timeout=SAFETY_S).json()
    assert st["status"] == "error" and st["error"]["exception_type"] == "ServerStopped"
    h = requests.get(f"{srv2.url}/history/victim", timeout=SAFETY_S).json()["victim"]
    assert h["status"]["status_str"] == "error"


def test_client_disconnect_mid_run_loses_nothing(server):
    with server.ws("leaver") as ws:
        recv_json(ws)
        pid = server.post(
            "/prompt",
            {
                "prompt": {
                    "1": {"class_type": "TConst", "inputs": {"value": 3}},
                    "2": {"class_type": "TSleep", "inputs": {"value": ["1", 0], "seconds": 0.6, "steps": 6}},
                    "out": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
                },
                "client_id": "leaver",
            },
        ).json()["prompt_id"]
        seen = []
        while len(seen) < 4:
            m = recv_json(ws)
            if "seq" in m:
                seen.append(m)
    # gone mid-run; the prompt finishes anyway and everything missed can be replayed
    st = server.get(f"/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S - 30)}).json()
    assert st["status"] == "success" and st["outputs"] == {"out": {"text": ["3"]}}
    with server.ws("leaver") as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "replay", "data": {"prompt_id": pid, "since": seen[-1]["seq"]}}))
        rest = recv_until_done(ws, pid)
    all_types = [m["type"] for m in seen] + [t for t in types(rest)]
    assert all_types[:2] == ["execution_start", "execution_cached"]
    assert "execution_success" in all_types and all_types[-1] == "executing"
    assert [m["seq"] for m in seen + rest] == list(range(1, len(seen) + len(rest) + 1))


def test_one_client_cannot_keep_up_others_unaffected(live):
    """A socket that stops reading is cut off once its bounded queue fills; the others get everything."""
    import socket

    s = live(max_queue=200, max_queue_bytes=1 << 20, preview_backlog=4)
    # a raw client that completes the handshake, then never reads
    raw = socket.create_connection(("127.0.0.1", s.port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall(
        (
            f"GET /ws?clientId=lazy HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    hub = s.service.hub
    wait_for(lambda: hub.to_sid("lazy"), "the lazy client to be connected")
    heavy = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "out": {"class_type": "TBigShow", "inputs": {"value": ["1", 0], "size": 400_000}},
    }
    with s.ws("busy") as ws:
        recv_json(ws)
        end = time.monotonic() + SAFETY_S  # a safety net: the lazy client is cut off after a few prompts
        while hub.to_sid("lazy") and time.monotonic() < end:
            # 400 KB 'executed' messages for the lazy client, a small prompt for the busy one
            s.post("/prompt", {"prompt": heavy, "client_id": "lazy"})
            pid = s.post(
                "/prompt", {"prompt": chain(3, value=int(time.time() * 1e6) % 100000), "client_id": "busy"}
            ).json()["prompt_id"]
            assert types(recv_until_done(ws, pid))[-1] == "executing"
    assert not hub.to_sid("lazy")  # disconnected
    raw.close()
    with s.ws("busy") as ws:  # the server still serves
        recv_json(ws)
        pid = s.post("/prompt", {"prompt": chain(2, value=77), "client_id": "busy"}).json()["prompt_id"]
        assert types(recv_until_done(ws, pid))[-1] == "executing"


def test_lagging_client_loses_previews_first_and_keeps_every_event(live):
    """Previews past a small backlog are dropped for a slow reader; every numbered event still arrives."""
    s = live(preview_backlog=2)
    g = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "p": {"class_type": "TPreview", "inputs": {"value": ["1", 0], "steps": 400}},
    }
    with s.ws("slowpoke") as ws:
        recv_json(ws)
        pid = s.post(
            "/prompt", {"prompt": g, "client_id": "slowpoke", "extra_data": {"preview_method": "auto"}}
        ).json()["prompt_id"]
        s.get(f"/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S - 30)})  # not reading meanwhile
        msgs = recv_until_done(ws, pid)
    frames = [m for m in msgs if isinstance(m, bytes)]
    numbered = [m["seq"] for m in msgs if isinstance(m, dict) and "seq" in m]
    assert numbered == list(range(1, numbered[-1] + 1))  # no event lost
    assert sum(1 for m in msgs if isinstance(m, dict) and m["type"] == "progress") == 400
    assert len(frames) < 400  # previews were shed


def test_sigkill_during_a_burst_of_submissions_loses_no_accepted_prompt(tmp_path, serve_proc):
    """Kill while prompts are being posted and run: every prompt that got a 200 is finished after a restart,
    once in history, and no output file was overwritten."""
    import random

    srv = serve_proc()
    accepted: list[str] = []

    def poster():
        s = requests.Session()
        for i in range(200):
            try:
                r = s.post(
                    f"{srv.url}/prompt", json={"prompt": writer(i, 0.02), "prompt_id": f"b{i}"}, timeout=SAFETY_S
                )
            except requests.RequestException:
                return
            if r.status_code == 200:
                accepted.append(r.json()["prompt_id"])

    t = threading.Thread(target=poster)
    t.start()
    try:
        # the kill lands after some prompts were accepted, at a random point of the burst
        n = random.randint(1, 40)
        wait_for(lambda: len(accepted) >= n or not t.is_alive(), f"{n} accepted prompts")
    finally:
        srv.kill()
        t.join(SAFETY_S)
    assert not t.is_alive()
    assert accepted, "nothing was accepted before the kill"
    srv2 = serve_proc()
    for pid in accepted:
        assert wait_status(srv2.url, pid, ("success", "error", "interrupted")) == "success"
    hist = requests.get(f"{srv2.url}/history", timeout=SAFETY_S).json()
    assert set(accepted) <= set(hist)
    names = [p.name for p in (tmp_path / "output").glob("out_*.txt")]
    assert len(names) == len(set(names))
    owners = [p.read_text().split()[0] for p in (tmp_path / "output").glob("out_*.txt")]
    assert set(accepted) <= set(owners)  # each accepted prompt's file exists (none was overwritten)


def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path, serve_proc):
    import subprocess

    from srv_helpers import ROOT, kiln_cmd

    serve_proc()
    import os

    from srv_helpers import die_with_parent

    r = subprocess.run(
        kiln_cmd("serve", "--port", "0", "--base-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=SAFETY_S,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        preexec_fn=die_with_parent,
    )
    assert r.returncode == 2 and "another Kiln server" in r.stderr
