"""Property-based fuzzing of POST /prompt and the websocket: whatever arrives, the server answers with
a typed 4xx (or accepts), or closes that one socket, and keeps serving."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from srv_helpers import SAFETY_S, LiveServer, chain, recv_json, recv_until_done

pytestmark = pytest.mark.timeout(600)

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=20,
)
class_types = st.sampled_from(["TConst", "TAdd", "TShow", "TFail", "Nope", "", 3, None])
node = st.fixed_dictionaries(
    {"class_type": class_types},
    optional={
        "inputs": st.dictionaries(
            st.sampled_from(["value", "a", "b", "seconds", "steps", "zz"]),
            st.one_of(json_leaf, st.tuples(st.sampled_from(["1", "2", "9", 1]), st.integers(-1, 3)).map(list)),
            max_size=4,
        ),
        "_meta": json_value,
    },
)
graph = st.dictionaries(st.sampled_from(["1", "2", "3", "out", "x.y"]), node, max_size=5)
envelope = st.fixed_dictionaries(
    {"prompt": st.one_of(graph, json_value)},
    optional={
        "client_id": json_value,
        "prompt_id": json_value,
        "extra_data": json_value,
        "front": json_value,
        "number": json_value,
        "partial_execution_targets": json_value,
    },
)
bodies = st.one_of(
    envelope.map(lambda d: json.dumps(d).encode()),
    json_value.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = LiveServer(tmp_path_factory.mktemp("fuzz"))
    try:
        yield s
    finally:
        s.stop()


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
def test_post_prompt_never_breaks(fuzz_server, body):
    r = requests.post(fuzz_server.url + "/api/prompt", data=body, timeout=SAFETY_S)
    assert r.status_code in (200, 400, 409), (r.status_code, r.text[:300])
    j = r.json()
    if r.status_code == 200:
        assert set(j) == {"prompt_id", "number", "node_errors"}
    else:
        assert isinstance(j["error"], dict) and {"type", "message"} <= set(j["error"])


socket_messages = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    json_value.map(json.dumps),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["prompt", "replay", "feature_flags", "interrupt", "x", ""]),
            "data": st.one_of(json_value, envelope),
        }
    ).map(json.dumps),
)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(msgs=st.lists(socket_messages, min_size=1, max_size=5))
def test_socket_never_breaks(fuzz_server, msgs):
    from websockets.exceptions import ConnectionClosed

    with fuzz_server.ws("fuzz") as ws:
        recv_json(ws)
        try:
            for m in msgs:
                ws.send(m)
                if isinstance(m, bytes):
                    break
            ws.send(json.dumps({"type": "feature_flags", "data": {}}))
            while True:  # every text message gets an answer; the flags reply comes last
                reply = recv_json(ws)
                if reply["type"] == "feature_flags":
                    break
                assert reply["type"] in (
                    "error",
                    "prompt_queued",
                    "prompt_rejected",
                    "replay_done",
                    "status",
                    "execution_start",
                    "execution_cached",
                    "executing",
                    "executed",
                    "progress",
                    "execution_success",
                    "execution_error",
                    "execution_interrupted",
                ), reply
        except ConnectionClosed as exc:
            assert any(isinstance(m, bytes) for m in msgs) and exc.rcvd.code == 1003
    # the server still works for everyone
    with fuzz_server.ws("after") as ws:
        recv_json(ws)
        pid = fuzz_server.post("/prompt", {"prompt": chain(2), "client_id": "after"}).json()["prompt_id"]
        recv_until_done(ws, pid)
