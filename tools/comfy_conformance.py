"""Run ComfyUI's own execution test suite against a real ``kiln serve`` and count what passes.

ComfyUI's repository has a server-level test suite under ``tests/execution/`` (``test_execution.py``,
``test_async_nodes.py``, ``test_progress_isolation.py``, ...) with a custom node pack of test nodes under
``testing_nodes/``. Each test class starts ComfyUI with a fixture that runs
``python main.py --output-directory D --listen H --port P --extra-model-paths-config Y --cpu [cache flags]``
and then talks to it over HTTP and the websocket. That suite is GPL-3.0 and is never part of Kiln: point this
tool at a copy of it (``--suite DIR``, the folder holding the test files and ``testing_nodes/``).

The suite's files are not edited. The tool copies them into a temporary folder and runs pytest there with
this file loaded as a plugin (``-p comfy_conformance``), which:

- provides what ComfyUI's ``tests/conftest.py`` would (the ``--output_dir``/``--listen``/``--port``/
  ``--skip-timing-checks`` options, the ``args_pytest`` and ``skip_timing_checks`` fixtures);
- makes ComfyUI's module names importable in the test process (the tests import
  ``comfy_execution.graph_utils.GraphBuilder``) through :func:`kiln.compat.install`;
- replaces ``subprocess.Popen`` for the duration of the run so that a command that starts ComfyUI's
  ``main.py`` starts ``python -m kiln serve`` instead, each ComfyUI flag mapped to Kiln's
  (``--output-directory`` -> ``--output-dir``, ``--listen`` -> ``--host``, ``--port``, the
  ``custom_nodes`` folder of ``--extra-model-paths-config`` -> ``--custom-nodes``, ``--cache-lru N`` ->
  ``--cache lru:N``, ``--cache-none`` -> ``--cache none``, ``--cache-classic``/``--cpu`` -> Kiln's defaults),
  with a fresh ``--base-dir`` per start (ComfyUI starts with an empty history too), waits until the server
  answers (the suite only sleeps 4 s), and kills the whole process group when the fixture kills it;
- records every test's outcome (and a one-line reason) into a JSON-lines file the tool summarises. A test
  module that cannot be collected (it imports a ComfyUI-internal module) counts as one error; the rest run.

    python tools/comfy_conformance.py --suite /tmp/comfy-exec/tests/execution [--workers 0] [--json out.json]
    python tools/comfy_conformance.py --suite DIR -k test_lazy      # extra pytest arguments after the options

Standard library (plus pytest, and Kiln in the test process) only. One file (over 400 lines) because it is
both the command and the pytest plugin that command loads into the test process: the argument mapping, the
plugin hooks and the summary read the same names and environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_RESULTS = "KILN_CONFORMANCE_RESULTS"  # JSON-lines file the plugin appends outcomes to
ENV_WORK = "KILN_CONFORMANCE_WORK"  # the run's temporary folder (server base dirs and logs go there)
ENV_WORKERS = "KILN_CONFORMANCE_WORKERS"  # --workers for kiln serve ("" = Kiln's default)
ENV_PYTHONPATH = "KILN_CONFORMANCE_PYTHONPATH"  # PYTHONPATH as it was before the tool added its folders
ENV_READY_S = "KILN_CONFORMANCE_READY_S"  # how long to wait for a started server to answer
ENV_RECV_S = "KILN_CONFORMANCE_RECV_S"  # websocket receive timeout in the test process

COMFY_ENTRY = "main.py"


# --------------------------------------------------------------------------------------------------------
# ComfyUI's command line -> Kiln's


def _custom_nodes_from_yaml(path: Path) -> Path | None:
    """The ``custom_nodes`` folder an ``extra_model_paths.yaml`` names (relative to the file's folder, or to
    its section's ``base_path``), or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        import yaml

        data = yaml.safe_load(text) or {}
    except Exception:
        data = {}
        m = re.search(r"^\s*custom_nodes\s*:\s*(\S+)", text, re.M)
        if m:
            data = {"_": {"custom_nodes": m.group(1)}}
    for section in data.values() if isinstance(data, dict) else []:
        if not isinstance(section, dict) or not section.get("custom_nodes"):
            continue
        base = Path(str(section.get("base_path", path.parent)))
        if not base.is_absolute():
            base = path.parent / base
        first = str(section["custom_nodes"]).split("\n")[0].strip()
        return (base / first).resolve()
    return None


def translate_comfy_args(argv: list[str], cwd: Path) -> tuple[list[str], list[str]]:
    """Map ComfyUI ``main.py`` arguments to ``kiln serve`` arguments. Returns (kiln args, ignored args)."""
    out: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(argv):
        a = str(argv[i])
        val = str(argv[i + 1]) if i + 1 < len(argv) else ""
        if a == "--output-directory":
            out += ["--output-dir", str((cwd / val).resolve())]
            i += 2
        elif a == "--listen":
            out += ["--host", val or "127.0.0.1"]
            i += 2
        elif a == "--port":
            out += ["--port", val]
            i += 2
        elif a == "--extra-model-paths-config":
            cn = _custom_nodes_from_yaml(cwd / val)
            if cn is not None:
                out += ["--custom-nodes", str(cn)]
            i += 2
        elif a == "--cache-lru":
            n = int(val)
            if n > 0:  # ComfyUI: 0 means its classic cache
                out += ["--cache", f"lru:{n}"]
            i += 2
        elif a == "--cache-none":
            out += ["--cache", "none"]
            i += 1
        elif a in ("--cpu", "--cache-classic"):
            i += 1  # Kiln's defaults: no GPU needed for these nodes, keep-current cache
        else:
            ignored.append(a)
            i += 1
    return out, ignored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[Any], host: str, port: int, limit_s: float) -> bool:
    """True once ``/system_stats`` answers; False when the process exits or ``limit_s`` passes."""
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host.split(",")[0]
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/system_stats", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def _die_with_parent() -> None:
    """In a child before exec: be killed when the process that started it dies (Linux), so no server
    outlives a killed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_RealPopen = subprocess.Popen
_started: list[subprocess.Popen[Any]] = []


class KilnPopen(_RealPopen):
    """``subprocess.Popen`` that starts ``kiln serve`` where the caller asked for ComfyUI's ``main.py``; any
    other command runs unchanged."""

    def __init__(self, args: Any, *a: Any, **kw: Any) -> None:
        argv = [str(x) for x in args] if isinstance(args, (list, tuple)) else None
        entry = next((i for i, x in enumerate(argv or []) if Path(x).name == COMFY_ENTRY), None)
        if argv is None or entry is None:
            super().__init__(args, *a, **kw)
            return
        cwd = Path(kw.get("cwd") or os.getcwd())
        kiln_args, ignored = translate_comfy_args(argv[entry + 1 :], cwd)
        work = Path(os.environ.get(ENV_WORK) or tempfile.mkdtemp(prefix="kiln-conf-"))
        n = len(_started)
        base = work / f"server-{n}"
        base.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "kiln", "serve", *kiln_args, "--base-dir", str(base)]
        workers = os.environ.get(ENV_WORKERS, "")
        if workers:
            cmd += ["--workers", workers]
        env = dict(kw.pop("env", None) or os.environ)
        if env.get(ENV_PYTHONPATH) is not None:  # the server does not see the suite's folders
            env["PYTHONPATH"] = env[ENV_PYTHONPATH]
            if not env["PYTHONPATH"]:
                del env["PYTHONPATH"]
        log = open(base / "server.log", "wb")  # noqa: SIM115 (closed with the process)
        (base / "command.txt").write_text(" ".join(cmd) + ("\nignored: " + " ".join(ignored) if ignored else ""))
        kw.update(env=env, cwd=str(base), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        kw.setdefault("preexec_fn", _die_with_parent)
        super().__init__(cmd, *a, **kw)
        self._log = log
        _started.append(self)
        port = int(kiln_args[kiln_args.index("--port") + 1]) if "--port" in kiln_args else 8188
        host = kiln_args[kiln_args.index("--host") + 1] if "--host" in kiln_args else "127.0.0.1"
        if not _wait_ready(self, host, port, float(os.environ.get(ENV_READY_S, "180"))):
            print(f"[comfy_conformance] kiln serve did not answer on port {port}; see {base / 'server.log'}")

    def _kill_group(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                super().send_signal(sig)
        try:
            self.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def kill(self) -> None:
        if getattr(self, "_log", None) is None:
            return super().kill()
        self._kill_group(signal.SIGKILL)

    def terminate(self) -> None:
        if getattr(self, "_log", None) is None:
            return super().terminate()
        self._kill_group(signal.SIGTERM)


# --------------------------------------------------------------------------------------------------------
# pytest plugin (loaded in the test process with -p comfy_conformance)


def pytest_addoption(parser: Any) -> None:
    for name, kw in (
        ("--output_dir", {"action": "store", "default": "tests/inference/samples"}),
        ("--listen", {"type": str, "default": "127.0.0.1", "nargs": "?", "const": "0.0.0.0"}),
        ("--port", {"type": int, "default": 8188}),
        ("--skip-timing-checks", {"action": "store_true", "default": False}),
    ):
        try:
            parser.addoption(name, **kw)
        except ValueError:
            pass  # the suite's own conftest declares it


def pytest_configure(config: Any) -> None:
    import kiln.compat

    kiln.compat.install()
    recv_s = float(os.environ.get(ENV_RECV_S, "0") or 0)
    if recv_s > 0:
        try:
            import websocket

            websocket.setdefaulttimeout(recv_s)
        except ImportError:
            pass
    subprocess.Popen = KilnPopen  # type: ignore[misc]
    config.addinivalue_line("markers", "execution: ComfyUI execution test")
    config.addinivalue_line("markers", "inference: ComfyUI inference test")


def pytest_unconfigure(config: Any) -> None:
    subprocess.Popen = _RealPopen  # type: ignore[misc]
    for p in _started:
        p.kill()


def _plugin_fixtures() -> tuple[Any, Any]:
    import pytest

    @pytest.fixture(scope="session", autouse=True)
    def args_pytest(pytestconfig: Any) -> dict[str, Any]:
        args = {
            "output_dir": pytestconfig.getoption("output_dir"),
            "listen": pytestconfig.getoption("listen"),
            "port": pytestconfig.getoption("port"),
        }
        os.makedirs(args["output_dir"], exist_ok=True)
        return args

    @pytest.fixture(scope="session")
    def skip_timing_checks(pytestconfig: Any) -> bool:
        return bool(pytestconfig.getoption("skip_timing_checks"))

    return args_pytest, skip_timing_checks


if "pytest" in sys.modules and os.environ.get(ENV_RESULTS):  # only as the plugin of a conformance run
    args_pytest, skip_timing_checks = _plugin_fixtures()


def _reason(report: Any) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None:
        text = str(crash.message)
    elif isinstance(getattr(report, "longrepr", None), tuple):  # skips: (path, line, reason)
        text = str(report.longrepr[2])
    else:
        text = str(getattr(report, "longreprtext", "") or report.longrepr or "")
        text = text.strip().splitlines()[-1] if text.strip() else ""
    line = " ".join(text.split())
    return line[:300]


def _record(entry: dict[str, Any]) -> None:
    path = os.environ.get(ENV_RESULTS)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_runtest_logreport(report: Any) -> None:
    if report.when == "call" or report.outcome != "passed":
        _record({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "reason": _reason(report)})


def pytest_collectreport(report: Any) -> None:
    if report.outcome == "failed":
        _record({"nodeid": report.nodeid, "when": "collect", "outcome": "failed", "reason": _reason(report)})


# --------------------------------------------------------------------------------------------------------
# the tool


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per test id: passed, failed (the test body), error (setup/teardown/collection) or skipped."""
    status: dict[str, tuple[str, str]] = {}
    for e in entries:
        nid, when, outcome = e["nodeid"], e["when"], e["outcome"]
        if outcome == "skipped":
            kind = "skipped"
        elif outcome == "passed":
            kind = "passed"
        else:
            kind = "failed" if when == "call" else "error"
        prev = status.get(nid)
        # a test that failed and then errored in teardown counts once, as its first problem
        if prev is None or (prev[0] in ("passed", "skipped") and kind in ("failed", "error")):
            status[nid] = (kind, e.get("reason", ""))
    counts = {k: sum(1 for s, _ in status.values() if s == k) for k in ("passed", "failed", "error", "skipped")}
    failing = [{"id": nid, "outcome": s, "reason": r} for nid, (s, r) in status.items() if s in ("failed", "error")]
    return {
        "total": len(status),
        "passed": counts["passed"],
        "failed": counts["failed"],
        "errors": counts["error"],
        "skipped": counts["skipped"],
        "failing": failing,
    }


def _iter_tests(suite: Path) -> Iterator[Path]:
    yield from sorted(suite.glob("test_*.py"))


def run_suite(
    suite: Path,
    *,
    workers: str = "",
    pytest_args: list[str] | None = None,
    timeout_s: float = 3600,
    per_test_s: float = 300,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Copy the suite into a temporary ``tests/execution`` folder, run it with this plugin, return the summary."""
    suite = suite.resolve()
    if not suite.is_dir() or not any(_iter_tests(suite)):
        raise SystemExit(f"{suite}: no test_*.py files here (give the folder holding ComfyUI's tests/execution)")
    work = Path(tempfile.mkdtemp(prefix="kiln-conformance-")) if keep is None else keep.resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = work / "root"
    dest = root / "tests" / "execution"  # the suite imports itself as tests.execution.*
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(suite, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (work / "pytest.ini").write_text("[pytest]\naddopts =\n")
    results = work / "results.jsonl"
    results.unlink(missing_ok=True)
    env = dict(os.environ)
    env[ENV_PYTHONPATH] = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), str(Path(__file__).resolve().parent), env.get("PYTHONPATH")) if p
    )
    env[ENV_RESULTS] = str(results)
    env[ENV_WORK] = str(work)
    env[ENV_WORKERS] = workers
    env.setdefault(ENV_RECV_S, str(per_test_s))
    cmd = [
        sys.executable, "-m", "pytest", "-p", "comfy_conformance", "-p", "no:cacheprovider",
        "-c", str(work / "pytest.ini"), "--rootdir", str(root), "-q", "-rN", "--continue-on-collection-errors",
        "--output_dir", str(work / "output"), "--port", str(_free_port()),
    ]  # fmt: skip
    try:
        import pytest_timeout  # noqa: F401

        cmd += ["--timeout", str(int(per_test_s))]
    except ImportError:
        pass
    cmd += [str(p.relative_to(root)) for p in _iter_tests(dest)] + list(pytest_args or [])
    with open(work / "pytest.log", "wb") as log:
        proc = _RealPopen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    entries = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    summary = summarise(entries)
    summary.update(suite=str(suite), workers=workers or "default", pytest_rc=rc, work=str(work))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, type=Path, help="folder with ComfyUI's tests/execution files")
    ap.add_argument("--workers", default="", help="kiln serve --workers (default: Kiln's default)")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--keep", type=Path, help="run in this folder (kept: server logs, pytest.log)")
    ap.add_argument("--timeout", type=float, default=3600, help="limit for the whole run, seconds")
    ap.add_argument("--per-test", type=float, default=300, help="limit per test, seconds")
    args, extra = ap.parse_known_args(argv)
    s = run_suite(
        args.suite, workers=args.workers, pytest_args=extra, timeout_s=args.timeout, per_test_s=args.per_test,
        keep=args.keep,
    )  # fmt: skip
    print(
        f"total {s['total']}  passed {s['passed']}  failed {s['failed']}  errors {s['errors']}  skipped {s['skipped']}"
    )
    print(f"(kiln serve --workers {s['workers']}; logs in {s['work']})")
    for f in s["failing"]:
        print(f"  {f['outcome'].upper():6} {f['id']}: {f['reason']}")
    if args.json:
        args.json.write_text(json.dumps(s, indent=2) + "\n")
    return 0 if s["total"] and not s["failing"] else 1


if __name__ == "__main__":
    sys.exit(main())
