"""PreviewAny, with ComfyUI's name, input and behaviour: an output node that shows any value as text in the
editor (``ui.text``). Strings are shown as they are, numbers and booleans with ``str``, JSON-able values
(dicts, lists) as indented JSON, anything else (tensors, models) with ``str``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import torch

from kiln.engine import Node, NodeResult, Socket


def preview_text(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    try:
        return json.dumps(value, indent=4)
    except (TypeError, ValueError):
        pass
    saved = torch._tensor_str.PRINT_OPTS.edgeitems
    torch.set_printoptions(edgeitems=6)  # tensors (also inside lists) show a few more edge values, as ComfyUI
    try:
        return str(value)
    except Exception:
        return "source exists, but could not be serialized."
    finally:
        torch.set_printoptions(edgeitems=saved)


class PreviewAny(Node):
    """Show the connected value as text on the node."""

    display_name = "Preview Any"
    category = "utils"
    output_node = True

    def run(self, source: Annotated[Any, Socket("*")]) -> NodeResult:
        return NodeResult(ui={"text": [preview_text(source)]})


NODES = [PreviewAny]
