"""Middlewares: typed JSON errors, the Host/Origin check, and token auth.

- Host check (DNS rebinding): on a loopback bind, a request whose Host is not a loopback name is refused,
  so a web page on evil.example that re-points its name at 127.0.0.1 cannot talk to the server.
- Origin check (cross-site requests): a browser request whose Origin is not the server's own origin (or
  one listed in ``allowed_origins``) is refused. Scripts send no Origin and are never affected.
- Token: when the server has one, every HTTP request needs ``Authorization: Bearer TOKEN``; the websocket
  also accepts ``?token=TOKEN`` because browsers cannot set headers on it.
- Browsers log in at ``/login`` (login.py) and then carry a session cookie, accepted on HTTP and on the
  websocket. A cookie-authenticated request that changes state must come with a matching Origin (browsers
  always send one on such requests), so the cookie alone never authorises a cross-site request. A page load
  (``Accept: text/html``) without credentials is redirected to ``/login``; API clients get a 401 JSON body.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from urllib.parse import urlsplit

from aiohttp import web

from kiln.engine.net import is_loopback_host

from .config import ServerConfig
from .login import session_ok
from .params import BadParam, json_response

log = logging.getLogger("kiln.server")

SECRET_OPTION = re.compile(r"^--?[\w-]*(token|key|secret|password|passwd|credential)[\w-]*$", re.I)
REDACTED = "<redacted>"


def error_response(status: int, type_: str, message: str, details: str = "", **extra) -> web.Response:
    body = {"error": {"type": type_, "message": message, "details": details, "extra_info": extra}, "node_errors": {}}
    return json_response(body, status=status)


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret-looking options hidden (``--auth-token X``, ``--api-key=X``)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _value = arg.partition("=")
        if SECRET_OPTION.match(name):
            if eq:
                out.append(f"{name}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out


def _split_host(value: str) -> tuple[str, str]:
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname or "").lower(), str(parts.port or "")
    except ValueError:
        return "", ""


def check_host_origin(request: web.Request, config: ServerConfig) -> str | None:
    """A reason to refuse the request, or None."""
    host_hdr = request.headers.get("Host", "")
    host, port = _split_host(host_hdr)
    if config.loopback and host and not is_loopback_host(host):
        return f"Host {host_hdr!r} is not this server's name (a DNS rebinding attempt?)"
    origin = request.headers.get("Origin")
    if origin is None or origin == "null" and not config.loopback:
        return None
    if origin in config.allowed_origins:
        return None
    try:
        o = urlsplit(origin)
        o_host, o_port = (o.hostname or "").lower(), str(o.port or "")
    except ValueError:
        return f"Origin {origin!r} is malformed"
    default_port = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
    if not o_port:
        o_port = default_port.get(o.scheme, "")
    if not port:
        port = default_port.get(request.scheme, "")
    same = o_host == host and o_port == port
    if config.loopback:
        same = same or (is_loopback_host(o_host) and is_loopback_host(host) and o_port == port)
    if not same:
        return f"Origin {origin!r} may not call this server (cross-site request)"
    return None


def token_ok(request: web.Request, token: str) -> bool:
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if given is None:
        given = request.headers.get("X-Kiln-Token")
    if given is None and request.path.rstrip("/").endswith("/ws"):
        given = request.query.get("token")
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


OPEN_PATHS = frozenset({"/login", "/logout"})  # reachable without credentials (the Host/Origin check still applies)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def wants_page(request: web.Request) -> bool:
    """A browser loading a page (not a script's fetch, not the websocket): it is sent to the login form."""
    if request.method not in ("GET", "HEAD") or request.headers.get("Upgrade", "").lower() == "websocket":
        return False
    return "text/html" in request.headers.get("Accept", "")


def make_middlewares(config: ServerConfig) -> list:
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except BadParam as exc:
            return error_response(400, exc.type_, exc.message, exc.details)
        except web.HTTPRequestEntityTooLarge as exc:
            return error_response(413, "body_too_large", "Request body is too large", exc.text or "")
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            reasons = {404: "not_found", 405: "method_not_allowed"}
            return error_response(exc.status, reasons.get(exc.status, "http_error"), exc.reason, exc.text or "")
        except (ConnectionResetError, json.JSONDecodeError) as exc:
            return error_response(400, "bad_request", "Malformed request", str(exc))
        except UnicodeError as exc:  # a lone surrogate in a path segment, say: the request's fault
            return error_response(400, "bad_request", "Request contains text that is not valid Unicode", str(exc))
        except Exception as exc:  # one bad request never takes the server down
            log.exception("unhandled error for %s %s", request.method, request.path)
            return error_response(500, "internal_error", "Internal server error", type(exc).__name__)

    @web.middleware
    async def guard(request: web.Request, handler):
        why = check_host_origin(request, config)
        if why is not None:
            return error_response(403, "forbidden_origin", "Request refused", why)
        if config.auth_token and request.path not in OPEN_PATHS and not token_ok(request, config.auth_token):
            if session_ok(request):
                if request.method not in SAFE_METHODS and "Origin" not in request.headers:
                    return error_response(
                        403,
                        "forbidden_origin",
                        "Request refused",
                        "A request made with a session cookie needs an Origin",
                    )
                return await handler(request)
            if wants_page(request):
                raise web.HTTPSeeOther("/login", headers={"Cache-Control": "no-store"})
            resp = error_response(
                401,
                "unauthorized",
                "Missing or wrong auth token",
                "Send 'Authorization: Bearer TOKEN' (or ?token=TOKEN on the websocket)",
            )
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        return await handler(request)

    return [errors, guard]
