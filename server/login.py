"""Logging in with a browser when the server has an auth token.

A browser cannot add ``Authorization: Bearer`` to a page load, so ``GET /login`` is a small form and
``POST /login`` (the token in the form body, compared in constant time) starts a session: a random id, kept
server-side and sent back as an ``HttpOnly; SameSite=Strict`` cookie. The cookie never holds the token, and
the token never appears in a URL or a log line. ``POST /logout`` ends the session. The middleware in
security.py accepts the cookie on HTTP and on the websocket, and still applies the Origin check to
cookie-authenticated requests.

Sessions survive a restart: they are kept in ``DATA_DIR/sessions.sqlite`` (and in memory, which is what a
request checks; the file is written only at log-in and log-out). The file never holds a session id, only
its SHA-256, so reading it does not let anyone in; next to each, an HMAC of the server's token keyed by the
session id, so a session started under one token is not valid under another (changing ``--auth-token``
logs every browser out) while the file reveals nothing about the token without the id. Expiry is wall-clock
time. A file that cannot be read is logged and left alone; sessions then live in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path

from aiohttp import web

from .keys import CONFIG

COOKIE_PREFIX = "kiln_session"
SESSION_TTL_S = 7 * 24 * 3600.0
MAX_SESSIONS = 1000  # past this many live sessions the oldest is dropped
FAILED_LOGIN_DELAY_S = 0.25  # a wrong token costs the guesser a little time
MAX_FORM_BYTES = 16 * 1024
SESSIONS_FILE = "sessions.sqlite"

log = logging.getLogger("kiln.server")


class Sessions:
    """Live browser sessions: SHA-256 of the session id -> (expiry, wall clock; token tag), oldest first.

    With ``path`` they are also kept in that SQLite file and read back when the server starts (see the
    module docstring); without it they live in memory only. ``token`` is the server's auth token.
    """

    def __init__(
        self, ttl: float = SESSION_TTL_S, limit: int = MAX_SESSIONS, path: Path | None = None, token: str = ""
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.token = token
        self._live: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._open(Path(path))

    def _open(self, path: Path) -> None:
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY, expiry REAL, tag TEXT)")
            now = time.time()
            db.execute("DELETE FROM sessions WHERE expiry < ?", (now,))
            rows = db.execute("SELECT key, expiry, tag FROM sessions ORDER BY expiry").fetchall()
        except sqlite3.Error as exc:  # an unreadable file costs the sessions, never the server
            log.warning("browser sessions in %s cannot be used (%s): sessions are kept in memory only", path, exc)
            return
        with contextlib.suppress(OSError):
            path.chmod(0o600)
        self._db = db
        for key, expiry, tag in rows:
            if isinstance(key, str) and isinstance(expiry, float) and isinstance(tag, str):
                self._live[key] = (expiry, tag)
        self._trim()

    def _write(self, sql: str, args: tuple) -> None:
        if self._db is None:
            return
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            log.warning("browser session store: %s", exc)

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()

    def _tag(self, session_id: str) -> str:
        return hmac.new(
            session_id.encode("utf-8", "replace"), self.token.encode("utf-8", "replace"), "sha256"
        ).hexdigest()

    def _trim(self) -> None:
        while len(self._live) > self.limit:
            key, _ = self._live.popitem(last=False)
            self._write("DELETE FROM sessions WHERE key = ?", (key,))

    def new(self) -> str:
        session_id = secrets.token_urlsafe(32)
        key, expiry, tag = self._key(session_id), time.time() + self.ttl, self._tag(session_id)
        self._live[key] = (expiry, tag)
        self._write("INSERT OR REPLACE INTO sessions (key, expiry, tag) VALUES (?, ?, ?)", (key, expiry, tag))
        self._trim()
        return session_id

    def valid(self, session_id: str | None) -> bool:
        if not session_id:
            return False
        key = self._key(session_id)
        found = self._live.get(key)
        if found is None:
            return False
        expiry, tag = found
        if expiry < time.time() or not hmac.compare_digest(tag, self._tag(session_id)):
            self._drop_key(key)
            return False
        return True

    def _drop_key(self, key: str) -> None:
        if self._live.pop(key, None) is not None:
            self._write("DELETE FROM sessions WHERE key = ?", (key,))

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._drop_key(self._key(session_id))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __len__(self) -> int:
        return len(self._live)


SESSIONS = web.AppKey("kiln_sessions", Sessions)


def cookie_name(request: web.Request) -> str:
    """Cookies are shared by every port of a host: one name per port keeps two servers' sessions apart."""
    port = request.url.port
    return f"{COOKIE_PREFIX}_{port}" if port else COOKIE_PREFIX


def session_ok(request: web.Request) -> bool:
    """Whether the request carries a live session cookie of this server."""
    sessions = request.app.get(SESSIONS)
    return sessions is not None and sessions.valid(request.cookies.get(cookie_name(request)))


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison (digests first, so not even the length is compared directly)."""
    a = hashlib.sha256(given.encode("utf-8", "replace")).digest()
    b = hashlib.sha256(token.encode("utf-8", "replace")).digest()
    return hmac.compare_digest(a, b)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:24em;margin:4em auto;padding:0 1em;line-height:1.5}}
input{{font:inherit;width:100%;box-sizing:border-box;margin:.3em 0 1em;padding:.4em}}
button{{font:inherit;padding:.4em 1.2em}}.error{{color:#b00020}}</style></head>
<body><h1>Kiln</h1>
<p>This server needs its auth token.</p>{error}
<form method="post" action="/login">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Log in</button>
</form></body></html>
"""
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make the form post send "Origin: null"
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
}


def _page(status: int = 200, error: str = "") -> web.Response:
    err = f'<p class="error">{html.escape(error)}</p>' if error else ""
    return web.Response(
        status=status, text=PAGE.format(error=err), content_type="text/html", headers=dict(PAGE_HEADERS)
    )


def _to_editor() -> web.Response:
    return web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})


async def login_page(request: web.Request) -> web.Response:
    if not request.app[CONFIG].auth_token:
        return _to_editor()  # nothing to log in to
    return _page()


async def login(request: web.Request) -> web.Response:
    token = request.app[CONFIG].auth_token
    if not token:
        return _to_editor()
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        return _page(413, "That form is too large.")
    form = await request.post()
    given = form.get("token")
    if not isinstance(given, str) or not token_matches(given, token):
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        return _page(401, "Wrong token.")
    sessions = request.app[SESSIONS]
    sessions.drop(request.cookies.get(cookie_name(request)))  # a fresh id on every login (no fixation)
    resp = _to_editor()
    resp.set_cookie(
        cookie_name(request),
        sessions.new(),
        path="/",
        max_age=int(sessions.ttl),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return resp


async def logout(request: web.Request) -> web.Response:
    name = cookie_name(request)
    request.app[SESSIONS].drop(request.cookies.get(name))
    resp = web.Response(status=303, headers={"Location": "/login", "Cache-Control": "no-store"})
    resp.del_cookie(name, path="/")
    return resp


def install(app: web.Application) -> None:
    """The session table (kept in the data dir when the server has a token) and the ``/login`` and
    ``/logout`` routes."""
    config = app[CONFIG]
    token = config.auth_token or ""
    sessions = Sessions(path=config.data_dir / SESSIONS_FILE if token else None, token=token)
    app[SESSIONS] = sessions

    async def _close(app: web.Application) -> None:
        sessions.close()

    app.on_cleanup.append(_close)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
