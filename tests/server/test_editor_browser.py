"""ComfyUI's editor in a real headless Chromium, against a real ``kiln serve`` on loopback.

The page loads without console errors (other than requests the frontend itself tolerates), its node
library holds Kiln's nodes, graphs/txt2img.json loaded through the frontend's API and queued from it shows
progress and its image, the Jobs API still lists the job after a restart, a workflow saved through the
userdata API is in the editor's workflow list after a reload, a browser logs in with the form when the
server has a token, and the editor's own "Export (API)" of the hand-written UI workflows (reroutes,
primitives, bypass, mute, converted widgets, a subgraph) equals Kiln's conversion of them.

One file over the usual size: its tests share the browser fixtures and page helpers above them.

Needs Debian's ``chromium`` + ``chromium-driver`` (``make test`` installs them when it can), ``selenium`` and
the ``ui`` extra. Without them every test here is skipped with the reason "skipped: no browser" (or "no
editor"), also printed in the terminal summary. Nothing is ever downloaded: the system chromedriver is
passed to Selenium (so Selenium Manager is not used) and ``SE_OFFLINE`` is set; the browser resolves no
name but 127.0.0.1.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests
from PIL import Image, ImageStat
from srv_helpers import ROOT, SAFETY_S, LiveServer, ServeProcess, wait_for

pytestmark = pytest.mark.timeout(900)

NO_BROWSER = "skipped: no browser"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1600,900",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # nothing leaves the machine
)
STEPS = 4  # graphs/txt2img.json samples 20 steps; 4 show the same progress and image, sooner on a loaded CPU

# Requests that fail on a stock ComfyUI too, and that the frontend handles: optional user files that do not
# exist yet, the workflow-templates package (not installed), and any host but this server (offline).
TOLERATED_URLS = (
    "/user.css",
    "/api/userdata/user.css",
    "/api/userdata/comfy.templates.json",
    "/api/userdata?dir=",
    "/templates/index",
)
TOLERATED_MESSAGES = ("Error loading core workflow templates",)

_skips: list[str] = []


class _SkipReport:
    """Adds the browser tests' skips to pytest's terminal summary, so that a missing browser is never silent."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if _skips:
            terminalreporter.write_sep("=", "browser tests", yellow=True)
            for line in sorted(set(_skips)):
                terminalreporter.write_line(f"test_editor_browser: {line}", yellow=True)


@pytest.fixture(scope="module", autouse=True)
def _skip_report(request):
    plugin = _SkipReport()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "kiln-browser-skips")
    return plugin


def _skip(reason: str):
    _skips.append(reason)
    pytest.skip(reason)


def _find_browser() -> tuple[str, str] | None:
    binary = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
    driver = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture
def browser(monkeypatch):
    found = _find_browser()
    if found is None:
        _skip(f"{NO_BROWSER} (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip(f"{NO_BROWSER} (selenium is not installed: pip install -e '.[dev]')")
    from kiln.server.frontend import installed_front_end

    if installed_front_end() is None:
        _skip("skipped: no editor (pip install -e '.[ui]')")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager never downloads a browser or a driver
    binary, driver_path = found
    opts = Options()
    opts.binary_location = binary
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as exc:  # a browser that is installed but cannot start is still "no browser"
        _skip(f"{NO_BROWSER} (Chromium did not start: {type(exc).__name__}: {str(exc)[:200]})")
    driver.set_script_timeout(SAFETY_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def base(tmp_path) -> Path:
    """A base folder whose models/ is the repository's (the shipped kiln-shapes checkpoint)."""
    b = tmp_path / "base"
    b.mkdir()
    (b / "models").symlink_to(ROOT / "models", target_is_directory=True)
    return b


# -- page helpers -----------------------------------------------------------------------------------
READY_JS = (
    "return !!(window.app && window.app.graph && window.app.api && window.LiteGraph"
    " && Object.keys(window.LiteGraph.registered_node_types || {}).length)"
)


def open_editor(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(lambda: driver.execute_script(READY_JS), "the editor to start", every=0.2)


def run_js(driver, body: str, *args):
    """Run async JS (``body`` may ``await``; ``args`` are ``a0``, ``a1``...) and return its result; a rejection
    fails the test with the page's message."""
    names = ", ".join(f"a{i}" for i in range(len(args)))
    script = (
        f"const done = arguments[arguments.length - 1]; const [{names}] = arguments;"
        f" (async () => {{ {body} }})().then(v => done({{ok: v}}), e => done({{err: String(e && e.stack || e)}}));"
    )
    out = driver.execute_async_script(script, *args)
    assert "err" not in out, out["err"]
    return out["ok"]


def console_errors(driver, base_url: str) -> list[str]:
    """SEVERE console entries, less those for requests the frontend tolerates."""
    bad = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        msg = entry["message"]
        url = msg.split(" ", 1)[0]
        if entry["source"] == "network" and url.startswith("http"):
            parts = urlsplit(url)
            if f"{parts.scheme}://{parts.netloc}" != base_url:
                continue  # another host: unreachable offline, and optional to the editor
            if any((parts.path + ("?" + parts.query if parts.query else "")).startswith(t) for t in TOLERATED_URLS):
                continue
        if any(t in msg for t in TOLERATED_MESSAGES):
            continue
        bad.append(msg)
    return bad


def no_console_errors(driver, base_url: str) -> None:
    errors = console_errors(driver, base_url)
    assert not errors, "console errors:\n" + "\n".join(e[:500] for e in errors)


def not_blank(png: bytes, min_stddev: float = 8.0) -> float:
    stddev = max(ImageStat.Stat(Image.open(io.BytesIO(png)).convert("RGB")).stddev)
    assert stddev > min_stddev, f"the picture is blank (largest channel stddev {stddev:.2f})"
    return stddev


def jobs(url: str) -> list[dict]:
    r = requests.get(url + "/api/jobs", timeout=SAFETY_S)
    r.raise_for_status()
    return r.json()["jobs"]


# -- tests ------------------------------------------------------------------------------------------
def test_editor_runs_a_kiln_prompt_and_keeps_it(browser, base, serve_proc, tmp_path):
    srv = serve_proc(base=base)
    open_editor(browser, srv.url)

    # the node library is Kiln's: its own nodes and ComfyUI's core classes, from /object_info
    types = browser.execute_script("return Object.keys(LiteGraph.registered_node_types)")
    served = requests.get(srv.url + "/api/object_info", timeout=SAFETY_S).json()
    assert {"KSampler", "CheckpointLoaderSimple", "SaveImage", "TConst"} <= set(types)
    assert set(served) <= set(types), sorted(set(served) - set(types))[:10]

    # graphs/txt2img.json through the frontend's API, queued from the page
    graph = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    graph["3"]["inputs"]["steps"] = STEPS
    loaded = run_js(
        browser, "await app.loadApiJson(a0, 'txt2img.json'); return app.graph._nodes.map(n => n.type)", graph
    )
    assert sorted(loaded) == sorted(n["class_type"] for n in graph.values())
    run_js(
        browser,
        "window.kilnEvents = [];"
        " for (const t of ['progress', 'progress_state', 'executing', 'executed', 'execution_success',"
        "   'execution_error'])"
        "   app.api.addEventListener(t, e => window.kilnEvents.push([t, e.detail]));"
        " return true",
    )
    assert run_js(browser, "return await app.queuePrompt(0)") is not False

    (job,) = wait_for(lambda: jobs(srv.url), "the job to be listed")
    done = wait_for(
        lambda: [j for j in jobs(srv.url) if j["id"] == job["id"] and j["status"] in ("completed", "failed")],
        "the prompt to finish",
        every=0.5,
    )[0]
    assert done["status"] == "completed", done
    output = done["preview_output"]
    assert output["filename"].startswith("txt2img") and output["type"] == "output"

    # the page saw the run: progress for every step, then the saved image
    events = wait_for(
        lambda: (
            (ev := browser.execute_script("return window.kilnEvents"))
            and any(t == "execution_success" for t, _ in ev)
            and ev
        ),
        "the page to hear the run finish",
    )
    steps = [d["value"] for t, d in events if t == "progress" and str(d.get("node")) == "3"]
    assert steps and steps[-1] == STEPS and steps == sorted(steps), steps
    # progress_state as the editor reads it: snapshots (it replaces its map with each), the last one before
    # execution_success holding every node of the graph, finished, the sampler at its last step
    states = [d for t, d in events if t == "progress_state"]
    assert states and all(set(d) == {"prompt_id", "nodes"} for d in states)
    final = states[-1]["nodes"]
    assert set(final) == set(graph) and {v["state"] for v in final.values()} == {"finished"}, final
    assert final["3"]["value"] == final["3"]["max"] == STEPS
    (executed,) = [d for t, d in events if t == "executed"]
    assert executed["output"]["images"][0]["filename"] == output["filename"]
    img_js = (
        "return [...document.querySelectorAll('img')].some(i => i.src.includes(a0) && i.complete && i.naturalWidth > 0)"
    )
    wait_for(lambda: run_js(browser, img_js, quote(output["filename"])), "the editor to show the image")
    image = requests.get(srv.url + "/api/view", params=output, timeout=SAFETY_S)
    assert image.status_code == 200
    not_blank(image.content)
    shot = tmp_path / "editor.png"
    browser.save_screenshot(str(shot))
    not_blank(shot.read_bytes())
    no_console_errors(browser, srv.url)

    # a workflow saved through the userdata API
    workflow = browser.execute_script("return app.graph.serialize()")
    name = quote("workflows/kiln-saved.json", safe="")
    r = requests.post(srv.url + f"/api/userdata/{name}?overwrite=true", json=workflow, timeout=SAFETY_S)
    assert r.status_code == 200, r.text

    # restart the server: the job is still listed and the saved workflow is in the editor after a reload
    browser.get("about:blank")  # the old page's calls to a stopped server are not the new page's errors
    browser.get_log("browser")
    srv.stop()
    srv2 = serve_proc(base=base)
    after = {j["id"]: j for j in jobs(srv2.url)}
    assert after[job["id"]]["status"] == "completed"
    assert after[job["id"]]["preview_output"]["filename"] == output["filename"]
    open_editor(browser, srv2.url)
    history = run_js(browser, "return JSON.stringify(await app.api.getHistory())")
    assert job["id"] in history, "the editor's history lists the job run before the restart"
    paths = wait_for(
        lambda: (
            "workflows/kiln-saved.json"
            in (p := browser.execute_script("return app.extensionManager.workflow.workflows.map(w => w.path)"))
            and p
        ),
        "the saved workflow to be listed",
        every=0.2,
    )
    assert "workflows/kiln-saved.json" in paths
    reopened = run_js(
        browser,
        "const wf = app.extensionManager.workflow.getWorkflowByPath(a0); await wf.load();"
        " await app.loadGraphData(wf.activeState); return app.graph._nodes.map(n => n.type)",
        "workflows/kiln-saved.json",
    )
    assert sorted(reopened) == sorted(loaded)
    no_console_errors(browser, srv2.url)


def test_browser_logs_in_with_the_form(browser, base, monkeypatch):
    token = "browser-login-" + os.urandom(8).hex()
    monkeypatch.setenv("KILN_AUTH_TOKEN", token)  # from the environment: never on a command line
    srv = TokenServeProcess(base, token=token)
    try:
        _log_in_with_the_form(browser, srv.start(), token)
    finally:
        srv.kill()


class TokenServeProcess(ServeProcess):
    """A ``kiln serve`` whose readiness probe carries the token (the plain probe gets 401)."""

    def __init__(self, base: Path, token: str) -> None:
        super().__init__(base)
        self.token = token

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            return requests.get(self.url + "/api/features", headers=headers, timeout=SAFETY_S).status_code == 200
        except requests.ConnectionError:
            return False


def _log_in_with_the_form(browser, srv: ServeProcess, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(srv.url + "/")
    assert browser.current_url == srv.url + "/login"
    field = browser.find_element(By.ID, "token")
    field.send_keys("wrong")
    field.submit()
    wait_for(lambda: "Wrong token" in browser.page_source, "the form to refuse a wrong token")
    assert browser.get_cookies() == []
    refused = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/login" in m and "401" in m for m in refused), refused  # only the wrong token's answer
    field = browser.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()
    wait_for(lambda: browser.execute_script(READY_JS), "the editor to start after logging in", every=0.2)
    assert browser.current_url == srv.url + "/"
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and token not in cookie["value"]
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: scripts cannot read it
    # the websocket opened with the cookie, and the editor's API calls pass (a write too: the Origin matches)
    wait_for(lambda: browser.execute_script("return app.api.socket && app.api.socket.readyState === 1"), "the ws")
    assert run_js(browser, "return (await fetch('/api/queue')).status") == 200
    assert run_js(browser, "return (await fetch('/api/interrupt', {method: 'POST'})).status") == 200
    no_console_errors(browser, srv.url)
    assert token not in srv.log()


# UI workflows written by hand (tests/engine/ui_workflows): their conversion is also tested without a browser
UI_FIXTURES = ROOT / "tests" / "engine" / "ui_workflows"
UI_WORKFLOWS = ("reroute_primitive", "bypass_mute", "subgraph", "empty_image_save", "txt2img_editor")
# Files whose subgraph nodes reuse ids of root nodes, which the editor never saves: on loading one, the
# editor gives each such node a new id (past last_node_id), so its export names them differently from Kiln's
# conversion of the file (the same nodes and links otherwise). The file as the editor then saves it converts
# exactly (checked below). None of the fixtures does this now.
IDS_RENUMBERED_BY_THE_EDITOR: set[str] = set()


def test_editor_export_api_equals_kilns_conversion(browser, base):
    """The editor's "Export (API)" (``app.graphToPrompt()``, what its menu item saves) of each workflow, loaded
    into the page, is exactly what engine/ui_workflow.py makes of the same file."""
    from kiln.engine.ui_workflow import workflow_to_prompt
    from kiln.runtime import default_registry
    from kiln.server.frontend import installed_front_end

    registry = default_registry(custom_nodes=base / "no-custom-nodes", entry_points=False)
    (base / "input").symlink_to(ROOT / "input", target_is_directory=True)  # example.png, for the image loaders
    srv = LiveServer(base, registry=registry, front_end_root=installed_front_end())
    try:
        open_editor(browser, srv.url)
        bad = []
        for name in UI_WORKFLOWS:
            workflow = json.loads((UI_FIXTURES / f"{name}.json").read_text())
            exported, saved = run_js(
                browser,
                "await app.loadGraphData(a0, true, true, a1);"
                " return [(await app.graphToPrompt()).output, app.graph.serialize()]",
                copy.deepcopy(workflow),
                f"{name}.json",
            )
            for label, wf in (("file", workflow), ("as saved", saved)):
                kilns = workflow_to_prompt(copy.deepcopy(wf), registry, rng=random.Random(0))
                if label == "file" and name in IDS_RENUMBERED_BY_THE_EDITOR:
                    assert exported != kilns, f"{name}: the editor kept the ids now; drop it from the set"
                    assert sorted(n["class_type"] for n in exported.values()) == sorted(
                        n["class_type"] for n in kilns.values()
                    )
                elif exported != kilns:
                    editor, kiln = (json.dumps(p, sort_keys=True) for p in (exported, kilns))
                    bad.append(f"{name} ({label}):\n  editor {editor}\n  kiln   {kiln}")
        # every shipped graph, as the editor lays it out when it opens an API file, and saves it
        for path in sorted((ROOT / "graphs").glob("*.json")):
            exported, saved = run_js(
                browser,
                "await app.loadApiJson(a0, a1); return [(await app.graphToPrompt()).output, app.graph.serialize()]",
                json.loads(path.read_text()),
                path.name,
            )
            kilns = workflow_to_prompt(saved, registry, rng=random.Random(0))
            if exported != kilns:
                editor, kiln = (json.dumps(p, sort_keys=True) for p in (exported, kilns))
                bad.append(f"graphs/{path.name}:\n  editor {editor}\n  kiln   {kiln}")
        assert not bad, "\n".join(bad)
        no_console_errors(browser, srv.url)
    finally:
        srv.stop()
