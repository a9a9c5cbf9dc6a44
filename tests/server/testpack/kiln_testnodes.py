"""A small node pack for server tests, loadable in-process or from a ``custom_nodes/`` folder.

No torch: constants, arithmetic, a sleeper that ticks progress, a failing node, preview emitters, and a
file writer that never overwrites (exclusive create) and records each completed run.
"""

from __future__ import annotations

import io
import os
import time
from typing import Annotated

from kiln.engine import ExecutionBlocker, Float, Int, Node, NodeResult, Preview, Socket, String, current


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 200, 10)).save(buf, "JPEG")
    return buf.getvalue()


class TConst(Node):
    outputs = ("INT",)

    def run(self, value: Annotated[int, Int(min=-1000000, max=1000000)] = 0):
        return value


class TAdd(Node):
    outputs = ("INT",)

    def run(self, a: Annotated[int, Socket("INT")], b: Annotated[int, Int()] = 1):
        return a + b


class TSleep(Node):
    """Sleeps ``seconds`` in ``steps`` progress ticks (each tick is a cancellation point)."""

    outputs = ("INT",)

    def run(
        self,
        value: Annotated[int, Socket("INT")],
        seconds: Annotated[float, Float(min=0, max=60)] = 0.1,
        steps: Annotated[int, Int(min=1, max=1000)] = 5,
    ):
        ctx = current()
        for i in range(steps):
            time.sleep(seconds / steps)
            ctx.progress(i + 1, steps)
        return value


class TShow(Node):
    output_node = True

    def run(self, value: Annotated[int, Socket("INT")]):
        return NodeResult(ui={"text": [str(value)]})


class TBlock(Node):
    """Blocks everything downstream with a message (ComfyUI's ExecutionBlocker): not fatal for the run."""

    outputs = ("INT",)

    def run(self, value: Annotated[int, Socket("INT")]):
        return ExecutionBlocker("blocked on purpose")


class TExit(Node):
    """Calls sys.exit inside a run: a hostile or buggy node must not take the server down."""

    outputs = ("INT",)

    def run(self, value: Annotated[int, Socket("INT")]):
        import sys

        sys.exit(3)


class TBigShow(Node):
    """An output node whose UI carries ``size`` bytes of text: a heavy ``executed`` message."""

    output_node = True
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], size: Annotated[int, Int(min=0, max=1 << 26)] = 1000):
        return NodeResult(ui={"text": ["x" * size]})


class TFail(Node):
    outputs = ("INT",)

    def run(self, value: Annotated[int, Socket("INT")], message: Annotated[str, String()] = "boom"):
        raise RuntimeError(message)


class TPreview(Node):
    """Ticks ``steps`` times with a JPEG preview (kind "preview": only for clients that asked)."""

    output_node = True

    def run(self, value: Annotated[int, Socket("INT")], steps: Annotated[int, Int(min=1, max=1000)] = 2):
        ctx = current()
        data = _jpeg()
        for i in range(steps):
            ctx.progress(i + 1, steps, Preview("JPEG", data, kind="preview"))
        return NodeResult(ui={"text": [str(value)]})


class TWsOut(Node):
    """Sends a PNG as an output frame (kind "output": always sent), like SaveImageWebsocket."""

    output_node = True
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")]):
        current().progress(1, 1, Preview("PNG", _png(), kind="output"))
        return NodeResult(ui={})


class TWriteFile(Node):
    """Writes ``<prefix>_<n>.txt`` in the output folder with exclusive create (never overwrites) and appends
    the prompt id to ``runs.log`` once the run of this node completed."""

    output_node = True
    cacheable = False

    def run(
        self,
        value: Annotated[int, Socket("INT")],
        prefix: Annotated[str, String()] = "out",
        seconds: Annotated[float, Float(min=0, max=60)] = 0.0,
    ):
        ctx = current()
        out = ctx.folders.output_dir
        out.mkdir(parents=True, exist_ok=True)
        steps = max(1, int(seconds * 20))
        for i in range(steps):
            time.sleep(seconds / steps)
            ctx.progress(i + 1, steps)
        n = 1
        while True:
            name = f"{prefix}_{n:05d}.txt"
            try:
                fd = os.open(out / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                n += 1
        with os.fdopen(fd, "w") as f:
            f.write(f"{ctx.prompt_id} {value}\n")
        with open(out / "runs.log", "a") as f:
            f.write(ctx.prompt_id + "\n")
        return NodeResult(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})


class TSecret(Node):
    """Reads the API key a client passed in extra_data (hidden input), so tests can check it never leaks."""

    output_node = True

    def run(self, value: Annotated[int, Socket("INT")]):
        key = current().extra_data.get("api_key_comfy_org")
        return NodeResult(ui={"text": ["has key" if key else "no key"]})


class TSay(Node):
    """Shows a line of status text per step (binary type 3 on the websocket)."""

    outputs = ("INT",)
    cacheable = False

    def run(self, value: Annotated[int, Socket("INT")], lines: Annotated[int, Int(min=1, max=100)] = 2):
        ctx = current()
        for i in range(lines):
            ctx.progress_text(f"step {i + 1} of {lines}")
        return value


NODES = [TSay, TConst, TAdd, TBigShow, TExit, TBlock, TSleep, TShow, TFail, TPreview, TWsOut, TWriteFile, TSecret]
