"""Nodes that misbehave the way real ones do, for tests of worker processes (``kiln serve --workers``).

They end or exhaust the process they run in, so they load only from a ``custom_nodes/`` folder into a
``kiln serve`` subprocess, never into the test process. No torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Annotated

from kiln.engine import Int, Node, Socket, String

BOUND_S = 300.0  # a node that the test forgets to stop still ends


def _announce(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader who sees the file also sees its text: written beside it
    under a dot-name, then renamed (a test that waits for the file reads it the moment it appears)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _signal_self(sig: int, marker: str) -> None:
    """Send ``sig`` to this process: always, or only on the first attempt when ``marker`` names a file that
    the first attempt creates (holding its pid), so a re-run succeeds."""
    if not marker or not os.path.exists(marker):
        if marker:
            _announce(marker, str(os.getpid()))
        os.kill(os.getpid(), sig)


class WKill(Node):
    """SIGKILLs its own process: always, or only on the first attempt when ``marker`` names a file that
    the first attempt creates (so a re-run succeeds)."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], marker: Annotated[str, String()] = ""):
        _signal_self(signal.SIGKILL, marker)
        return value


class WSegfault(Node):
    """Reads address 0 from native code: a segmentation fault."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")]):
        ctypes.string_at(0)
        return value


class WHog(Node):
    """Allocates memory (and touches it) a chunk at a time until something stops it."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], chunk_mb: Annotated[int, Int(min=1)] = 16):
        held = []
        end = time.monotonic() + BOUND_S
        while time.monotonic() < end:
            held.append(b"\x01" * (chunk_mb * 1024 * 1024))
            time.sleep(0.002)
        return value


class WStubborn(Node):
    """Sleeps without ever checking for an interrupt (a node that ignores cooperative cancellation)."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], started: Annotated[str, String()] = ""):
        if started:
            _announce(started, str(os.getpid()))
        end = time.monotonic() + BOUND_S
        while time.monotonic() < end:
            time.sleep(0.05)
        return value


class WMeet(Node):
    """Writes ``dir/name`` and returns only once ``n`` files are in ``dir``: prompts that do not run at the same
    time never all arrive. Returns the id of the process it ran in."""

    outputs = ("INT",)
    cacheable = False

    def run(
        self,
        folder: Annotated[str, String()],
        name: Annotated[str, String()],
        n: Annotated[int, Int(min=1)] = 2,
    ):
        Path(folder).mkdir(parents=True, exist_ok=True)
        _announce(Path(folder) / name, str(os.getpid()))
        end = time.monotonic() + BOUND_S
        while len([f for f in Path(folder).iterdir() if not f.name.startswith(".")]) < n:
            if time.monotonic() > end:
                raise RuntimeError("the other prompts never ran at the same time")
            time.sleep(0.01)
        return os.getpid()


class WFreeze(Node):
    """Stops its own process (SIGSTOP: every thread, the heartbeat's too), as a process wedged in native code
    or a machine cut off would look to the server; only on the first attempt when ``marker`` names a file
    the first attempt creates."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], marker: Annotated[str, String()] = ""):
        _signal_self(signal.SIGSTOP, marker)
        return value


class WFakeLoader(Node):
    """Stands in for a checkpoint loader: names a model file (``ckpt_name``), returns its process id."""

    outputs = ("INT",)
    cacheable = False

    def run(self, ckpt_name: Annotated[str, String()]):
        return os.getpid()


class WChecked(Node):
    """Its own validation appends the validating process's id to the file ``log`` names; it returns the id of
    the process that runs it."""

    outputs = ("INT",)
    cacheable = False

    @classmethod
    def validate(cls, log):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return True

    def run(self, log: Annotated[str, String()]):
        return os.getpid()


NODES = [WKill, WSegfault, WHog, WStubborn, WMeet, WFreeze, WFakeLoader, WChecked]
