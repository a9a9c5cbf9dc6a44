"""Fixtures: a fake OpenAI-compatible server, a moto S3 server, a Kiln config, and a graph runner.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kiln import engine, nodes
from tests.providers.fake_providers import FakeProviders

API_KEY = "sk-test-kiln-secret-7f3a9c"


@pytest.fixture(scope="session")
def fake_providers():
    srv = FakeProviders(api_key=API_KEY).start()
    yield srv
    srv.stop()


@pytest.fixture()
def openai_server(fake_providers, kiln_config):
    fake_providers.reset()
    yield fake_providers
    fake_providers.reset()


def write_config(path: Path, base_url: str, extra: str = "", timeout_s: float = 2.0, attempts: int = 3) -> Path:
    path.write_text(
        "providers:\n"
        "  openai:\n"
        f"    base_url: {base_url}\n"
        "    api_key_env: KILN_TEST_OPENAI_KEY\n"
        f"    timeout_s: {timeout_s}\n"
        f"    retries: {{max_attempts: {attempts}, budget_s: 5, base_delay_s: 0.01, max_delay_s: 0.3}}\n"
        "  replicate:\n"
        f"    base_url: {base_url.removesuffix('/v1')}/replicate/v1\n"
        "    api_key_env: KILN_TEST_OPENAI_KEY\n"
        f"    timeout_s: {timeout_s}\n"
        "    retries: {max_attempts: 3, budget_s: 5, base_delay_s: 0.01, max_delay_s: 0.3}\n"
        "  google:\n"
        f"    base_url: {base_url.removesuffix('/v1')}/google/v1beta\n"
        "    api_key_env: KILN_TEST_OPENAI_KEY\n"
        f"    timeout_s: {timeout_s}\n"
        "    retries: {max_attempts: 3, budget_s: 5, base_delay_s: 0.01, max_delay_s: 0.3}\n" + extra,
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


@pytest.fixture(scope="session")
def moto_url():
    port = _free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


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
