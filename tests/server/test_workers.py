"""Prompts run in worker processes (``kiln serve --workers N``): a prompt that kills, crashes, exhausts or
ignores its worker ends that worker, never the server; the prompt is re-run once or failed naming the node
and the cause; other prompts go on; workers run prompts side by side and keep the models they loaded.

Real ``kiln serve`` subprocesses with real worker processes, and nodes (testpack/kiln_worker_nodes.py) that
really SIGKILL, segfault, allocate or ignore interrupts. Nothing waits on a fixed sleep: each step waits for
a status, a file or a log line, bounded only by SAFETY_S.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from contextlib import contextmanager

import pytest
import requests
from srv_helpers import ROOT, SAFETY_S, ServeProcess, stop_all, wait_for

pytestmark = pytest.mark.timeout(600)
SHIPPED = ROOT / "models" / "checkpoints" / "kiln-shapes.safetensors"


def _graph(node: str, **inputs) -> dict:
    return {
        "1": {"class_type": "TConst", "inputs": {"value": 7}},
        "2": {"class_type": node, "inputs": {"value": ["1", 0], **inputs}},
        "3": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
    }


def _add(b: int) -> dict:
    """7 + b, shown: a prompt that needs nothing special of its worker."""
    return {
        "1": {"class_type": "TConst", "inputs": {"value": 7}},
        "2": {"class_type": "TAdd", "inputs": {"a": ["1", 0], "b": b}},
        "3": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
    }


def _meet(folder, name: str, n: int = 2) -> dict:
    return {
        "1": {"class_type": "WMeet", "inputs": {"folder": str(folder), "name": name, "n": n}},
        "2": {"class_type": "TShow", "inputs": {"value": ["1", 0]}},
    }


def _submit(srv: ServeProcess, graph: dict, client_id: str = "t") -> str:
    r = requests.post(f"{srv.url}/prompt", json={"prompt": graph, "client_id": client_id}, timeout=SAFETY_S)
    assert r.status_code == 200, r.text
    return r.json()["prompt_id"]


def _result(srv: ServeProcess, pid: str) -> dict:
    r = requests.get(
        f"{srv.url}/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S)}, timeout=SAFETY_S + 10
    )
    st = r.json()
    assert st["status"] not in ("pending", "running"), st
    return st


def _run(srv: ServeProcess, graph: dict) -> dict:
    return _result(srv, _submit(srv, graph))


def _workers(srv: ServeProcess) -> list[dict]:
    return requests.get(f"{srv.url}/api/workers", timeout=SAFETY_S).json()["workers"]


@contextmanager
def serving(n: int, base, *args: str):
    """A ``kiln serve`` with these arguments, once its ``n`` workers are idle; always stopped afterwards."""
    srv = ServeProcess(base, *args)
    try:
        srv.start()
        _all_ready(srv, n)
        yield srv
    finally:
        stop_all([srv], ServeProcess.kill)


def _all_ready(srv: ServeProcess, n: int) -> list[dict]:
    def ready():
        if srv.proc.poll() is not None:
            raise AssertionError(f"kiln serve exited with {srv.proc.returncode}:\n{srv.log()[-3000:]}")
        try:
            ws = _workers(srv)
        except requests.ConnectionError:  # a server busy starting its workers may drop a connection
            return None
        return ws if len(ws) == n and all(w["state"] == "idle" for w in ws) else None

    return wait_for(ready, f"{n} idle workers")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One server with two workers, a 1 s interrupt grace, 600 MiB per worker and a 1 GiB prompt budget."""
    base = tmp_path_factory.mktemp("workers")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "kiln-shapes.safetensors").symlink_to(SHIPPED)
    args = ("--workers", "2", "--interrupt-grace", "1", "--worker-memory", "600MiB", "--max-prompt-memory", "1GiB")
    with serving(2, base, *args) as srv:
        yield srv


def test_two_workers_run_prompts_side_by_side(two, tmp_path):
    """Two prompts that each return only once both are running: one worker at a time would never finish."""
    a = _submit(two, _meet(tmp_path / "meet", "a"))
    b = _submit(two, _meet(tmp_path / "meet", "b"))
    ra, rb = _result(two, a), _result(two, b)
    assert ra["status"] == rb["status"] == "success", (ra, rb)
    pids = {ra["outputs"]["2"]["text"][0], rb["outputs"]["2"]["text"][0]}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two processes, neither of them the test's
    assert {w["pid"] for w in _workers(two)} == {int(p) for p in pids}


def test_a_local_worker_runs_a_prompt_as_the_server_validated_it(two, tmp_path):
    """The server validates against the registry and folders its local workers share: the worker does not
    validate again (for a 500-node prompt that was 2-3 ms of a 50 ms run)."""
    log = tmp_path / "validated-by"
    graph = {
        "1": {"class_type": "WChecked", "inputs": {"log": str(log)}},
        "2": {"class_type": "TShow", "inputs": {"value": ["1", 0]}},
    }
    st = _run(two, graph)
    assert st["status"] == "success", st
    ran_in = int(st["outputs"]["2"]["text"][0])
    assert ran_in in {w["pid"] for w in _workers(two)}
    assert log.read_text().split() == [str(two.proc.pid)]  # once, by the server, not by the worker


def test_a_worker_killed_once_reruns_the_prompt(two, tmp_path):
    marker = tmp_path / "first-attempt"
    st = _run(two, _graph("WKill", marker=str(marker)))
    assert st["status"] == "success", st
    assert st["outputs"]["3"]["text"] == ["7"]
    assert marker.exists()  # the first attempt ran, and died
    assert "re-running it once" in two.log()
    _all_ready(two, 2)  # the dead worker was replaced


def test_a_prompt_that_kills_two_workers_fails_naming_node_and_cause(two):
    st = _run(two, _graph("WKill"))
    assert st["status"] == "error", st
    err = st["error"]
    assert err["exception_type"] == "WorkerLost"
    assert err["node_id"] == "2" and err["node_type"] == "WKill"
    msg = err["exception_message"]
    assert msg.startswith("worker killed: killed by SIGKILL") and "at node 2 (WKill)" in msg
    assert "two workers" in msg
    _all_ready(two, 2)
    assert _run(two, _add(1))["status"] == "success"  # the server and its workers go on


def test_a_segfault_ends_the_worker_not_the_server(two):
    st = _run(two, _graph("WSegfault"))
    assert st["status"] == "error"
    assert "crashed with SIGSEGV in native code at node 2 (WSegfault)" in st["error"]["exception_message"]
    assert two.proc.poll() is None
    _all_ready(two, 2)


def test_memory_hog_fails_alone_while_another_clients_prompt_completes(two, tmp_path):
    hog = _submit(two, _graph("WHog", chunk_mb=16), client_id="hog")
    ok = _run(two, _add(2))
    assert ok["status"] == "success" and ok["outputs"]["3"]["text"] == ["9"]
    st = _result(two, hog)
    assert st["status"] == "error", st
    msg = st["error"]["exception_message"]
    # the watchdog stops it at its limit (or, if the allocation outruns a reading, the address-space cap
    # makes the allocation fail inside the node): either way this prompt fails and is not re-run
    assert ("out of memory" in msg and "at node 2 (WHog)" in msg) or st["error"]["exception_type"] == "MemoryError"
    assert "re-running" not in two.log().split(hog)[-1]
    _all_ready(two, 2)


def test_interrupt_of_a_node_that_ignores_it_ends_its_worker(two, tmp_path):
    started = tmp_path / "started"
    pid = _submit(two, _graph("WStubborn", started=str(started)))
    try:
        wait_for(started.exists, "the stubborn node to start")
        worker_pid = int(started.read_text())
        r = requests.post(f"{two.url}/interrupt", json={"prompt_id": pid}, timeout=SAFETY_S)
        assert r.status_code == 200
        st = _result(two, pid)
    finally:  # never leave it holding a worker the module's later tests expect idle
        requests.post(f"{two.url}/interrupt", json={"prompt_id": pid}, timeout=SAFETY_S)
    assert st["status"] == "interrupted", st
    assert st["error"]["node_id"] == "2" and st["error"]["node_type"] == "WStubborn"
    wait_for(lambda: _pid_gone(worker_pid), "the stubborn worker to be ended")
    _all_ready(two, 2)
    assert _run(two, _add(3))["status"] == "success"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie not yet reaped by the server counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_model_affine_dispatch_keeps_each_checkpoint_on_one_worker(two):
    """A, A, B, B, A, B one after another: least-recently-used dispatch would run A on both workers; affinity
    keeps every A on the worker that loaded A and every B on the other."""
    ran: dict[str, set] = {"a.safetensors": set(), "b.safetensors": set()}
    for name in ["a.safetensors", "a.safetensors", "b.safetensors", "b.safetensors", "a.safetensors", "b.safetensors"]:
        g = {
            "1": {"class_type": "WFakeLoader", "inputs": {"ckpt_name": name}},
            "2": {"class_type": "TShow", "inputs": {"value": ["1", 0]}},
        }
        st = _run(two, g)
        assert st["status"] == "success", st
        ran[name].add(st["outputs"]["2"]["text"][0])
    assert len(ran["a.safetensors"]) == 1 and len(ran["b.safetensors"]) == 1, ran
    assert ran["a.safetensors"] != ran["b.safetensors"]
    held = {m for w in _workers(two) for m in w["models"]}
    assert {"ckpt_name=a.safetensors", "ckpt_name=b.safetensors"} <= held


def test_free_unloads_the_workers(two):
    r = requests.post(f"{two.url}/free", json={"unload_models": True}, timeout=SAFETY_S)
    assert r.status_code == 200
    assert all(not w["models"] for w in _workers(two))


def test_max_prompt_seconds_stops_and_fails_a_long_prompt(tmp_path):
    with serving(1, tmp_path, "--workers", "1", "--max-prompt-seconds", "1", "--interrupt-grace", "1") as srv:
        st = _run(srv, _graph("WStubborn"))
        assert st["status"] == "error", st
        msg = st["error"]["exception_message"]
        assert "longer than the limit of 1 s (--max-prompt-seconds)" in msg and "at node 2 (WStubborn)" in msg
        _all_ready(srv, 1)
        assert _run(srv, _add(1))["status"] == "success"


@pytest.fixture(scope="module")
def short_lease(tmp_path_factory):
    """Two workers whose leases last 1 s (heartbeats every 0.2 s)."""
    with serving(2, tmp_path_factory.mktemp("lease"), "--workers", "2", "--worker-lease", "1") as srv:
        yield srv


def _leases(srv: ServeProcess) -> list[tuple]:
    db = sqlite3.connect(srv.base / "data" / "kiln.sqlite3")
    try:
        return db.execute("SELECT prompt_id, worker, attempt, granted, heartbeat, expires FROM leases").fetchall()
    finally:
        db.close()


def test_a_running_prompt_holds_a_lease_that_heartbeats_renew(short_lease, tmp_path):
    """The lease is a row in the store while the prompt runs, its heartbeat and expiry moving on; it goes
    when the prompt ends."""
    folder = tmp_path / "meet"
    pid = _submit(short_lease, _meet(folder, "a"))  # waits for a second file, which the test adds below

    def renewed():
        rows = [r for r in _leases(short_lease) if r[0] == pid]
        return rows[0] if rows and rows[0][4] > rows[0][3] else None

    lease = wait_for(renewed, "a renewed lease")
    _id, worker, attempt, granted, heartbeat, expires = lease
    assert worker in {w["name"] for w in _workers(short_lease)} and attempt == 1
    assert expires == pytest.approx(heartbeat + 1.0)
    assert [w["prompt_id"] for w in _workers(short_lease) if w["name"] == worker] == [pid]
    (folder / "b").write_text("go")
    assert _result(short_lease, pid)["status"] == "success"
    assert not [r for r in _leases(short_lease) if r[0] == pid]


def test_a_frozen_worker_loses_its_lease_and_the_prompt_reruns(short_lease, tmp_path):
    """SIGSTOP leaves the process alive, with its pipe open, but silent: only the lease sees it."""
    marker = tmp_path / "first-attempt"
    st = _run(short_lease, _graph("WFreeze", marker=str(marker)))
    assert st["status"] == "success", st
    assert st["outputs"]["3"]["text"] == ["7"]
    frozen = int(marker.read_text())
    assert "stopped answering: no heartbeat" in short_lease.log() and "re-running it once" in short_lease.log()
    ws = _all_ready(short_lease, 2)  # the frozen process was ended and replaced
    assert frozen not in {w["pid"] for w in ws}
    metrics = requests.get(f"{short_lease.url}/metrics", timeout=SAFETY_S).text
    assert any(
        line.startswith("kiln_worker_leases_expired_total ") and float(line.split()[1]) >= 1
        for line in metrics.splitlines()
    )


def test_a_prompt_that_freezes_two_workers_fails_naming_the_cause(short_lease):
    st = _run(short_lease, _graph("WFreeze"))
    assert st["status"] == "error", st
    msg = st["error"]["exception_message"]
    assert msg.startswith("worker killed: it stopped answering: no heartbeat") and "at node 2 (WFreeze)" in msg
    assert st["error"]["exception_type"] == "WorkerLost" and "two workers" in msg
    _all_ready(short_lease, 2)
    assert _run(short_lease, _add(2))["status"] == "success"


def test_workers_die_with_the_server(tmp_path):
    srv = ServeProcess(tmp_path, "--workers", "2")
    try:
        srv.start()
        pids = [w["pid"] for w in _all_ready(srv, 2)]
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(SAFETY_S)
        for p in pids:
            wait_for(lambda p=p: _pid_gone(p), f"worker {p} to end with its server")
    finally:
        stop_all([srv], ServeProcess.kill)


def test_outputs_written_by_workers_are_journaled(tmp_path):
    """A worker's saver writes through the server's journal: the history names a file that exists."""
    srv = ServeProcess(tmp_path, "--workers", "1")
    try:
        srv.start()
        g = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "w"}},
        }
        st = _run(srv, g)
        assert st["status"] == "success", st
        img = st["outputs"]["2"]["images"][0]
        assert (tmp_path / "output" / img["filename"]).is_file()
        hist = requests.get(f"{srv.url}/history", timeout=SAFETY_S).json()
        assert json.dumps(hist).count(img["filename"]) == 1
    finally:
        stop_all([srv], ServeProcess.kill)


@pytest.mark.parametrize(
    "graph, node",
    [
        (
            {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 16384, "height": 16384, "batch_size": 1}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}},
            },
            None,  # refused at EmptyImage or at the saver, whichever holds more
        ),
        (
            {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 4096, "batch_size": 64}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            },
            "1",
        ),
        (
            {
                "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "kiln-shapes.safetensors"}},
                "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 4096}},
                "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["c", 2]}},
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
            },
            "2",
        ),
    ],
    ids=["16384-squared", "4096-batch-64", "latent-batch-4096-decoded"],
)
def test_prompts_that_would_exhaust_memory_are_refused_before_running(two, graph, node):
    """The prompts that used to take the whole server past 8 GB: refused with a 400 naming the node, the
    estimate and the limit, while another client's prompt is served."""
    r = requests.post(f"{two.url}/prompt", json={"prompt": graph, "client_id": "big"}, timeout=SAFETY_S)
    assert r.status_code == 400, r.text
    errs = r.json()["node_errors"]
    if node is not None:
        assert node in errs, errs
    e = next(iter(errs.values()))["errors"][0]
    assert e["type"] == "prompt_memory_over_budget" and "GiB" in e["message"] + e["details"], e
    assert _run(two, _add(5))["status"] == "success"


def test_a_bad_output_store_url_is_a_usage_error(tmp_path):
    import subprocess

    from srv_helpers import kiln_cmd

    r = subprocess.run(
        kiln_cmd("serve", "--port", "0", "--base-dir", str(tmp_path), "--output-store", "my-bucket/out"),
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
    )
    assert r.returncode == 2, r.stderr
    assert "--output-store 'my-bucket/out': write s3://BUCKET/PREFIX" in r.stderr
    assert "Traceback" not in r.stderr
