"""Session-wide test settings and the waiting helpers every suite shares.

Tests never race a fixed clock: they wait for a readiness signal (an event, a status, a log line), and
``SAFETY_S`` only bounds a wait so that a broken build fails instead of hanging; it is far longer than
anything a healthy run needs, even on a loaded machine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # engine-only environments
    pass

try:
    from hypothesis import HealthCheck, settings

    # no example database in the checkout: nothing written there, nothing shared between runs or processes;
    # how fast examples are generated depends on the machine's load, so it is not a health check here
    settings.register_profile("kiln-tests", database=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("kiln-tests")
except ImportError:
    pass

T = TypeVar("T")

# A user's own Kiln settings must not reach the tests (or the servers and CLIs they start): a token would lock
# the test servers, a base dir or config would point them at real folders, models and provider keys.
USER_SETTINGS = (
    "KILN_AUTH_TOKEN",
    "KILN_BASE_DIR",
    "KILN_CONFIG",
    "KILN_CUSTOM_NODES",
    "KILN_SERVER",
    "KILN_ALLOW_PRIVATE_URLS",
    "KILN_TRACEBACK",
)


@pytest.fixture(scope="session", autouse=True)
def _hypothesis_home_in_tmp(tmp_path_factory) -> Iterator[None]:
    """Hypothesis keeps a cache (``constants/``) in its home folder even without a database: in this run's
    temp folder, not ``.hypothesis/`` in the checkout."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        yield
        return
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)


@pytest.fixture(scope="session", autouse=True)
def _without_user_settings() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in USER_SETTINGS:
            mp.delenv(name, raising=False)
        yield


SAFETY_S = 300.0  # the bound of a wait for something that should happen: only reached when it is broken


def wait_for(cond: Callable[[], T], what: str, bound: float = SAFETY_S, every: float = 0.02) -> T:
    """Poll ``cond`` until it returns something truthy (returned); fail after ``bound`` seconds."""
    end = time.monotonic() + bound
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {bound:.0f} s waiting for {what}")
        time.sleep(every)


def die_with_parent() -> None:
    """In a child before exec (``preexec_fn``): be killed when the test process dies, so no server or helper
    process outlives a killed or timed-out run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
