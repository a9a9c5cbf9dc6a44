"""Clients: a third-party ComfyUI client from PyPI (comfy-api-simplified) against a real `kiln serve`,
kiln.Client (submit, events, images, download, cancel, reconnect + replay across a server restart), and
the `kiln submit` subcommand."""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading

import pytest
import requests
from PIL import Image
from srv_helpers import ROOT, SAFETY_S, Gate, chain, die_with_parent, kiln_cmd, make_registry, sleeper, wait_for

from kiln.client import Client, RunFailed, ServerError

pytestmark = pytest.mark.timeout(600)

IMAGE_GRAPH = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 8, "batch_size": 1, "color": 0x336699},
        "_meta": {"title": "Empty"},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Invert"}},
    "9": {
        "class_type": "SaveImage",
        "inputs": {"images": ["2", 0], "filename_prefix": "kiln"},
        "_meta": {"title": "Save Image"},
    },
}


def test_comfy_api_simplified_against_kiln_serve(serve_proc):
    cas = pytest.importorskip("comfy_api_simplified")
    srv = serve_proc()
    api = cas.ComfyApiWrapper(srv.url)
    wf = cas.ComfyWorkflowWrapper(json.loads(json.dumps(IMAGE_GRAPH)))
    wf.set_node_param("Empty", "color", 0x102030)
    images = api.queue_and_wait_images(wf, "Save Image")
    assert len(images) == 1
    name, data = next(iter(images.items()))
    assert name.startswith("kiln_") and name.endswith("_.png")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.size == (16, 8) and img.getpixel((0, 0)) == (255 - 0x10, 255 - 0x20, 255 - 0x30)
    assert "EmptyImage" in api.get_object_info()
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    assert api.get_system_stats()["devices"]
    api.interrupt()
    with pytest.raises(cas.ComfyApiError):
        api.queue_prompt({"1": {"class_type": "Nope", "inputs": {}}})


def test_kiln_client_run_images_download_cancel(live, tmp_path):
    import kiln

    s = live(registry=make_registry(image_nodes=True))
    c = Client(s.url)
    res = c.run(IMAGE_GRAPH)
    assert res.ok and res.files()[0]["type"] == "output"
    g = kiln.Graph(s.executor.registry)  # an authored Graph object is submitted as is
    g.SaveImage(images=g.ImageInvert(image=g.EmptyImage(width=4, height=4, color=0)), filename_prefix="authored")
    [authored] = c.images(c.submit(g))
    assert authored.size == (4, 4) and authored.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    ws_graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 5, "height": 3, "batch_size": 2, "color": 0}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    ws_images = c.images(c.submit(ws_graph))  # sent only over the socket, replayed for this call
    assert [im.size for im in ws_images] == [(5, 3), (5, 3)]
    pid = c.submit(IMAGE_GRAPH)
    [img] = c.images(pid)
    assert img.size == (16, 8)
    paths = c.download(pid, tmp_path / "dl")
    assert len(paths) == 1 and paths[0].read_bytes()[:4] == b"\x89PNG"
    evs = list(c.events(pid))
    assert [e["type"] for e in evs][:2] == ["execution_start", "execution_cached"]
    assert evs[-1]["type"] == "executing" and evs[-1]["data"]["node"] is None
    slow = c.submit(Gate().graph())  # never opened: it runs until it is cancelled
    it = c.events(slow)
    for e in it:
        if e["type"] == "progress":
            c.cancel(slow)
            break
    rest = [e["type"] for e in it]
    assert "execution_interrupted" in rest and rest[-1] == "executing"
    with pytest.raises(RunFailed):
        c.run(
            {
                "1": {"class_type": "TConst", "inputs": {"value": 1}},
                "2": {"class_type": "TFail", "inputs": {"value": ["1", 0]}},
                "3": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
            }
        )
    with pytest.raises(ServerError) as exc:
        c.submit({"1": {"class_type": "TShow", "inputs": {}}})
    assert exc.value.status == 400 and "1" in exc.value.node_errors
    assert c.status("nope")["status"] == "unknown"


def test_no_token_or_api_key_in_png_metadata_history_or_events(live):
    s = live(registry=make_registry(image_nodes=True), auth_token="server-TOKEN-xyz")
    c = Client(s.url, token="server-TOKEN-xyz")
    pid = c.submit(
        IMAGE_GRAPH,
        extra_data={
            "api_key_comfy_org": "sk-LEAK-1",
            "auth_token_comfy_org": "LEAK-2",
            "extra_pnginfo": {"workflow": {"note": "hello"}},
        },
    )
    [img] = c.images(pid)
    assert img.text.get("workflow") == '{"note": "hello"}' and "prompt" in img.text
    texts = json.dumps(img.text)
    assert "LEAK" not in texts and "TOKEN" not in texts
    headers = {"Authorization": "Bearer server-TOKEN-xyz"}
    dump = requests.get(s.url + "/history", headers=headers, timeout=SAFETY_S).text
    dump += requests.get(f"{s.url}/api/prompt/{pid}/events", headers=headers, timeout=SAFETY_S).text
    assert "LEAK" not in dump and "TOKEN" not in dump


def test_kiln_client_reconnects_and_replays_across_a_restart(serve_proc, tmp_path):
    srv = serve_proc()
    c = Client(srv.url, reconnect_tries=200)
    pid = c.submit(sleeper(10.0, 100, out="TShow"))  # long enough to still run when it is killed
    got = []
    errors = []

    def follow():
        try:
            got.extend(c.events(pid))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    wait_for(lambda: any(e["type"] == "progress" for e in got) or not t.is_alive(), "the run to make progress")
    srv.kill()
    srv2 = serve_proc(port=srv.port)
    t.join(SAFETY_S)
    assert not errors and not t.is_alive()
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs))  # no duplicates, in order
    kinds = [e["type"] for e in got]
    assert kinds.count("execution_start") == 2  # the re-run after the restart is part of the stream
    assert kinds[-2:] == ["execution_success", "executing"] or kinds[-1] == "executing"
    assert requests.get(f"{srv2.url}/api/prompt/{pid}", timeout=SAFETY_S).json()["status"] == "success"


def test_kiln_submit_subcommand(server, tmp_path):
    g = tmp_path / "g.json"
    g.write_text(json.dumps(chain(2)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        kiln_cmd("submit", str(g), "--server", server.url, "--set", "1.value=40"),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=SAFETY_S,
        preexec_fn=die_with_parent,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"out": {"text": ["41"]}}
    r = subprocess.run(
        kiln_cmd("submit", str(g), "--server", server.url, "--set", "1.value=abc"),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=SAFETY_S,
        preexec_fn=die_with_parent,
    )
    # a graph the server refuses is the user's input: exit 2, as `kiln run` does for an invalid graph
    assert r.returncode == 2 and ("invalid_input_type" in r.stderr or "convert" in r.stderr), r.stderr
    r = subprocess.run(
        kiln_cmd("submit", str(g), "--server", server.url, "--set", "nope.value=1"),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=SAFETY_S,
        preexec_fn=die_with_parent,
    )
    assert r.returncode == 2 and "no node" in r.stderr


def test_comfyui_ws_images_script_flow(live):
    """ComfyUI's websockets_api_example_ws_images.py: no feature flags, images as type-1 frames while the
    current node is the SaveImageWebsocket node, prompt_id read from the POST answer."""
    from websockets.sync.client import connect

    s = live(registry=make_registry(image_nodes=True))
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 12, "height": 6, "batch_size": 2, "color": 255}},
        "save_image_websocket_node": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    with connect(s.ws_url + "?clientId=scriptclient", open_timeout=SAFETY_S, max_size=None) as ws:
        pid = requests.post(
            s.url + "/prompt", data=json.dumps({"prompt": graph, "client_id": "scriptclient"}), timeout=SAFETY_S
        ).json()["prompt_id"]
        current, images = "", []
        while True:
            out = ws.recv(timeout=SAFETY_S)
            if isinstance(out, str):
                m = json.loads(out)
                if m["type"] == "executing":
                    d = m["data"]
                    if d["prompt_id"] == pid:
                        if d["node"] is None:
                            break
                        current = d["node"]
            elif current == "save_image_websocket_node":
                images.append(out[8:])
    assert len(images) == 2
    for data in images:
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (12, 6)


def test_async_client(live):
    import asyncio

    from kiln.client import AsyncClient

    s = live(registry=make_registry(image_nodes=True))

    async def main():
        c = AsyncClient(s.url)
        pid = await c.submit(IMAGE_GRAPH)
        kinds = [e["type"] async for e in c.events(pid)]
        [img] = await c.images(pid)
        return kinds, img

    kinds, img = asyncio.run(main())
    assert kinds[0] == "execution_start" and kinds[-1] == "executing" and img.size == (16, 8)


def test_a_blocked_branch_is_not_a_failure(server):
    g = {
        "1": {"class_type": "TConst", "inputs": {"value": 4}},
        "b": {"class_type": "TBlock", "inputs": {"value": ["1", 0]}},
        "shown": {"class_type": "TShow", "inputs": {"value": ["1", 0]}},
        "blocked": {"class_type": "TShow", "inputs": {"value": ["b", 0]}},
    }
    c = Client(server.url)
    pid = c.submit(g)
    kinds = [(e["type"], e["data"].get("exception_type")) for e in c.events(pid)]
    assert ("execution_error", "ExecutionBlocked") in kinds and ("execution_success", None) in kinds
    res = c.run(g)  # does not raise
    assert res.ok
    h = c.history(pid)
    assert h["status"]["status_str"] == "success"
    assert [m[0] for m in h["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
