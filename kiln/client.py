"""``kiln.Client``: talk to a Kiln (or ComfyUI) server from Python.

    client = kiln.Client("http://127.0.0.1:8188", token=None)
    pid = client.submit(graph)                 # a Graph object, a dict, JSON text or a path
    for event in client.events(pid):          # {"type", "data", "seq"}; ends with the final event
        ...
    images = client.images(pid)               # PIL images of the outputs (waits for the prompt)
    client.download(pid, "out/")              # files on disk
    client.cancel(pid)

Events come over the websocket. If the connection drops, the client reconnects with the same client id
and asks the server to replay the prompt's events after the last sequence number it saw, so no event is
lost or repeated. ``events`` needs a Kiln server (sequence numbers and replay); submitting, status,
outputs and downloads also work against ComfyUI.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.engine.errors import ExecutionFailed, KilnError

TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


class ServerError(KilnError):
    """The server refused a request; ``status`` is the HTTP status, ``body`` its JSON answer."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (err or body)
        details = err.get("details") if isinstance(err, dict) else ""
        lines = [f"HTTP {status}: {msg}" + (f" ({details})" if details else "")]
        for nid, ne in (body.get("node_errors") or {}).items() if isinstance(body, dict) else ():
            for e in ne.get("errors", []):
                hint = (e.get("extra_info") or {}).get("hint")
                lines.append(f"  node {nid} ({ne.get('class_type')}): {hint or e.get('message')} {e.get('details')}")
        super().__init__("\n".join(lines))

    @property
    def node_errors(self) -> dict:
        return self.body.get("node_errors", {}) if isinstance(self.body, dict) else {}


class RunFailed(ExecutionFailed):
    """The prompt ended with an error or was interrupted on the server. It is an ``ExecutionFailed``, so
    ``except kiln.ExecutionFailed`` catches a failed run whether it ran in this process or on a server.

    ``status`` is "error" or "interrupted"; ``error`` is the engine's typed ``ExecutionError``, as for a local
    run, and ``info`` the server's ``execution_error`` (or ``execution_interrupted``) data as it arrived.
    """

    def __init__(self, status: str, error: dict | None):
        from kiln.server.protocol import execution_error_from_data

        info = error or {}
        self.status = status
        self.info = info
        self.error = execution_error_from_data(info, default_message=status)
        where = f"{info.get('node_type')} (node {info.get('node_id')}): " if info.get("node_id") else ""
        KilnError.__init__(self, f"prompt {status}: {where}{str(info.get('exception_message', '')).strip()}")


@dataclass
class Result:
    prompt_id: str
    status: str
    outputs: dict = field(default_factory=dict)
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def files(self) -> list[dict]:
        """Every ``{filename, subfolder, type}`` item of the outputs."""
        items = []
        for ui in self.outputs.values():
            for key in ("images", "gifs", "audio", "files"):
                for it in (ui or {}).get(key, []) or []:
                    if isinstance(it, dict) and "filename" in it:
                        items.append(it)
        return items


def graph_json(graph: Any) -> dict:
    """A Graph object, an API-format dict, JSON text/bytes or a path to a .json file, as a dict."""
    for attr in ("to_json", "to_api", "to_dict"):
        fn = getattr(graph, attr, None)
        if callable(fn):
            graph = fn()
            break
    if isinstance(graph, Path) or (isinstance(graph, str) and graph.strip()[:1] not in ("{", "[")):
        graph = Path(graph).read_text(encoding="utf-8")
    if isinstance(graph, (str, bytes, bytearray)):
        graph = json.loads(graph)
    if not isinstance(graph, dict):
        raise TypeError(f"cannot submit a {type(graph).__name__} as a graph")
    if "prompt" in graph and isinstance(graph["prompt"], dict) and "class_type" not in graph["prompt"]:
        graph = graph["prompt"]
    return graph


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8188",
        token: str | None = None,
        client_id: str | None = None,
        timeout: float = 60.0,
        reconnect_tries: int = 20,
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.reconnect_tries = reconnect_tries

    # -- HTTP ---------------------------------------------------------------------------------------
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict | None = None,
        raw: bool = False,
        timeout: float | None = None,
    ) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = {"error": payload.decode("utf-8", "replace")}
            raise ServerError(exc.code, parsed) from None
        if raw:
            return payload
        return json.loads(payload) if payload.strip() else None

    def submit(
        self,
        graph: Any,
        *,
        prompt_id: str | None = None,
        extra_data: dict | None = None,
        front: bool = False,
        targets: list[str] | None = None,
    ) -> str:
        """Queue a graph; returns its prompt id. Raises ServerError (with node_errors) if it is invalid."""
        body: dict[str, Any] = {"prompt": graph_json(graph), "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = extra_data
        if front:
            body["front"] = True
        if targets is not None:
            body["partial_execution_targets"] = targets
        return self.request("POST", "/api/prompt", body)["prompt_id"]

    def status(self, prompt_id: str, wait: bool = False, timeout: float = 300) -> dict:
        try:
            params = {"wait": "true", "timeout": str(timeout)} if wait else None
            return self.request(
                "GET",
                f"/api/prompt/{urllib.parse.quote(prompt_id)}",
                params=params,
                timeout=timeout + 10 if wait else None,
            )
        except ServerError as exc:
            if exc.status == 404 and isinstance(exc.body, dict) and exc.body.get("status") == "unknown":
                return exc.body
            raise

    def cancel(self, prompt_id: str) -> None:
        self.request("POST", "/api/interrupt", {"prompt_id": prompt_id})

    def history(self, prompt_id: str) -> dict:
        return self.request("GET", f"/api/history/{urllib.parse.quote(prompt_id)}").get(prompt_id, {})

    # -- events -------------------------------------------------------------------------------------
    def _ws_url(self) -> str:
        u = urllib.parse.urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        q = {"clientId": self.client_id}
        if self.token:
            q["token"] = self.token
        return urllib.parse.urlunsplit((scheme, u.netloc, u.path + "/ws", urllib.parse.urlencode(q), ""))

    def events(self, prompt_id: str, since: int = 0, previews: bool = False) -> Iterator[dict]:
        """The prompt's events from ``since`` on, ending with the final ``executing {node: null}``.

        Reconnects (same client id) and replays after the last sequence number seen when the socket drops.
        With ``previews``, binary frames are yielded as ``{"type": "preview", "data": bytes}``.
        """
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        last = since
        failures = 0
        while True:
            try:
                with connect(self._ws_url(), max_size=None, open_timeout=self.timeout) as ws:
                    ws.send(json.dumps({"type": "feature_flags", "data": {"previews": previews}}))
                    ws.send(json.dumps({"type": "replay", "data": {"prompt_id": prompt_id, "since": last}}))
                    failures = 0
                    # Until replay_done, live events and replayed ones interleave; the replay covers every
                    # event up to its last_seq, so collect them all and yield in sequence order.
                    held: dict[int, dict] = {}
                    replaying = True
                    while True:
                        msg = ws.recv(timeout=None)
                        if isinstance(msg, bytes):
                            if previews:
                                yield {"type": "preview", "data": msg}
                            continue
                        m = json.loads(msg)
                        t, data = m.get("type"), m.get("data") or {}
                        if t == "error" and data.get("type") == "prompt_not_found":
                            raise ServerError(404, {"error": data})
                        if t == "replay_done" and replaying and data.get("prompt_id") == prompt_id:
                            replaying = False
                            batch = [held[k] for k in sorted(held)]
                            held.clear()
                            for e in batch:
                                if e["seq"] > last:
                                    last = e["seq"]
                                    yield e
                                    if self._final(e):
                                        return
                            if data.get("status") == "unknown":
                                return
                            continue
                        seq = m.get("seq")
                        if seq is None or not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                            continue
                        if replaying:
                            held[seq] = m
                            continue
                        if seq <= last:
                            continue
                        last = seq
                        yield m
                        if self._final(m):
                            return
            except (OSError, WebSocketException, TimeoutError):
                failures += 1
                if failures > self.reconnect_tries:
                    raise
                time.sleep(min(0.1 * 2**failures, 2.0))

    @staticmethod
    def _final(m: dict) -> bool:
        return m.get("type") == "executing" and (m.get("data") or {}).get("node") is None

    def wait(self, prompt_id: str) -> Result:
        """Follow the prompt to its end; returns its Result (does not raise on a failed run)."""
        status, error = "success", None
        for m in self.events(prompt_id):
            if m["data"].get("exception_type") == "ExecutionBlocked":
                continue  # a node skipped by a blocker: not fatal
            if m["type"] in ("execution_error", "execution_interrupted"):
                status = "error" if m["type"] == "execution_error" else "interrupted"
                error = m["data"]
        st = self.status(prompt_id)
        return Result(prompt_id, st.get("status", status), st.get("outputs", {}), st.get("error", error))

    def run(self, graph: Any, **submit_kw: Any) -> Result:
        """Submit and wait; raises RunFailed if the prompt did not succeed."""
        res = self.wait(self.submit(graph, **submit_kw))
        if not res.ok:
            raise RunFailed(res.status, res.error)
        return res

    # -- outputs ------------------------------------------------------------------------------------
    def file(self, item: dict) -> bytes:
        return self.request(
            "GET",
            "/api/view",
            params={
                "filename": item["filename"],
                "subfolder": item.get("subfolder", ""),
                "type": item.get("type", "output"),
            },
            raw=True,
        )

    def outputs(self, prompt_id: str) -> Result:
        res = self.wait(prompt_id)
        if not res.ok:
            raise RunFailed(res.status, res.error)
        return res

    def images(self, prompt_id: str) -> list:
        """The prompt's output images as PIL images, in output order (waits for the prompt)."""
        from PIL import Image

        out = []
        for item in self.outputs(prompt_id).files():
            img = Image.open(io.BytesIO(self.file(item)))
            img.load()
            out.append(img)
        if not out:  # SaveImageWebsocket: the images only went over the socket; the server replays them
            for e in self.events(prompt_id, previews=True):
                if e["type"] == "preview" and e["data"][:4] == b"\x00\x00\x00\x01":
                    img = Image.open(io.BytesIO(e["data"][8:]))
                    img.load()
                    out.append(img)
        return out

    def download(self, prompt_id: str, dest: str | Path) -> list[Path]:
        """Save the prompt's output files under ``dest`` (waits for the prompt)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in self.outputs(prompt_id).files():
            p = dest / Path(item["filename"]).name
            p.write_bytes(self.file(item))
            paths.append(p)
        return paths

    def upload_image(self, path: str | Path, subfolder: str = "", overwrite: bool = False) -> dict:
        path = Path(path)
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (("subfolder", subfolder), ("type", "input"), ("overwrite", str(overwrite).lower())):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        headers = self._headers()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        req = urllib.request.Request(
            self.url + "/api/upload/image", data=b"".join(parts), method="POST", headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ServerError(exc.code, json.loads(exc.read() or b"{}")) from None


class AsyncClient:
    """The same client for asyncio code: ``await client.images(pid)``, ``async for e in client.events(pid)``.

    Each call runs the blocking client in a worker thread, so the event loop never waits on the network.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.sync = Client(*args, **kwargs)

    def __getattr__(self, name: str):
        fn = getattr(self.sync, name)
        if not callable(fn) or name == "events":
            return fn

        async def call(*args: Any, **kwargs: Any):
            import asyncio

            return await asyncio.to_thread(fn, *args, **kwargs)

        return call

    async def events(self, prompt_id: str, since: int = 0, previews: bool = False):
        import asyncio

        it = self.sync.events(prompt_id, since, previews)
        done = object()
        while True:
            item = await asyncio.to_thread(next, it, done)
            if item is done:
                return
            yield item
