"""Workers as Ray actors (``kiln serve --ray auto --ray-workers 2``) on a real local Ray instance, started by
the server itself in a private temp folder (CPU only): prompts run side by side on two actors, an actor that
dies is replaced and its prompt re-run once, and a node that ignores an interrupt is stopped by ending its
actor. Everything the server started (its Ray processes included) is stopped at the end, even on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from srv_helpers import ServeProcess, stop_all, wait_for
from test_workers import _add, _all_ready, _graph, _meet, _pid_gone, _result, _run, _submit

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.timeout(900)


def _ray_dir(srv: ServeProcess) -> str | None:
    m = re.search(r"started a local Ray instance in (\S+)", srv.log())
    return m.group(1) if m else None


def _kill_ray(tmp: str | None) -> None:
    """Every process whose command line names this server's Ray folder (raylet, GCS, actors), then the folder."""
    if not tmp:
        return
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if tmp.encode() in cmd:
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def rsrv(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray")
    srv = ServeProcess(base, "--ray", "auto", "--ray-workers", "2", "--interrupt-grace", "1")
    try:
        srv.start()
        _all_ready(srv, 2)
        yield srv
    finally:
        tmp = _ray_dir(srv) if srv.proc is not None else None
        stop_all([srv], ServeProcess.stop)  # SIGTERM: the server stops its actors and its Ray instance
        _kill_ray(tmp)


def test_two_actors_run_prompts_side_by_side(rsrv, tmp_path):
    a = _submit(rsrv, _meet(tmp_path / "meet", "a"))
    b = _submit(rsrv, _meet(tmp_path / "meet", "b"))
    ra, rb = _result(rsrv, a), _result(rsrv, b)
    assert ra["status"] == rb["status"] == "success", (ra, rb)
    pids = {ra["outputs"]["2"]["text"][0], rb["outputs"]["2"]["text"][0]}
    assert len(pids) == 2 and str(rsrv.proc.pid) not in pids


def test_a_lost_actor_is_replaced_and_its_prompt_rerun(rsrv, tmp_path):
    marker = tmp_path / "first-attempt"
    st = _run(rsrv, _graph("WKill", marker=str(marker)))
    assert st["status"] == "success", st
    assert marker.exists() and _pid_gone(int(marker.read_text()))
    assert "re-running it once" in rsrv.log()
    _all_ready(rsrv, 2)
    assert _run(rsrv, _add(4))["outputs"]["3"]["text"] == ["11"]


def test_a_prompt_that_ends_two_actors_fails_naming_the_node(rsrv):
    # the node kills its actor the moment it starts, before its events can have left: the node is read
    # back from the dead actor's slot on its machine
    st = _run(rsrv, _graph("WKill"))
    assert st["status"] == "error", st
    err = st["error"]
    assert err["node_id"] == "2" and err["node_type"] == "WKill", err
    msg = err["exception_message"]
    assert msg.startswith("worker killed: its Ray actor's process") and "two workers" in msg
    assert "at node 2 (WKill)" in msg, msg
    _all_ready(rsrv, 2)


def test_interrupt_of_a_stubborn_node_ends_its_actor(rsrv, tmp_path):
    started = tmp_path / "started"
    import requests

    pid = _submit(rsrv, _graph("WStubborn", started=str(started)))
    try:
        wait_for(started.exists, "the stubborn node to start")
        actor_pid = int(started.read_text())
        assert requests.post(f"{rsrv.url}/interrupt", json={"prompt_id": pid}, timeout=60).status_code == 200
        st = _result(rsrv, pid)
    finally:  # never leave it holding an actor the module's later tests expect idle
        requests.post(f"{rsrv.url}/interrupt", json={"prompt_id": pid}, timeout=60)
    assert st["status"] == "interrupted", st
    wait_for(lambda: _pid_gone(actor_pid), "the stubborn actor to be ended")
    _all_ready(rsrv, 2)
    assert _run(rsrv, _add(1))["status"] == "success"


def test_prompts_sent_back_to_back_all_complete(rsrv):
    """Each actor takes its next prompt the moment it reports the last one done."""
    ids = [_submit(rsrv, _add(i)) for i in range(8)]
    for i, pid in enumerate(ids):
        st = _result(rsrv, pid)
        assert st["status"] == "success" and st["outputs"]["3"]["text"] == [str(7 + i)], st
