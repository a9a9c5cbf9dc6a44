"""HTTP routes: ComfyUI's shapes at /x and /api/x, validation errors, queue and history semantics,
idempotent prompt ids, bad bodies."""

from __future__ import annotations

import json
import threading

import pytest
from srv_helpers import SAFETY_S, Gate, chain, make_registry, wait_for

pytestmark = pytest.mark.timeout(600)


def wait_done(server, pid):
    """The prompt's final status (a server-side long poll, shorter than the request's own timeout)."""
    done = server.get(f"/api/prompt/{pid}", params={"wait": "true", "timeout": str(SAFETY_S - 30)}).json()
    assert done["status"] not in ("pending", "running"), done
    return done


def wait_running(server, pid) -> None:
    wait_for(lambda: server.get(f"/api/prompt/{pid}").json()["status"] == "running", f"{pid} to run")


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_every_route_at_both_prefixes(server, prefix):
    assert server.get(prefix + "/prompt").status_code == 200
    assert server.get(prefix + "/queue").json() == {"queue_running": [], "queue_pending": []}
    assert server.get(prefix + "/history").json() == {}
    info = server.get(prefix + "/object_info").json()
    assert info["TAdd"]["input"]["required"]["a"][0] == "INT" and info["TAdd"]["output"] == ["INT"]
    assert server.get(prefix + "/object_info/TShow").json()["TShow"]["output_node"] is True
    assert server.get(prefix + "/object_info/Nope").json() == {}
    stats = server.get(prefix + "/system_stats").json()
    assert {"os", "ram_total", "ram_free", "python_version"} <= set(stats["system"]) and stats["devices"]
    assert server.get(prefix + "/features").json()["supports_preview_metadata"] is True
    assert server.get(prefix + "/embeddings").json() == []
    assert "checkpoints" in server.get(prefix + "/models").json()
    assert server.get(prefix + "/models/checkpoints").json() == []
    assert server.get(prefix + "/models/nope").status_code == 404
    assert server.post(prefix + "/free", {"unload_models": True, "free_memory": True}).status_code == 200


def test_post_prompt_any_content_type_and_validation_errors(server):
    # no Content-Type at all, like ComfyUI's basic_api_example
    r = server.post("/prompt", data=json.dumps({"prompt": chain(2)}).encode(), headers={"Content-Type": ""})
    assert r.status_code == 200 and set(r.json()) == {"prompt_id", "number", "node_errors"}
    r = server.post("/prompt", {"client_id": "x"})
    assert r.status_code == 400 and r.json() == {
        "error": {
            "type": "no_prompt",
            "message": "No prompt provided",
            "details": "No prompt provided",
            "extra_info": {},
        },
        "node_errors": {},
    }
    g = chain(2)
    g["2"]["class_type"] = "NoSuchNode"
    r = server.post("/prompt", {"prompt": g})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_prompt" and r.json()["error"]["details"] == "Node ID '#2'"
    g = chain(2)
    del g["2"]["inputs"]["a"]
    body = server.post("/prompt", {"prompt": g}).json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    e = body["node_errors"]["2"]
    assert e["class_type"] == "TAdd" and e["dependent_outputs"] == ["out"]
    assert e["errors"][0]["type"] == "required_input_missing" and e["errors"][0]["details"] == "a"
    g = chain(2)
    g["1"]["inputs"]["value"] = "abc"
    body = server.post("/prompt", {"prompt": g}).json()
    assert body["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"
    r = server.post("/prompt", {"prompt": {"1": {"class_type": "TConst", "inputs": {}}}})
    assert r.json()["error"]["type"] == "prompt_no_outputs"


def test_partial_success_is_200_with_node_errors(server):
    g = chain(2)
    g["bad"] = {"class_type": "TShow", "inputs": {}}
    r = server.post("/prompt", {"prompt": g})
    assert r.status_code == 200 and "bad" in r.json()["node_errors"]
    done = wait_done(server, r.json()["prompt_id"])
    assert done["outputs"] == {"out": {"text": ["2"]}}


def test_malformed_bodies_get_typed_400s(server):
    for raw in [b"{", b"\xff\xfe\x00garbage", b"[1,2", b'{"prompt": NaN}', b"", b"null", b"[]"]:
        r = server.post("/prompt", data=raw)
        assert r.status_code == 400, raw
        assert "error" in r.json()
    r = server.post("/prompt", {"prompt": "a string"})
    assert r.status_code == 400
    r = server.post("/prompt", {"prompt": {"1": {"class_type": "TConst", "inputs": []}}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_prompt"
    assert server.get("/prompt").status_code == 200  # still serving


def test_giant_body_is_413(live):
    s = live(max_body_bytes=1024 * 1024)
    r = s.post("/prompt", data=b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"
    assert s.get("/prompt").status_code == 200


def test_client_prompt_id_is_idempotent(server):
    body = {"prompt": chain(2), "prompt_id": "mine-1"}
    r1 = server.post("/prompt", body).json()
    r2 = server.post("/api/prompt", body).json()
    assert r1["prompt_id"] == r2["prompt_id"] == "mine-1" and r1["number"] == r2["number"]
    wait_done(server, "mine-1")
    assert server.post("/prompt", body).json()["prompt_id"] == "mine-1"  # also after it finished
    # ran once: a second run would be queued (or running) now, or in the history
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    assert list(server.get("/history").json()) == ["mine-1"]
    other = {"prompt": chain(3), "prompt_id": "mine-1"}
    r = server.post("/prompt", other)
    assert r.status_code == 409 and r.json()["error"]["type"] == "prompt_id_conflict"


def test_queue_items_front_delete_clear(server):
    gate = Gate()  # "a" runs until the checks below are done, however slow the machine is
    a = server.post("/prompt", {"prompt": gate.graph()}).json()["prompt_id"]
    wait_running(server, a)
    b = server.post("/prompt", {"prompt": chain(2, value=2)}).json()["prompt_id"]
    c = server.post("/prompt", {"prompt": chain(2, value=3), "front": True}).json()["prompt_id"]
    d = server.post("/prompt", {"prompt": chain(2, value=4), "number": 100}).json()["prompt_id"]
    q = server.get("/queue").json()
    assert [i[1] for i in q["queue_running"]] == [a]
    assert [i[1] for i in q["queue_pending"]] == [c, b, d]
    item = q["queue_pending"][0]
    assert len(item) == 5 and item[2]["out"]["class_type"] == "TShow" and item[4] == ["out"]
    assert item[0] < 0 and q["queue_pending"][2][0] == 100
    r = server.post("/queue", {"delete": [b, "ghost"]})
    assert r.status_code == 404 and r.json()["error"]["extra_info"]["prompt_ids"] == ["ghost"]
    assert [i[1] for i in server.get("/queue").json()["queue_pending"]] == [c, d]
    assert server.post("/queue", {"clear": True}).status_code == 200
    assert server.get("/queue").json()["queue_pending"] == []
    assert server.get(f"/api/prompt/{b}").json()["status"] == "unknown"
    assert server.get(f"/api/prompt/{a}").json()["status"] == "running"  # the running one was not touched
    gate.open()
    assert wait_done(server, a)["status"] == "success"


def test_history_paging_and_delete(server):
    ids = [server.post("/prompt", {"prompt": chain(2, value=i)}).json()["prompt_id"] for i in range(4)]
    wait_done(server, ids[-1])
    assert list(server.get("/history").json()) == ids
    assert list(server.get("/history", params={"max_items": 2}).json()) == ids[2:]
    assert list(server.get("/history", params={"max_items": 2, "offset": 1}).json()) == ids[1:3]
    assert server.get("/history", params={"offset": 9}).json() == {}
    r = server.post("/history", {"delete": [ids[0], "ghost"]})
    assert r.status_code == 404
    assert list(server.get("/history").json()) == ids[1:]
    assert server.post("/history", {"clear": True}).status_code == 200
    assert server.get("/history").json() == {}


def test_secrets_never_stored(server):
    g = chain(1, out="TSecret")
    pid = server.post(
        "/prompt",
        {
            "prompt": g,
            "extra_data": {
                "api_key_comfy_org": "sk-SECRET-123",
                "auth_token_comfy_org": "tok-SECRET-456",
                "extra_pnginfo": {"workflow": {}},
            },
        },
    ).json()["prompt_id"]
    done = wait_done(server, pid)
    assert done["outputs"] == {"out": {"text": ["has key"]}}  # the run had it
    dump = server.get("/history").text + server.get(f"/api/prompt/{pid}/events").text
    assert "SECRET" not in dump and "extra_pnginfo" in dump
    raw = (server.base / "data" / "kiln.sqlite3").read_bytes()
    for extra in (server.base / "data").glob("kiln.sqlite3-*"):
        raw += extra.read_bytes()
    assert b"SECRET" not in raw


def test_history_limit_drops_the_oldest(live):
    s = live(history_limit=3)
    ids = [s.post("/prompt", {"prompt": chain(1, value=i)}).json()["prompt_id"] for i in range(5)]
    wait_done(s, ids[-1])
    s.call(s.service.store.trim_history, 3)  # the service trims every 64 prompts; force it here
    assert list(s.get("/history").json()) == ids[2:]
    assert s.get(f"/api/prompt/{ids[0]}").json()["status"] == "unknown"


class SlowCheck:
    """A classic node whose VALIDATE_INPUTS blocks until the test releases it (or is async), and records the
    thread it ran on."""

    threads: list = []
    entered = threading.Event()
    release = threading.Event()
    left = threading.Event()
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        cls.threads.append(threading.get_ident())
        cls.entered.set()
        cls.release.wait(SAFETY_S)
        cls.left.set()
        return True

    def run(self, value):
        return (value,)


class AsyncCheck(SlowCheck):
    @classmethod
    async def VALIDATE_INPUTS(cls, value):
        cls.threads.append(threading.get_ident())
        return value >= 0 or "value must not be negative"


def test_validation_runs_off_the_event_loop(live):
    reg = make_registry()
    reg.register(SlowCheck)
    reg.register(AsyncCheck)
    s = live(registry=reg)
    SlowCheck.threads.clear()
    for ev in (SlowCheck.entered, SlowCheck.release, SlowCheck.left):
        ev.clear()

    def graph(cls, value=3):
        return {
            "prompt": {
                "1": {"class_type": cls, "inputs": {"value": value}},
                "out": {"class_type": "TShow", "inputs": {"value": ["1", 0]}},
            }
        }

    slow: list = []
    t = threading.Thread(target=lambda: slow.append(s.post("/prompt", graph("SlowCheck"))))
    t.start()
    try:
        assert SlowCheck.entered.wait(SAFETY_S)
        # the loop answers while the validator is still blocked: on the loop, this could only come after it
        assert s.get("/prompt").status_code == 200
        assert not SlowCheck.left.is_set()
    finally:
        SlowCheck.release.set()
        t.join(SAFETY_S)
    assert not t.is_alive()
    assert slow[0].status_code == 200 and slow[0].json()["node_errors"] == {}
    assert s.post("/prompt", graph("AsyncCheck")).status_code == 200
    r = s.post("/prompt", graph("AsyncCheck", -1))
    assert r.status_code == 400 and r.json()["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"
    assert s.thread.ident not in SlowCheck.threads + AsyncCheck.threads
