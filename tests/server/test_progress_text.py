"""A node's status text reaches its client as ComfyUI's binary frame type 3 (node id, then the text), from
Kiln's own API and from a ComfyUI pack's ``PromptServer.instance.send_progress_text``; it is transient (not in
the prompt's logged events)."""

from __future__ import annotations

import struct
from typing import Annotated

from srv_helpers import SAFETY_S, recv_until_done

from kiln.engine import Executor, Graph, Int, Node, Registry, events


def _texts(msgs) -> list[tuple[str, str]]:
    out = []
    for m in msgs:
        if isinstance(m, bytes) and struct.unpack(">I", m[:4])[0] == 3:
            (n,) = struct.unpack(">I", m[4:8])
            out.append((m[8 : 8 + n].decode(), m[8 + n :].decode()))
    return out


def test_progress_text_is_a_type_3_frame_for_the_prompts_client(server):
    g = {
        "1": {"class_type": "TConst", "inputs": {"value": 3}},
        "2": {"class_type": "TSay", "inputs": {"value": ["1", 0], "lines": 2}},
        "3": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
    }
    with server.ws("texts") as ws:
        ws.recv(timeout=SAFETY_S)  # status
        pid = server.post("/prompt", {"prompt": g, "client_id": "texts"}).json()["prompt_id"]
        msgs = recv_until_done(ws, pid)
    assert _texts(msgs) == [("2", "step 1 of 2"), ("2", "step 2 of 2")]
    logged = server.get(f"/api/prompt/{pid}/events").json()["events"]
    assert all("step 1" not in str(e["data"]) for e in logged)


class PackSay(Node):
    """Calls ComfyUI's PromptServer.send_progress_text as a pack's node does."""

    outputs = ("INT",)

    def run(self, value: Annotated[int, Int()] = 1):
        from kiln.compat import server as compat_server

        compat_server.PromptServer.instance.send_progress_text("from a pack", "ignored-id")
        return value


def test_a_packs_send_progress_text_inside_a_node_is_kilns_progress_text():
    reg = Registry()
    reg.register(PackSay)
    seen: list = []
    Executor(reg).run(Graph.from_json({"s": {"class_type": "PackSay", "inputs": {}}}), targets=["s"], sink=seen.append)
    texts = [e for e in seen if isinstance(e, events.ProgressText)]
    assert [(e.node, e.text) for e in texts] == [("s", "from a pack")]
