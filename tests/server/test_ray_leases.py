"""A Ray actor that freezes (SIGSTOP: alive, connected, silent) loses its prompt's lease: the server ends the
actor through Ray, starts another and re-runs the prompt there. A real local Ray instance, started by the
server in a private temp folder (its own module, so it never meets the instance of test_ray_workers)."""

from __future__ import annotations

import pytest
from srv_helpers import ServeProcess, stop_all, wait_for
from test_ray_workers import _kill_ray, _ray_dir
from test_workers import _all_ready, _graph, _pid_gone, _run

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.timeout(900)


def test_a_frozen_actor_loses_its_lease_and_the_prompt_reruns(tmp_path):
    srv = ServeProcess(tmp_path / "srv", "--ray", "auto", "--ray-workers", "1", "--worker-lease", "2")
    try:
        srv.start()
        _all_ready(srv, 1)
        marker = tmp_path / "first-attempt"
        st = _run(srv, _graph("WFreeze", marker=str(marker)))
        assert st["status"] == "success", st
        assert st["outputs"]["3"]["text"] == ["7"]
        assert "stopped answering: no heartbeat" in srv.log() and "re-running it once" in srv.log()
        wait_for(lambda: _pid_gone(int(marker.read_text())), "the frozen actor's process ended")
        _all_ready(srv, 1)
    finally:
        tmp = _ray_dir(srv) if srv.proc is not None else None
        stop_all([srv], ServeProcess.stop)
        _kill_ray(tmp)
