"""The routes ComfyUI's graph editor needs, on a real server: the editor at /, user files and settings,
the catalogue routes, the Jobs API (over the SQLite store, across a restart), UI-format workflows posted to
/prompt, and uploads whose temporary files stay in the server's own folder."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from PIL import Image
from srv_helpers import SAFETY_S, Gate, chain, make_registry

from kiln.engine import Graph
from kiln.server.frontend import installed_front_end

pytestmark = pytest.mark.timeout(600)


def wait_done(server, pid) -> dict:
    done = server.get(f"/api/prompt/{pid}", params={"wait": "true", "timeout": str(SAFETY_S - 30)}).json()
    assert done["status"] not in ("pending", "running"), done
    return done


def run(server, graph: dict, **extra) -> str:
    r = server.post("/prompt", {"prompt": graph, **extra})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    wait_done(server, pid)
    return pid


def png(color=(255, 0, 0, 255), size=(8, 8), mode="RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color[: len(mode)] if mode != "L" else color[0]).save(buf, "PNG")
    return buf.getvalue()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# -- the editor at / ---------------------------------------------------------------------------------
def test_landing_page_without_an_editor(server):
    r = server.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "Kiln" in r.text and "pip install -e '.[ui]'" in r.text and "--front-end-root" in r.text
    # with no build, other paths are still the API's: an unknown one is a JSON 404
    assert server.get("/assets/app.js").status_code == 404


def test_front_end_root_is_served_and_confined(live, tmp_path):
    build = tmp_path / "build"
    (build / "assets").mkdir(parents=True)
    (build / "index.html").write_text("<html>editor build</html>")
    (build / "assets" / "app.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("not served")
    s = live(front_end_root=build)
    r = s.get("/")
    assert r.status_code == 200 and r.text == "<html>editor build</html>"
    r = s.get("/assets/app.js")
    assert r.status_code == 200 and r.text == "console.log(1)" and "javascript" in r.headers["Content-Type"]
    assert s.get("/nope.js").status_code == 404
    assert s.get("/assets/..%2F..%2Fsecret.txt").status_code == 404
    assert s.get("/%2E%2E/secret.txt").status_code in (400, 404)
    # the API keeps its routes, at both prefixes
    assert s.get("/api/queue").json() == {"queue_running": [], "queue_pending": []}
    assert s.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_installed_front_end_is_found_through_the_package(tmp_path, monkeypatch):
    static = tmp_path / "site" / "comfyui_frontend_package" / "static"
    static.mkdir(parents=True)
    (static.parent / "__init__.py").write_text("")
    (static / "index.html").write_text("<html></html>")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert installed_front_end() == static


def test_kiln_serve_front_end_root(serve_proc, tmp_path):
    build = tmp_path / "ui-build"
    build.mkdir()
    (build / "index.html").write_text("<html>from the flag</html>")
    p = serve_proc("--front-end-root", str(build))
    assert requests.get(p.url + "/", timeout=SAFETY_S).text == "<html>from the flag</html>"
    assert requests.get(p.url + "/api/jobs", timeout=SAFETY_S).json()["jobs"] == []
    assert "Graph editor at /" in p.log()


def test_kiln_serve_refuses_a_front_end_root_without_index(tmp_path, capsys):
    from kiln.cli import main

    assert main(["serve", "--port", "0", "--base-dir", str(tmp_path), "--front-end-root", str(tmp_path)]) == 2
    assert "has no index.html" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before anything started


# -- catalogue routes --------------------------------------------------------------------------------
def _safetensors(path: Path, metadata: dict) -> None:
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    raw = header.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0\0\0")


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_catalogue_routes_have_comfyuis_shapes(server, prefix):
    assert server.get(prefix + "/users").json() == {"storage": "server", "migrated": True}
    assert server.get(prefix + "/i18n").json() == {}
    assert server.get(prefix + "/global_subgraphs").json() == {}
    assert server.get(prefix + "/workflow_templates").json() == {}
    assert server.get(prefix + "/node_replacements").json() == {}
    assert server.get(prefix + "/extensions").json() == []
    folders = server.get(prefix + "/experiment/models").json()
    ckpt = next(f for f in folders if f["name"] == "checkpoints")
    assert ckpt["folders"][0].endswith("checkpoints")
    _safetensors(server.folders.models["checkpoints"][0] / "sub" / "m.safetensors", {"ss_network_dim": "8"})
    assert server.get(prefix + "/experiment/models/checkpoints").json() == [
        {"name": "sub/m.safetensors", "pathIndex": 0}
    ]
    assert server.get(prefix + "/experiment/models/nope").status_code == 404
    r = server.get(prefix + "/view_metadata/checkpoints", params={"filename": "sub/m.safetensors"})
    assert r.status_code == 200 and r.json() == {"ss_network_dim": "8"}
    for name in ("missing.safetensors", "../m.safetensors", "sub/m.ckpt"):
        assert server.get(prefix + "/view_metadata/checkpoints", params={"filename": name}).status_code == 404
    assert server.get(prefix + "/jobs").json()["jobs"] == []


def test_internal_files_lists_output_images_newest_first(server):
    out = server.folders.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["b.png", "a.png", "c.webp", "notes.txt"]):
        (out / name).write_bytes(png())
        t = 1_700_000_000 + i * 10
        os.utime(out / name, (t, t))
    (out / "sub").mkdir()
    (out / "sub" / "deep.png").write_bytes(png())
    assert server.get("/internal/files/output").json() == ["c.webp", "a.png", "b.png"]
    assert server.get("/internal/files/input").json() == []
    assert server.get("/internal/files/models").status_code == 400


def test_custom_pack_web_directory_is_served(live, tmp_path):
    web = tmp_path / "pack_web"
    (web / "sub").mkdir(parents=True)
    (web / "main.js").write_text("export const x = 1")
    (web / "sub" / "more.js").write_text("export const y = 2")
    (web / "style.css").write_text("p{}")
    (tmp_path / "outside.js").write_text("secret")
    reg = make_registry()
    reg.web_directories = {"my_pack": web}
    s = live(registry=reg)
    for prefix in ("", "/api"):
        assert s.get(prefix + "/extensions").json() == [
            "/extensions/my_pack/main.js",
            "/extensions/my_pack/sub/more.js",
        ]
    assert s.get("/extensions/my_pack/sub/more.js").text == "export const y = 2"
    assert s.get("/extensions/my_pack/..%2Foutside.js").status_code == 404
    assert s.get("/extensions/other/main.js").status_code == 404


# -- settings and user files ---------------------------------------------------------------------------
def test_settings_round_trip(server):
    assert server.get("/api/settings").json() == {}
    assert server.post("/api/settings", {"Comfy.Theme": "dark", "Comfy.Zoom": 2}).status_code == 200
    assert server.post("/settings/Comfy.Zoom", 3).status_code == 200
    assert server.get("/api/settings").json() == {"Comfy.Theme": "dark", "Comfy.Zoom": 3}
    assert server.get("/api/settings/Comfy.Theme").json() == "dark"
    assert server.get("/api/settings/Unknown").json() is None
    assert server.post("/api/settings", [1, 2]).status_code == 400
    stored = json.loads((server.config.data_dir / "userdata" / "comfy.settings.json").read_text())
    assert stored == {"Comfy.Theme": "dark", "Comfy.Zoom": 3}


def test_concurrent_setting_updates_are_all_kept(server):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: server.post(f"/api/settings/Key.{i}", i).status_code, range(24)))
    assert codes == [200] * 24
    assert server.get("/api/settings").json() == {f"Key.{i}": i for i in range(24)}


def test_userdata_store_list_move_delete(server):
    def post(name, data, **q):
        return requests.post(f"{server.url}/api/userdata/{quote(name, safe='')}", data=data, params=q, timeout=SAFETY_S)

    r = post("workflows/a.json", b'{"nodes": []}')
    assert r.status_code == 200 and r.json() == "workflows/a.json"
    assert post("workflows/deep/b.json", b"{}", full_info="true").json()["path"] == "workflows/deep/b.json"
    assert post("workflows/a.json", b"other", overwrite="false").status_code == 409
    assert post("workflows/a.json", b'{"v": 2}', overwrite="true").status_code == 200
    assert server.get("/api/userdata/" + quote("workflows/a.json", safe="")).content == b'{"v": 2}'
    assert server.get("/api/userdata", params={"dir": "workflows"}).json() == ["a.json"]
    listing = server.get("/userdata", params={"dir": "workflows", "recurse": "true"}).json()
    assert listing == ["a.json", "deep/b.json"]
    split = server.get("/userdata", params={"dir": "workflows", "recurse": "true", "split": "true"}).json()
    assert split == [["a.json", "a.json"], ["deep/b.json", "deep", "b.json"]]
    full = server.get("/userdata", params={"dir": "workflows", "full_info": "true"}).json()
    assert full[0]["path"] == "a.json" and full[0]["size"] == 8 and full[0]["modified"] > 0
    assert server.get("/userdata", params={"dir": "nope"}).status_code == 404
    assert server.get("/userdata").status_code == 400

    src, dest = quote("workflows/a.json", safe=""), quote("workflows/renamed.json", safe="")
    r = server.post(f"/api/userdata/{src}/move/{dest}")
    assert r.status_code == 200 and r.json() == "workflows/renamed.json"
    assert server.get(f"/api/userdata/{src}").status_code == 404
    assert server.post(f"/api/userdata/{src}/move/{dest}").status_code == 404
    post("workflows/c.json", b"c")
    c = quote("workflows/c.json", safe="")
    assert server.post(f"/api/userdata/{c}/move/{dest}", params={"overwrite": "false"}).status_code == 409
    assert requests.delete(f"{server.url}/userdata/{dest}", timeout=SAFETY_S).status_code == 204
    assert requests.delete(f"{server.url}/userdata/{dest}", timeout=SAFETY_S).status_code == 404
    assert files_under(server.config.data_dir / "userdata") == {"workflows/c.json", "workflows/deep/b.json"}


BAD_NAMES = ["../escape.json", "/etc/kiln-escape.json", "a\0b.json", "sub/../../escape.json", "a\\..\\escape.json"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_userdata_names_are_confined(live, tmp_path, name):
    s = live()
    before = files_under(tmp_path)
    url = f"{s.url}/api/userdata/{quote(name, safe='', errors='surrogatepass')}"
    assert requests.post(url, data=b"x", timeout=SAFETY_S).status_code == 400
    assert requests.get(url, timeout=SAFETY_S).status_code == 400
    assert requests.delete(url, timeout=SAFETY_S).status_code == 400
    ok = quote("ok.json", safe="")
    requests.post(f"{s.url}/api/userdata/{ok}", data=b"x", timeout=SAFETY_S)
    r = requests.post(f"{s.url}/api/userdata/{ok}/move/{quote(name, safe='')}", timeout=SAFETY_S)
    assert r.status_code == 400
    assert requests.get(f"{s.url}/api/userdata", params={"dir": name}, timeout=SAFETY_S).status_code == 400
    after = files_under(tmp_path) - before
    assert after == {"s0/data/userdata/ok.json"}, after
    assert not Path("/etc/kiln-escape.json").exists()


def test_userdata_symlinks_and_size_cap(live, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    s = live(max_userdata_bytes=1000)
    root = s.config.data_dir / "userdata"
    root.mkdir(parents=True, exist_ok=True)
    (root / "link").symlink_to(outside, target_is_directory=True)
    url = f"{s.url}/api/userdata/"
    assert requests.post(url + quote("link/x.json", safe=""), data=b"x", timeout=SAFETY_S).status_code == 400
    assert requests.post(url + "big.json", data=b"x" * 2000, timeout=SAFETY_S).status_code == 413

    def chunks():  # no Content-Length: the cap holds while streaming
        for _ in range(20):
            yield b"y" * 100

    assert requests.post(url + "big2.json", data=chunks(), timeout=SAFETY_S).status_code == 413
    assert requests.post(url + "small.json", data=b"z" * 1000, timeout=SAFETY_S).status_code == 200
    assert list(outside.iterdir()) == []
    assert files_under(root) == {"small.json"}


# -- the Jobs API ---------------------------------------------------------------------------------------
def _wf(wid: str) -> dict:
    return {"extra_pnginfo": {"workflow": {"id": wid}}}


def test_jobs_filter_sort_paginate_detail(server):
    done = [run(server, chain(2, value=i), extra_data=_wf("wf-a" if i < 2 else "wf-b")) for i in range(3)]
    bad = chain(2)
    bad["2"] = {"class_type": "TFail", "inputs": {"value": ["1", 0], "message": "no luck"}}
    failed = run(server, bad)
    gate = Gate()
    running = server.post("/prompt", {"prompt": gate.graph()}).json()["prompt_id"]
    assert gate.entered.wait(SAFETY_S)
    pending = server.post("/prompt", {"prompt": chain(3)}).json()["prompt_id"]
    try:
        page = server.get("/api/jobs").json()
        ids = [j["id"] for j in page["jobs"]]
        assert ids == [pending, running, failed, *done[::-1]]  # newest first by default
        assert page["pagination"] == {"offset": 0, "limit": None, "total": 6, "has_more": False}
        by_id = {j["id"]: j for j in page["jobs"]}
        assert by_id[pending]["status"] == "pending" and by_id[running]["status"] == "in_progress"
        assert by_id[failed]["status"] == "failed" and by_id[failed]["execution_error"]["exception_message"]
        assert "no luck" in by_id[failed]["execution_error"]["exception_message"]
        job = by_id[done[0]]
        assert job["status"] == "completed" and job["workflow_id"] == "wf-a" and job["outputs_count"] == 0
        assert job["execution_end_time"] >= job["execution_start_time"] and isinstance(job["create_time"], int)

        asc = server.get("/api/jobs", params={"sort_order": "asc", "limit": "2", "offset": "1"}).json()
        assert [j["id"] for j in asc["jobs"]] == [done[1], done[2]]
        assert asc["pagination"] == {"offset": 1, "limit": 2, "total": 6, "has_more": True}
        last = server.get("/api/jobs", params={"sort_order": "asc", "limit": "2", "offset": "4"}).json()
        assert last["pagination"]["has_more"] is False and len(last["jobs"]) == 2
        two = server.get("/jobs", params={"status": "completed,failed"}).json()
        assert {j["id"] for j in two["jobs"]} == {*done, failed} and two["pagination"]["total"] == 4
        active = server.get("/jobs", params={"status": "pending,in_progress"}).json()["jobs"]
        assert {j["id"] for j in active} == {pending, running}
        wf = server.get("/api/jobs", params={"workflow_id": "wf-a"}).json()["jobs"]
        assert {j["id"] for j in wf} == set(done[:2])
        dur = server.get("/api/jobs", params={"sort_by": "execution_duration", "status": "completed"}).json()
        assert len(dur["jobs"]) == 3
        for bad_q in ({"status": "done"}, {"sort_by": "name"}, {"sort_order": "up"}, {"limit": "0"}, {"offset": "-1"}):
            assert server.get("/api/jobs", params=bad_q).status_code == 400, bad_q

        detail = server.get(f"/api/jobs/{done[0]}").json()
        assert detail["workflow"]["prompt"]["out"]["class_type"] == "TShow"
        assert detail["workflow"]["extra_data"]["extra_pnginfo"]["workflow"]["id"] == "wf-a"
        assert detail["outputs"]["out"]["text"] == ["1"]
        assert detail["execution_status"]["status_str"] == "success"
        assert server.get("/api/jobs/nope").status_code == 404

        # cancel: a pending job ends at once, a running one is interrupted; both idempotent
        r = server.post(f"/api/jobs/{pending}/cancel")
        assert r.status_code == 200 and r.json() == {"id": pending, "status": "cancelled"}
        assert server.post(f"/jobs/{pending}/cancel").json()["status"] == "cancelled"
        r = server.post("/api/jobs/cancel", {"job_ids": [running, done[0], "ghost"]})
        assert r.status_code == 200
        assert r.json()["not_found"] == ["ghost"] and r.json()["cancelled"] == [running]
        assert {"id": done[0], "status": "completed"} in r.json()["jobs"]
        assert wait_done(server, running)["status"] == "interrupted"
        again = server.post("/api/jobs/cancel", {"job_ids": [running, pending]}).json()
        assert again["cancelled"] == [] and again["not_found"] == []
        assert again["jobs"] == [{"id": running, "status": "cancelled"}, {"id": pending, "status": "cancelled"}]
        assert server.post("/api/jobs/cancel", {"job_ids": "x"}).status_code == 400
        assert server.post("/api/jobs/ghost/cancel").status_code == 404
        cancelled = server.get("/api/jobs", params={"status": "cancelled"}).json()["jobs"]
        assert {j["id"] for j in cancelled} == {pending, running}
    finally:
        gate.open()


def test_jobs_survive_a_restart(live, tmp_path):
    data = tmp_path / "shared-data"
    s = live(data_dir=data)
    pids = [run(s, chain(2, value=i)) for i in range(3)]
    before = s.get("/api/jobs").json()
    s.stop()
    s2 = live(data_dir=data)
    after = s2.get("/api/jobs").json()
    assert after == before and [j["id"] for j in after["jobs"]] == pids[::-1]
    assert s2.get(f"/api/jobs/{pids[0]}").json()["outputs"]["out"]["text"] == ["1"]


# -- UI-format workflows over HTTP -----------------------------------------------------------------------
def ui_workflow(const: int = 5, add: int = 10) -> dict:
    return {
        "last_node_id": 3,
        "last_link_id": 2,
        "version": 0.4,
        "nodes": [
            {
                "id": 1,
                "type": "TConst",
                "mode": 0,
                "inputs": [],
                "widgets_values": [const],
                "outputs": [{"name": "INT", "type": "INT", "links": [1], "slot_index": 0}],
            },
            {
                "id": 2,
                "type": "TAdd",
                "mode": 0,
                "inputs": [{"name": "a", "type": "INT", "link": 1}],
                "widgets_values": [add],
                "outputs": [{"name": "INT", "type": "INT", "links": [2], "slot_index": 0}],
            },
            {
                "id": 3,
                "type": "TShow",
                "mode": 0,
                "inputs": [{"name": "value", "type": "INT", "link": 2}],
                "widgets_values": [],
                "outputs": [],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]],
    }


@pytest.mark.parametrize("key", ["prompt", "workflow"])
def test_ui_workflow_posted_to_prompt_runs(server, key):
    r = server.post("/api/prompt", {key: ui_workflow(5, 10)})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    assert wait_done(server, pid)["outputs"]["3"]["text"] == ["15"]
    # what is stored is the API graph: crash recovery reads it back without a registry
    row = server.call(server.service.store.get, pid)
    assert set(row.prompt) == {"1", "2", "3"} and row.prompt["2"]["class_type"] == "TAdd"
    assert Graph.from_json(row.prompt).nodes["2"].inputs["b"] == 10
    hist = server.get(f"/history/{pid}").json()[pid]
    assert hist["prompt"][2]["3"]["class_type"] == "TShow"


def test_ui_workflow_with_an_unknown_node_is_a_validation_error(server):
    wf = ui_workflow()
    wf["nodes"][1]["type"] = "NoSuchNode"
    r = server.post("/prompt", {"prompt": wf})
    assert r.status_code == 400 and r.json()["node_errors"] or r.json()["error"]


# -- uploads ---------------------------------------------------------------------------------------------
def _upload(server, data: bytes, route="/upload/image", **fields):
    return requests.post(
        server.url + route, files={"image": ("pic.png", data, "image/png")}, data=fields, timeout=SAFETY_S
    )


def test_upload_temp_files_never_touch_the_shared_temp_dir(live, tmp_path, monkeypatch):
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    data = tmp_path / "d"
    (data / "tmp-uploads").mkdir(parents=True)
    (data / "tmp-uploads" / "kiln-upload-stale").write_bytes(b"left by a killed server")
    s = live(data_dir=data, max_upload_bytes=50_000)
    assert not (data / "tmp-uploads" / "kiln-upload-stale").exists()  # cleaned at start-up
    assert _upload(s, png()).status_code == 200
    assert _upload(s, b"not an image").status_code == 415
    assert _upload(s, b"\0" * 60_000).status_code == 413
    assert _upload(s, png(), route="/upload/mask", original_ref="{bad json").status_code == 400
    assert _upload(s, png(), type="nowhere").status_code == 400
    assert _upload(s, png(), subfolder="../x").status_code == 400
    assert list(shared.iterdir()) == []
    assert list((data / "tmp-uploads").iterdir()) == []


def test_mask_upload_sets_the_originals_alpha(server):
    orig = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(orig, "PNG")
    r = requests.post(
        server.url + "/api/upload/image", files={"image": ("base.png", orig.getvalue())}, timeout=SAFETY_S
    )
    assert r.json() == {"name": "base.png", "subfolder": "", "type": "input"}
    mask = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    mask.putpixel((0, 0), (0, 0, 0, 0))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    ref = json.dumps({"filename": "base.png", "subfolder": "", "type": "input"})
    r = _upload(server, buf.getvalue(), route="/api/upload/mask", original_ref=ref)
    assert r.status_code == 200, r.text
    out = Image.open(server.folders.input_dir / r.json()["name"])
    assert out.mode == "RGBA" and out.getpixel((1, 1)) == (10, 20, 30, 255) and out.getpixel((0, 0))[3] == 0
    assert out.getpixel((0, 0))[:3] == (10, 20, 30)


def test_internal_folder_paths_lists_where_each_model_kind_looks(server):
    r = server.get("/internal/folder_paths")
    assert r.status_code == 200
    paths = r.json()
    assert isinstance(paths["checkpoints"], list) and paths["checkpoints"][0].endswith("checkpoints")
