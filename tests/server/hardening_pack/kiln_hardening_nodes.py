"""Nodes for the server hardening tests (loadable in-process or from a ``custom_nodes/`` folder)."""

from __future__ import annotations

import time
from typing import Annotated

from kiln.engine import Float, Node, NodeResult, Socket, String, current


class HSaveSlow(Node):
    """Saves its images through ``save_images`` (SaveImage's writer), then, on the first attempt only
    (``first.flag`` in the output folder), sleeps in progress ticks so a test can kill the server after the
    files appeared and before the prompt is finished."""

    output_node = True
    cacheable = False

    def run(
        self,
        images: Annotated[object, Socket("IMAGE")],
        filename_prefix: Annotated[str, String()] = "hardening/img",
        seconds: Annotated[float, Float(min=0, max=120)] = 30.0,
    ):
        from kiln.nodes.image import save_images

        ctx = current()
        results = save_images(images, filename_prefix, "output", None, None)
        flag = ctx.folders.output_dir / "first.flag"
        if not flag.exists():
            flag.write_text(ctx.prompt_id)
            steps = max(1, int(seconds * 20))
            for i in range(steps):
                time.sleep(seconds / steps)
                ctx.progress(i + 1, steps)
        return NodeResult(ui={"images": results})


class HNonFinite(Node):
    """An output node whose UI carries NaN and infinities (Kiln must still answer strict JSON)."""

    output_node = True
    cacheable = False

    def run(self):
        return NodeResult(ui={"values": [float("nan"), float("inf"), float("-inf"), 1.5]})


NODES = [HSaveSlow, HNonFinite]
