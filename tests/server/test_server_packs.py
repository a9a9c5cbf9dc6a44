"""Custom node packs on a real `kiln serve`: their HTTP routes are mounted, their send_sync messages reach the
websocket, and /api/packs reports what each pack loaded and why one failed."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import requests
from srv_helpers import SAFETY_S
from websockets.sync.client import connect

PACKS = Path(__file__).resolve().parents[1] / "packs"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def pack_server(serve_proc, tmp_path):
    cn = tmp_path / "custom_nodes"
    cn.mkdir()
    for name in ("alpha_nested", "gamma_broken"):
        shutil.copytree(PACKS / name, cn / name, ignore=shutil.ignore_patterns("__pycache__"))
    return serve_proc(custom_nodes=cn)


def test_pack_routes_messages_and_reports(pack_server):
    srv = pack_server
    r = requests.get(srv.url + "/alpha/hello", timeout=SAFETY_S)
    assert r.status_code == 200 and r.json() == {"hello": "alpha"}

    reports = requests.get(srv.url + "/api/packs", timeout=SAFETY_S).json()["packs"]
    by_name = {p["pack"]: p for p in reports}
    assert "AlphaMaths" in by_name["alpha_nested"]["classes"] and not by_name["alpha_nested"]["error"]
    broken = by_name["gamma_broken"]
    assert broken["error"] and "Traceback" in broken["traceback"]

    client_id = uuid.uuid4().hex
    graph = {
        "1": {"class_type": "AlphaMaths", "inputs": {"value": 21}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
    }
    with connect(f"ws://127.0.0.1:{srv.port}/ws?clientId={client_id}", open_timeout=SAFETY_S) as ws:
        r = requests.post(srv.url + "/prompt", json={"prompt": graph, "client_id": client_id}, timeout=SAFETY_S)
        assert r.status_code == 200, r.text
        pid = r.json()["prompt_id"]
        # pack messages and engine events travel separately (engine events are batched), so read until the
        # run has ended AND the pack's message has arrived, in whichever order
        seen, end = [], None
        while end is None or "alpha.done" not in seen:
            m = ws.recv(timeout=SAFETY_S)
            if isinstance(m, bytes):
                continue
            msg = json.loads(m)
            seen.append(msg["type"])
            if msg["type"] in ("execution_success", "execution_error") and msg["data"].get("prompt_id") == pid:
                end = msg
        assert end["type"] == "execution_success", end
        assert "alpha.done" in seen  # the pack's send_sync reached the prompt's client
