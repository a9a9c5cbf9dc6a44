"""What ComfyUI's editor expects of the server beyond the routes: the websocket's feature-flag exchange,
``progress_state`` in ComfyUI's full shape (checked against messages recorded from ComfyUI 0.3.64), the
workflow-templates routes with and without the templates package, and browser sessions that survive a
restart."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import requests
from srv_helpers import SAFETY_S, chain, make_registry, recv_json, recv_until_done

from kiln.engine.registry import PackReport
from kiln.server import protocol

pytestmark = pytest.mark.timeout(600)

TRANSCRIPTS = Path("/work/shared/comfy_ws_transcripts.json")
TOKEN = "persisted-session-token"


def transcripts() -> dict:
    if not TRANSCRIPTS.is_file():
        pytest.skip(f"no ComfyUI transcripts at {TRANSCRIPTS}")
    return json.loads(TRANSCRIPTS.read_text())


def run(server, graph: dict, client_id: str, flags: dict | None = None) -> tuple[str, list]:
    """Submit ``graph`` for a socket with ``client_id`` (which first sends ``flags``, if any); its messages."""
    with server.ws(client_id) as ws:
        assert recv_json(ws)["type"] == "status"
        if flags is not None:
            ws.send(json.dumps({"type": "feature_flags", "data": flags}))
            assert recv_json(ws)["type"] == "feature_flags"
        pid = server.post("/prompt", {"prompt": graph, "client_id": client_id}).json()["prompt_id"]
        return pid, recv_until_done(ws, pid)


def texts(msgs: list) -> list[dict]:
    return [m for m in msgs if isinstance(m, dict)]


def normalized(msgs: list[dict], prompt_id: str) -> list[str]:
    """Messages as JSON text with node ids renamed n1, n2... by first appearance and the prompt id and the
    timestamps blanked, so that a Kiln run and a recorded ComfyUI run of the same graph shape compare
    exactly (``1.0`` and ``1`` stay apart)."""
    names: dict[str, str] = {}

    def name(node):
        if node is None:
            return None
        return names.setdefault(str(node), f"n{len(names) + 1}")

    out = []
    for m in msgs:
        t, d = m["type"], dict(m["data"])
        if t == "status":
            continue
        d.pop("timestamp", None)
        if "prompt_id" in d:
            d["prompt_id"] = "P" if d["prompt_id"] == prompt_id else d["prompt_id"]
        if t == "progress_state":
            d["nodes"] = {
                name(k): {
                    **v,
                    "prompt_id": "P",
                    "node_id": name(v["node_id"]),
                    "display_node_id": name(v["display_node_id"]),
                    "real_node_id": name(v["real_node_id"]),
                }
                for k, v in d["nodes"].items()
            }
        for key in ("node", "display_node"):
            if key in d:
                d[key] = name(d[key])
        if t == "execution_cached":
            d["nodes"] = [name(n) for n in d["nodes"]]
        if t == "executed":
            d["output"] = "..."  # the outputs of different nodes
        out.append(json.dumps({"type": t, "data": d}, sort_keys=True))
    return out


def recorded(case: dict) -> tuple[list[dict], str]:
    msgs = [m["body"] for m in case["ws_messages"] if m["kind"] == "text"]
    return msgs, case["request"]["body"]["prompt_id"]


# -- feature flags ------------------------------------------------------------------------------------------
def test_feature_flags_reply_and_client_flags_pick_the_preview_frame(server):
    ref = transcripts()["connect_feature_flags"]["handshake"][-1]["body"]
    graph = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "p": {"class_type": "TPreview", "inputs": {"value": ["1", 0], "steps": 2}},
    }
    frames = {}
    for n, flags in enumerate(({"supports_preview_metadata": True}, {"supports_preview_metadata": False}, None)):
        graph["1"]["inputs"]["value"] = n + 1  # no cache hit
        with server.ws(f"c{n}") as ws:
            assert recv_json(ws)["type"] == "status"
            if flags is not None:
                ws.send(json.dumps({"type": "feature_flags", "data": {**flags, "supports_progress_text_metadata": 1}}))
                reply = recv_json(ws)
                # the keys ComfyUI 0.3.64 answers with, with Kiln's values (Kiln's own flags under "kiln")
                assert reply["type"] == ref["type"] and set(ref["data"]) <= set(reply["data"])
                assert reply["data"]["supports_preview_metadata"] is True
                assert reply["data"]["max_upload_size"] == server.config.max_upload_bytes
                assert "extension" not in reply["data"], "Kiln has no manager extension to announce"
                assert server.get("/api/features").json() == reply["data"]
            body = {"prompt": graph, "client_id": f"c{n}", "extra_data": {"preview_method": "auto"}}
            pid = server.post("/prompt", body).json()["prompt_id"]
            frames[n] = [m for m in recv_until_done(ws, pid) if isinstance(m, bytes)]
    assert len(frames[0]) == 2 and all(struct.unpack(">I", f[:4])[0] == 4 for f in frames[0])
    size = struct.unpack(">I", frames[0][0][4:8])[0]
    meta = json.loads(frames[0][0][8 : 8 + size])
    assert meta["node_id"] == "p" and meta["display_node_id"] == "p" and meta["image_type"] == "image/jpeg"
    for n in (1, 2):  # metadata not asked for, or no flags at all: ComfyUI's plain type 1 with the format
        assert len(frames[n]) == 2 and all(struct.unpack(">II", f[:8]) == (1, 1) for f in frames[n])


def test_progress_text_frame_layouts():
    assert protocol.progress_text_frame("12", "hi") == struct.pack(">II", 3, 2) + b"12hi"
    framed = protocol.progress_text_frame("7", "ok", prompt_id="ab")
    assert framed == struct.pack(">II", 3, 2) + b"ab" + struct.pack(">I", 1) + b"7ok"


# -- progress_state ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [None, {"supports_preview_metadata": True}], ids=["plain", "feature-flags"])
def test_progress_state_matches_comfyui_message_for_message(server, flags):
    """chain(4) has ComfyUI's recorded 5-node chain's shape: a first run and a cached re-run give the same
    messages, progress_state included, in the same order and with the same numbers."""
    data = transcripts()
    fresh, cached = data["cases_plain_client"][0], data["cases_plain_client"][1]
    assert fresh["name"] == "success_chain5" and cached["name"] == "success_chain5_cached"
    graph = chain(4)
    for case in (fresh, cached):
        pid, msgs = run(server, graph, "ed", flags)
        want, want_pid = recorded(case)
        assert normalized(texts(msgs), pid) == normalized(want, want_pid), case["name"]
    states = [m for m in texts(msgs) if m["type"] == "progress_state"]
    assert states[-1]["data"]["nodes"]["out"] == {  # a cached output node: ComfyUI's integer 1 of 1
        "value": 1,
        "max": 1,
        "state": "finished",
        "node_id": "out",
        "prompt_id": pid,
        "display_node_id": "out",
        "parent_node_id": None,
        "real_node_id": "out",
    }


def test_recorded_comfyui_runs_replayed_give_the_same_messages(live):
    """ComfyUI's own recorded graphs (EmptyImage, ImageBlur, ImageInvert, PreviewImage), in recorded order:
    every message but status, progress_state snapshots included, equal after renaming ids."""
    data = transcripts()
    s = live(registry=make_registry(image_nodes=True))
    cases = [(g, c) for g in ("cases_plain_client", "cases_feature_flags_client") for c in data[g]]
    ran = 0
    for group, case in cases:
        if case["response"]["status"] != 200 or not case["name"].startswith("success"):
            continue
        body = case["request"]["body"]
        flags = {"supports_preview_metadata": True} if group == "cases_feature_flags_client" else None
        with s.ws(body["client_id"]) as ws:
            recv_json(ws)
            if flags is not None:
                ws.send(json.dumps({"type": "feature_flags", "data": flags}))
                recv_json(ws)
            assert s.post("/prompt", body).status_code == 200
            msgs = texts(recv_until_done(ws, body["prompt_id"]))
        want, want_pid = recorded(case)
        assert normalized(msgs, body["prompt_id"]) == normalized(want, want_pid), case["name"]
        ran += 1
    assert ran >= 4


def test_progress_state_reports_steps_and_the_failed_node(server):
    g = {
        "1": {"class_type": "TConst", "inputs": {"value": 3}},
        "s": {"class_type": "TSleep", "inputs": {"value": ["1", 0], "seconds": 0.0, "steps": 3}},
        "f": {"class_type": "TFail", "inputs": {"value": ["s", 0], "message": "kaputt"}},
        "out": {"class_type": "TShow", "inputs": {"value": ["f", 0]}},
    }
    pid, msgs = run(server, g, "fails")
    msgs = texts(msgs)
    states = [m["data"]["nodes"] for m in msgs if m["type"] == "progress_state"]
    steps = [s["s"]["value"] for s in states if s.get("s", {}).get("state") == "running"]
    assert steps[0] == 0.0 and steps[-1] == 3 and steps == sorted(steps)
    assert {"1": "finished", "s": "finished", "f": "error"} == {k: v["state"] for k, v in states[-1].items()}
    assert states[-1]["s"]["value"] == states[-1]["s"]["max"] == 3  # finished: value is the last max
    # the failed node's state comes before execution_error, and nothing about the nodes after it
    assert [m["type"] for m in msgs][-4:] == ["progress_state", "execution_error", "status", "executing"]
    assert msgs[-3]["data"]["node_id"] == "f"


def test_progress_state_reaches_every_socket_when_the_prompt_has_no_client(server):
    with server.ws("watcher") as ws:
        recv_json(ws)
        pid = server.post("/prompt", {"prompt": chain(2)}).json()["prompt_id"]
        seen = []
        while not seen or seen[-1]["data"]["nodes"].get("out", {}).get("state") != "finished":
            m = recv_json(ws)
            if m["type"] == "progress_state":
                seen.append(m)
    assert all(m["data"]["prompt_id"] == pid for m in seen)
    assert set(seen[-1]["data"]["nodes"]) == {"1", "2", "out"}


def test_snapshots_are_complete_up_to_the_limit_and_bounded_past_it():
    def entry(node: str, state: str, value=0, max_=1) -> dict:
        ids = {"node_id": node, "display_node_id": node, "parent_node_id": None, "real_node_id": node}
        return {"value": value, "max": max_, "state": state, "prompt_id": "p", **ids}

    small = protocol.ProgressStates("p", limit=8)
    for i in range(8):
        small.update(entry(str(i), "running"))
        last = small.update(entry(str(i), "finished", 1, 1))
    assert last is not None and list(last["nodes"]) == [str(i) for i in range(8)]
    assert small.update(entry("7", "finished", 1, 1)) is None  # nothing changed: nothing to send

    big = protocol.ProgressStates("p", limit=8, tail=3)
    sizes = []
    for i in range(100):
        for state, value, max_ in (("running", 0, 1), ("running", 5, 10), ("finished", 1, 1)):
            body = big.update(entry(str(i), state, value, max_))
            assert body is not None and str(i) in body["nodes"]
            sizes.append(len(body["nodes"]))
    assert max(sizes) == 8 and sizes[-1] == 4 and len(big.nodes) == 100  # full up to 8, then the tail
    assert list(body["nodes"]) == ["96", "97", "98", "99"]  # the changed node and the 3 finished before it
    assert body["nodes"]["99"]["value"] == body["nodes"]["99"]["max"] == 10
    assert big.end("success") is None and big.update(entry("100", "running")) is None  # ended


# -- workflow templates -----------------------------------------------------------------------------------
@pytest.fixture
def templates_package(tmp_path, monkeypatch):
    """Installs a stand-in ``comfyui_workflow_templates`` (one of two layouts) for one test."""
    name = "comfyui_workflow_templates"

    def install(layout: str) -> Path:
        root = tmp_path / f"site-{layout}"
        pkg = root / name
        files = pkg / ("templates" if layout == "folder" else "assets")
        files.mkdir(parents=True)
        (files / "index.json").write_text(json.dumps([{"moduleName": "default", "templates": [{"name": "t2i"}]}]))
        (files / "t2i.json").write_text(json.dumps({"nodes": [], "links": []}))
        (files / "t2i-1.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBP")
        init = ""
        if layout == "assets":
            init = (
                "from pathlib import Path\n"
                "from types import SimpleNamespace as NS\n"
                "HERE = Path(__file__).parent / 'assets'\n"
                "def iter_templates():\n"
                "    names = ['index.json', 't2i.json', 't2i-1.webp']\n"
                "    yield NS(template_id='t2i', assets=[NS(filename=n) for n in names])\n"
                "def get_asset_path(template_id, filename):\n"
                "    return str(HERE / filename)\n"
            )
        (pkg / "__init__.py").write_text(init)
        monkeypatch.syspath_prepend(str(root))
        return files

    monkeypatch.delitem(sys.modules, name, raising=False)
    yield install
    sys.modules.pop(name, None)


def test_templates_without_the_package_are_404_like_comfyui(server):
    for path in ("/templates/index.json", "/templates/index.fr.json", "/templates/t2i-1.webp"):
        assert server.get(path).status_code == 404
    for prefix in ("", "/api"):
        assert server.get(prefix + "/workflow_templates").json() == {}


@pytest.mark.parametrize("layout", ["folder", "assets"])
def test_templates_from_the_installed_package(live, templates_package, layout, tmp_path):
    files = templates_package(layout)
    (tmp_path / "secret.json").write_text("{}")
    s = live()
    r = s.get("/templates/index.json")
    assert r.status_code == 200 and r.json() == json.loads((files / "index.json").read_text())
    assert s.get("/templates/t2i.json").json() == {"nodes": [], "links": []}
    thumb = s.get("/templates/t2i-1.webp")
    assert thumb.status_code == 200 and thumb.content.startswith(b"RIFF")
    assert thumb.headers["Content-Type"] == "image/webp"
    for bad in ("/templates/missing.json", "/templates/..%2F..%2Fsecret.json", "/templates/%2Fetc%2Fpasswd"):
        assert s.get(bad).status_code == 404, bad


def test_custom_packs_example_workflows_are_listed_and_served(live, tmp_path):
    pack = tmp_path / "custom_nodes" / "my_pack"
    (pack / "example_workflows").mkdir(parents=True)
    (pack / "example_workflows" / "upscale.json").write_text('{"nodes": []}')
    (pack / "example_workflows" / "upscale.jpg").write_bytes(b"\xff\xd8")
    (pack / "Workflows").mkdir()
    (pack / "Workflows" / "batch.json").write_text("{}")
    (pack / "web").mkdir()
    (pack / "web" / "not_a_template.json").write_text("{}")
    broken = tmp_path / "custom_nodes" / "broken_pack"
    (broken / "examples").mkdir(parents=True)
    (broken / "examples" / "x.json").write_text("{}")
    reg = make_registry()
    reg.pack_reports = [
        PackReport(pack="my_pack", path=str(pack)),
        PackReport(pack="broken_pack", path=str(broken), error="ImportError"),
    ]
    s = live(registry=reg)
    for prefix in ("", "/api"):
        assert s.get(prefix + "/workflow_templates").json() == {"my_pack": ["batch", "upscale"]}
    assert s.get("/api/workflow_templates/my_pack/upscale.json").json() == {"nodes": []}
    assert s.get("/api/workflow_templates/my_pack/upscale.jpg").content == b"\xff\xd8"
    assert s.get("/api/workflow_templates/my_pack/batch.json").status_code == 200
    for bad in ("my_pack/..%2Fweb%2Fnot_a_template.json", "broken_pack/x.json", "other/upscale.json"):
        assert s.get("/api/workflow_templates/" + bad).status_code == 404, bad


# -- browser sessions across a restart -------------------------------------------------------------------------
def _log_in(s) -> str:
    r = requests.post(s.url + "/login", data={"token": TOKEN}, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 303, r.text
    return r.cookies[f"kiln_session_{s.port}"]


def _with_cookie(s, session_id: str, path: str = "/api/queue", method: str = "get") -> int:
    cookies = {f"kiln_session_{s.port}": session_id}
    return requests.request(method, s.url + path, cookies=cookies, allow_redirects=False, timeout=SAFETY_S).status_code


def test_login_sessions_survive_a_restart(live, tmp_path):
    data = tmp_path / "shared-data"
    s = live(data_dir=data, auth_token=TOKEN)
    kept, ended = _log_in(s), _log_in(s)
    assert _with_cookie(s, kept) == 200 and _with_cookie(s, ended) == 200
    s.stop()
    stored = (data / "sessions.sqlite").read_bytes()
    for secret in (kept, ended, TOKEN):  # the file alone lets nobody in and says nothing of the token
        assert secret.encode() not in stored

    s2 = live(data_dir=data, auth_token=TOKEN)
    assert _with_cookie(s2, kept) == 200 and _with_cookie(s2, ended) == 200
    assert _with_cookie(s2, "forged-" + kept[7:]) == 401
    assert _with_cookie(s2, ended, "/logout", "post") == 303
    assert _with_cookie(s2, ended) == 401
    s2.stop()

    s3 = live(data_dir=data, auth_token=TOKEN)  # a log-out is remembered too
    assert _with_cookie(s3, kept) == 200 and _with_cookie(s3, ended) == 401
    s3.stop()

    s4 = live(data_dir=data, auth_token=TOKEN + "-rotated")  # a new token ends every session
    assert _with_cookie(s4, kept) == 401
    s4.stop()

    (data / "sessions.sqlite").write_bytes(b"not a database" * 100)  # an unreadable file: memory only
    s5 = live(data_dir=data, auth_token=TOKEN)
    assert _with_cookie(s5, _log_in(s5)) == 200


def test_partial_execution_targets_with_subgraph_path_ids(server):
    """The editor runs one output of a graph whose nodes came out of subgraphs ("12:34:56" ids): only that
    output and what it needs run."""
    g = {
        "12:34:1": {"class_type": "TConst", "inputs": {"value": 5}},
        "12:34:2": {"class_type": "TShow", "inputs": {"value": ["12:34:1", 0]}},
        "12:7": {"class_type": "TConst", "inputs": {"value": 9}},
        "12:8": {"class_type": "TShow", "inputs": {"value": ["12:7", 0]}},
    }
    body = {"prompt": g, "partial_execution_targets": ["12:34:2"]}
    r = server.post("/prompt?wait=true", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "success" and set(out["outputs"]) == {"12:34:2"}
    assert out["outputs"]["12:34:2"]["text"] == ["5"]
    bad = server.post("/prompt", {"prompt": g, "partial_execution_targets": ["12:34:9"]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "prompt_no_outputs"  # as ComfyUI
