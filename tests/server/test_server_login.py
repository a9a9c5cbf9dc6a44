"""Logging in with a browser: the /login form, the session cookie on HTTP and the websocket, redirects for
page loads, 401 JSON for API clients, the Origin check on cookie-authenticated writes, no token in URLs or logs."""

from __future__ import annotations

import logging

import pytest
import requests
from srv_helpers import SAFETY_S, chain, recv_json
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(600)

TOKEN = "correct-horse-battery-staple"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def log_in(server, token: str = TOKEN) -> requests.Session:
    sess = requests.Session()
    r = sess.post(server.url + "/login", data={"token": token}, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 303 and r.headers["Location"] == "/", r.text
    return sess


def cookie_of(sess: requests.Session):
    (cookie,) = list(sess.cookies)
    return cookie


def test_login_page_and_redirects(live):
    s = live(auth_token=TOKEN)
    # a browser loading a page without credentials is sent to the form; a script gets 401 JSON
    r = requests.get(s.url + "/", headers=HTML, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 303 and r.headers["Location"] == "/login"
    r = requests.get(s.url + "/queue", allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    r = requests.post(s.url + "/prompt", json={"prompt": chain()}, headers=HTML, timeout=SAFETY_S)
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/json")

    page = requests.get(s.url + "/login", headers=HTML, timeout=SAFETY_S)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<form method="post" action="/login">' in page.text and 'type="password"' in page.text
    assert (
        page.headers["Cache-Control"] == "no-store"
        and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    )
    assert TOKEN not in page.text


def test_wrong_token_gets_no_session(live):
    s = live(auth_token=TOKEN)
    sess = requests.Session()
    for wrong in ("", "nope", TOKEN[:-1], TOKEN + "x"):
        r = sess.post(s.url + "/login", data={"token": wrong}, allow_redirects=False, timeout=SAFETY_S)
        assert r.status_code == 401 and "Wrong token" in r.text
        assert "Set-Cookie" not in r.headers
    assert len(sess.cookies) == 0
    r = sess.post(s.url + "/login", json={"token": TOKEN}, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 401, "the token comes in the form body, not JSON"
    assert sess.get(s.url + "/queue", timeout=SAFETY_S).status_code == 401
    assert len(s.app[_sessions_key()]) == 0


def _sessions_key():
    from kiln.server.login import SESSIONS

    return SESSIONS


def test_session_cookie_on_http(live):
    s = live(auth_token=TOKEN)
    sess = log_in(s)
    c = cookie_of(sess)
    assert c.value != TOKEN and TOKEN not in c.value and len(c.value) >= 32
    assert c.has_nonstandard_attr("HttpOnly") and c.get_nonstandard_attr("SameSite") == "Strict"
    assert c.path == "/"

    r = sess.get(s.url + "/", headers=HTML, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
    assert sess.get(s.url + "/api/queue", timeout=SAFETY_S).json() == {"queue_running": [], "queue_pending": []}

    # a state-changing request with the cookie: accepted from the server's own origin ...
    own = {"Origin": s.url}
    r = sess.post(s.url + "/prompt", json={"prompt": chain(2)}, headers=own, timeout=SAFETY_S)
    assert r.status_code == 200, r.text
    # ... refused cross-site, and refused with no Origin at all (a cookie alone never authorises a write)
    r = sess.post(s.url + "/prompt", json={"prompt": chain(2)}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden_origin"
    r = sess.post(s.url + "/prompt", json={"prompt": chain(2)}, timeout=SAFETY_S)
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden_origin"
    # a login from another site is refused too (login CSRF)
    r = requests.post(s.url + "/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "Set-Cookie" not in r.headers

    # the bearer token still works for scripts, and a forged cookie does not
    assert s.get("/queue", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    forged = requests.get(s.url + "/queue", cookies={c.name: "x" * 43}, timeout=SAFETY_S)
    assert forged.status_code == 401
    as_token = requests.get(s.url + "/queue", cookies={c.name: TOKEN}, timeout=SAFETY_S)
    assert as_token.status_code == 401, "the cookie holds a session id, never the token"


def test_logout_and_fresh_session_ids(live):
    s = live(auth_token=TOKEN)
    sess = log_in(s)
    first = cookie_of(sess).value
    sess2 = log_in(s)
    assert cookie_of(sess2).value != first
    r = sess.post(s.url + "/logout", headers={"Origin": s.url}, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 303 and r.headers["Location"] == "/login"
    assert requests.get(s.url + "/queue", cookies={cookie_of(sess2).name: first}).status_code == 401
    assert sess2.get(s.url + "/queue", timeout=SAFETY_S).status_code == 200  # other sessions live on


def test_session_cookie_on_websocket(live):
    s = live(auth_token=TOKEN)
    c = cookie_of(log_in(s))
    cookie = f"{c.name}={c.value}"
    with connect(s.ws_url + "?clientId=b", additional_headers={"Cookie": cookie}, open_timeout=SAFETY_S) as ws:
        assert recv_json(ws)["type"] == "status"
    with connect(
        s.ws_url, additional_headers={"Cookie": cookie}, origin=s.url, open_timeout=SAFETY_S, compression=None
    ) as ws:
        assert recv_json(ws)["type"] == "status"
    with pytest.raises(InvalidStatus) as exc:  # the cookie does not open the socket to another site's page
        connect(s.ws_url, additional_headers={"Cookie": cookie}, origin="http://evil.example", open_timeout=SAFETY_S)
    assert exc.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as exc:
        connect(s.ws_url, additional_headers={"Cookie": f"{c.name}=bogus"}, open_timeout=SAFETY_S)
    assert exc.value.response.status_code == 401


def test_no_token_no_login(live):
    s = live()
    r = requests.get(s.url + "/login", allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 303 and r.headers["Location"] == "/"
    r = requests.post(s.url + "/login", data={"token": "x"}, allow_redirects=False, timeout=SAFETY_S)
    assert r.status_code == 303 and "Set-Cookie" not in r.headers
    assert requests.get(s.url + "/", headers=HTML, allow_redirects=False, timeout=SAFETY_S).status_code == 200


def test_token_never_in_a_url_or_a_log_line(live, caplog):
    caplog.set_level(logging.DEBUG)
    s = live(auth_token=TOKEN)
    sess = requests.Session()
    r = sess.get(s.url + "/", headers=HTML, timeout=SAFETY_S)  # redirected to the form
    assert r.url == s.url + "/login"
    r = sess.post(s.url + "/login", data={"token": TOKEN}, headers={"Origin": s.url}, timeout=SAFETY_S)
    assert r.status_code == 200 and r.url == s.url + "/"
    urls = [h.url for h in r.history] + [r.url] + [h.headers.get("Location", "") for h in r.history]
    assert all(TOKEN not in u for u in urls)
    sess.post(s.url + "/login", data={"token": "wrong-" + TOKEN}, timeout=SAFETY_S)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in str(v) for h in r.history for v in h.headers.values())
