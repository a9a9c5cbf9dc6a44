"""Fixtures: a fake OpenAI-compatible server, a moto S3 server, a Kiln config, and a graph runner.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kiln import engine, nodes
from tests.conftest import SAFETY_S, die_with_parent, wait_for
from tests.providers.fake_providers import FakeProviders

API_KEY = "sk-test-kiln-secret-7f3a9c"


@pytest.fixture(scope="session")
def fake_providers():
    srv = FakeProviders(api_key=API_KEY).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def openai_server(fake_providers, kiln_config):
    fake_providers.reset()
    yield fake_providers
    fake_providers.reset()


def write_config(path: Path, base_url: str, extra: str = "", timeout_s: float = 120.0, attempts: int = 3) -> Path:
    """A config for the fake providers. The request timeout is generous (a loaded machine renders the fake
    images slowly; a short one made a healthy call time out and retry); the tests of timeouts pass their own.
    The retry budget (30 s) is shorter than the 60 s Retry-After the give-up test sends."""
    path.write_text(
        "providers:\n"
        "  openai:\n"
        f"    base_url: {base_url}\n"
        "    api_key_env: KILN_TEST_OPENAI_KEY\n"
        f"    timeout_s: {timeout_s}\n"
        f"    retries: {{max_attempts: {attempts}, budget_s: 30, base_delay_s: 0.01, max_delay_s: 0.3}}\n"
        "  replicate:\n"
        f"    base_url: {base_url.removesuffix('/v1')}/replicate/v1\n"
        "    api_key_env: KILN_TEST_OPENAI_KEY\n"
        f"    timeout_s: {timeout_s}\n"
        "    retries: {max_attempts: 3, budget_s: 30, base_delay_s: 0.01, max_delay_s: 0.3}\n"
        "  google:\n"
        f"    base_url: {base_url.removesuffix('/v1')}/google/v1beta\n"
        "    api_key_env: KILN_TEST_OPENAI_KEY\n"
        f"    timeout_s: {timeout_s}\n"
        "    retries: {max_attempts: 3, budget_s: 30, base_delay_s: 0.01, max_delay_s: 0.3}\n" + extra,
        encoding="utf-8",
    )
    return path


@pytest.fixture()
def kiln_config(tmp_path, monkeypatch, fake_providers):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("KILN_TEST_OPENAI_KEY", API_KEY)
    monkeypatch.setenv("KILN_ALLOW_PRIVATE_URLS", "1")
    cfg = write_config(tmp_path / "kiln.yaml", fake_providers.base_url)
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    return cfg


@pytest.fixture()
def registry():
    reg = engine.Registry()
    nodes.register_builtin(reg)
    assert not reg.load_errors, reg.load_errors
    return reg


@pytest.fixture()
def executor(registry, tmp_path):
    return engine.Executor(registry, folders=engine.Folders(tmp_path))


class Runner:
    def __init__(self, ex: engine.Executor):
        self.ex = ex
        self.events: list = []

    def __call__(self, graph: dict, **extra_data):
        self.events = []
        return self.ex.run(engine.Graph.from_json(graph), sink=self.events.append, extra_data=extra_data)


@pytest.fixture()
def run_graph(executor):
    return Runner(executor)


# -- S3 ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_answers(proc: subprocess.Popen, url: str) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"moto server exited with {proc.returncode}")
    try:
        urllib.request.urlopen(url + "/moto-api/", timeout=SAFETY_S)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory):
    """A moto S3 server subprocess: ready when it answers (no start-up deadline), killed at the end and with
    the test process. Another process can take the port between choosing it and moto binding it: then moto
    exits and a new port is tried."""
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret-key")
    cwd = tmp_path_factory.mktemp("moto")
    proc = None
    try:
        for attempt in range(5):
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                preexec_fn=die_with_parent,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for(lambda p=proc, u=url: _moto_answers(p, u), "the moto server to answer", every=0.1)
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(SAFETY_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture()
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture()
def s3(moto_url, aws_env, request):
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=moto_url, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )
    import hashlib

    bucket = "kiln-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client
