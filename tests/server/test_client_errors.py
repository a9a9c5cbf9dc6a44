"""A prompt that fails on a server raises an ``ExecutionFailed`` from ``kiln.Client``, as one that fails in
this process does, so ``except kiln.ExecutionFailed`` handles both."""

from __future__ import annotations

import pytest
from srv_helpers import make_registry

import kiln
from kiln.client import Client, RunFailed

pytestmark = pytest.mark.timeout(600)

FAILING = {
    "1": {"class_type": "TConst", "inputs": {"value": 1}},
    "2": {"class_type": "TFail", "inputs": {"value": ["1", 0]}},
    "3": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
}


def test_remote_failure_is_an_execution_failed(live):
    s = live(registry=make_registry())
    with pytest.raises(kiln.ExecutionFailed) as exc:
        Client(s.url).run(FAILING)
    err = exc.value
    assert isinstance(err, RunFailed) and isinstance(err, kiln.KilnError)
    assert err.status == "error" and err.info["node_id"] == "2"
    assert err.error.node_id == "2" and err.error.message == err.info["exception_message"]  # typed, as locally
    assert "node 2" in str(err)


def test_client_errors_are_kiln_errors():
    assert issubclass(RunFailed, kiln.ExecutionFailed)
    assert issubclass(kiln.client.ServerError, kiln.KilnError)
    assert issubclass(kiln.AuthoringError, kiln.KilnError) and issubclass(kiln.AuthoringError, TypeError)
