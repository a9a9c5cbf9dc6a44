"""The ``/ws`` endpoint: ComfyUI's socket plus submitting graphs and replaying events on it.

Client -> server messages (JSON text):
- ``{"type": "feature_flags", "data": {...}}``: stores the client's flags, answers with the server's.
- ``{"type": "prompt", "data": {"prompt": {...}, "prompt_id"?, "extra_data"?, "request_id"?}}`` or the bare
  ``{"prompt": {...}}``: answered with ``prompt_queued`` ``{prompt_id, number, node_errors}`` or
  ``prompt_rejected`` ``{error, node_errors}`` on this socket; the run's events follow on it.
- ``{"type": "replay", "data": {"prompt_id", "since": K}}``: the prompt's logged events after sequence K,
  then ``replay_done`` ``{prompt_id, status, last_seq}``. A replay may repeat events the client already has
  (dedupe by ``seq``); it always ends with the final event once the prompt is done.
- ``{"type": "interrupt", "data": {"prompt_id"}}``.
Anything else gets an ``error`` message; a binary frame closes the socket (1003, unsupported data).

Server -> client: as ComfyUI. The client's ``feature_flags`` are remembered (``supports_preview_metadata``:
previews as binary type 4 with the node's ids, else type 1). ``progress_state`` goes to every socket of the
prompt's client, flags or not, as ComfyUI does, as the snapshot its clients expect (``Socket``,
``protocol.ProgressStates``). A node whose run raised is reported as ``error``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from . import params, protocol
from .hub import PROGRESS, Client, Out
from .keys import CONFIG, SERVICE
from .security import error_response
from .service import LARGE_BODY, ApiError, PromptService

MAX_CLIENT_ID = 256
TRACKED_PROMPTS = 4  # prompts whose node states one socket keeps (one runs at a time; a few finish late)
_PROGRESS_STATE = '{"type":"progress_state",'
_TERMINAL = ('{"type":"execution_success",', '{"type":"execution_error",', '{"type":"execution_interrupted",')

log = logging.getLogger("kiln.server")


async def websocket(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    svc: PromptService = request.app[SERVICE]
    sid = params.query_str(request, "clientId", limit=MAX_CLIENT_ID) or uuid.uuid4().hex
    if not sid.isprintable():
        return error_response(400, "bad_request", "clientId must be printable text")
    ws = web.WebSocketResponse(max_msg_size=config.max_ws_message_bytes, heartbeat=30.0)
    await ws.prepare(request)
    client = Socket(ws, sid, svc.hub, transport=request.transport)
    client.send(Out(protocol.message("status", protocol.status_data(svc.queue_remaining, sid))))
    client.last_status = svc.queue_remaining
    if svc.running is not None and svc.running.client_id == sid and svc.running.last_node is not None:
        client.send(Out(protocol.message("executing", {"node": svc.running.last_node})))
    svc.hub.add(client)
    if request.query.get("clientId"):
        svc.deliver_late(client)  # its prompts that finished while it was away
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    await _handle_text(client, svc, msg.data)
                except Exception as exc:  # a bug must not end the socket, let alone the server
                    log.exception("websocket message from %s failed", client.sid)
                    client.send(
                        Out(protocol.error_message("internal_error", "Internal server error", type(exc).__name__))
                    )
            elif msg.type == WSMsgType.BINARY:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"binary messages are not accepted")
                break
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        client.close()
    return ws


class Socket(Client):
    """A websocket client that gets ``progress_state`` whether or not it sent feature flags, as snapshots.

    The router hands every socket one node's change at a time; this keeps the states of the prompts the
    socket follows and sends ComfyUI's snapshot instead. When a prompt ends, what ComfyUI would have said
    before the terminal message is sent then (running nodes finished, or the failed node as ``error``), and
    nothing about that prompt's nodes after it.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.progress: dict[str, protocol.ProgressStates] = {}

    @property
    def negotiated(self) -> bool:  # the router sends progress_state to "negotiated" sockets only
        return True

    def send(self, out: Out) -> None:
        payload = out.payload
        if isinstance(payload, str) and payload.startswith(_PROGRESS_STATE):
            snapshot = self._snapshot(payload, out.data)
            if snapshot is not None:
                super().send(snapshot)
            return
        if isinstance(payload, str) and payload.startswith(_TERMINAL):
            self._ended(payload)
        super().send(out)

    def _states(self, prompt_id: str) -> protocol.ProgressStates:
        states = self.progress.get(prompt_id)
        if states is None:
            while len(self.progress) >= TRACKED_PROMPTS:
                del self.progress[next(iter(self.progress))]
            states = self.progress[prompt_id] = protocol.ProgressStates(prompt_id)
        return states

    @staticmethod
    def _out(body: dict) -> Out:
        # a snapshot holds everything an older one did: a newer one supersedes it when the client is behind
        return Out(protocol.message("progress_state", body), PROGRESS, ("progress_state", body["prompt_id"]))

    def _snapshot(self, payload: str, data: dict | None = None) -> Out | None:
        try:
            if data is None:  # a message built elsewhere: parse it
                data = json.loads(payload)["data"]
            pid = str(data["prompt_id"])
            changes = [e for e in data["nodes"].values() if isinstance(e, dict)]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("malformed progress_state for %s not sent", self.sid)
            return None
        states = self._states(pid)
        body = None
        for entry in changes:
            body = states.update(entry) or body
        return self._out(body) if body is not None else None

    def _ended(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
            data = msg["data"]
            states = self.progress.get(str(data["prompt_id"]))
        except (ValueError, KeyError, TypeError):
            return
        if states is None:
            return
        outcome = msg["type"][len("execution_") :]
        if outcome == "error" and data.get("exception_type") == "ExecutionBlocked":
            return  # a blocked call: the prompt goes on
        node = data.get("node_id")
        body = states.end(outcome, str(node) if node is not None else None)
        if body is not None:
            super().send(self._out(body))


async def _handle_text(client: Client, svc: PromptService, text: str) -> None:
    heavy = len(text) > LARGE_BODY
    try:
        limit = svc.config.max_string_bytes
        msg = await params.off_loop(params.loads, text, limit) if heavy else params.loads(text, limit)
    except params.BadParam as exc:
        client.send(Out(protocol.error_message(exc.type_, "Message is not valid JSON: " + exc.message, exc.details)))
        return
    if not isinstance(msg, dict):
        client.send(Out(protocol.error_message("bad_message", "Message must be a JSON object")))
        return
    type_ = msg.get("type")
    data = msg.get("data")
    if type_ is None and "prompt" in msg:
        type_, data = "prompt", msg
    if type_ == "feature_flags":
        if isinstance(data, dict):
            client.features = data
        client.send(Out(protocol.message("feature_flags", protocol.server_features(svc.config.max_upload_bytes))))
    elif type_ == "prompt":
        await _submit(client, svc, data, heavy)
    elif type_ == "replay":
        _replay(client, svc, data)
    elif type_ == "interrupt":
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        try:
            svc.interrupt(str(pid) if pid is not None else None)
        except ApiError as exc:
            client.send(Out(protocol.message("error", exc.body["error"])))
    else:
        client.send(
            Out(
                protocol.error_message(
                    "unknown_message_type",
                    f"Unknown message type {str(type_)[:64]!r}",
                    "send feature_flags, prompt, replay or interrupt",
                )
            )
        )


async def _submit(client: Client, svc: PromptService, data: Any, heavy: bool = False) -> None:
    request_id = data.get("request_id") if isinstance(data, dict) else None
    try:
        if not isinstance(data, dict):
            raise ApiError(400, "no_prompt", "No prompt provided", "No prompt provided")
        envelope = {k: v for k, v in data.items() if k != "request_id"}
        envelope.setdefault("client_id", client.sid)
        body = await svc.submit(envelope, announce=False, heavy=heavy)
    except ApiError as exc:
        client.send(Out(protocol.message("prompt_rejected", {**exc.body, "request_id": request_id})))
        return
    client.send(Out(protocol.message("prompt_queued", {**body, "request_id": request_id})))
    job = svc.pending.get(body["prompt_id"])
    svc.broadcast_status(job)


def _replay(client: Client, svc: PromptService, data: Any) -> None:
    pid = data.get("prompt_id") if isinstance(data, dict) else None
    since = data.get("since", 0) if isinstance(data, dict) else 0
    if (
        not isinstance(pid, str)
        or not isinstance(since, int)
        or isinstance(since, bool)
        or not -(2**53) <= since <= 2**53
    ):
        client.send(Out(protocol.error_message("bad_message", "replay needs {prompt_id: str, since: int}")))
        return
    if not svc.replay(client, pid, since):
        client.send(Out(protocol.error_message("prompt_not_found", f"No prompt with id {pid!r}", pid)))
        return
    st = svc.status(pid)
    last = st.get("last_seq", since)
    client.send(Out(protocol.message("replay_done", {"prompt_id": pid, "status": st["status"], "last_seq": last})))
