"""Compare Kiln's ``/object_info`` with ComfyUI's declared interface for the core classes Kiln provides.

The reference (``reference/comfyui-core-interface.json``) holds ComfyUI 0.3.64's published interface facts
(names, types, defaults, ranges, choices, outputs, categories, display names) for the classes listed in
``reference/core-nodes-in-scope.txt``. Descriptions and tooltips are Kiln's own and are not compared.

Run ``python tests/nodes/interface_diff.py [Class ...]`` to print the differences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "reference"

# Inputs whose choices are files found on the machine (they differ from one install to another).
FILE_LISTS = {
    "ckpt_name",
    "vae_name",
    "lora_name",
    "control_net_name",
    "image",
    "unet_name",
    "clip_name",
    "clip_name1",
    "clip_name2",
    "hypernetwork_name",
    "config_name",
    "model_path",
    "latent",
    "sampler_name",  # compared below, through KSampler's list
}
FILE_LIST_CLASSES_EXEMPT_SAMPLER = {"KSampler", "KSamplerAdvanced", "KSamplerSelect"}
TOP_LEVEL = ("category", "display_name", "output", "output_name", "output_is_list", "output_node", "input_order")

# Kiln's own optional inputs beyond ComfyUI's, each with a default so ComfyUI's graphs and clients never need
# them: (class, input) -> why.
KILN_EXTRAS = {
    ("SaveImage", "validate"): "checks the written file can be read back",
    ("SaveImage", "embed_provenance"): "provenance metadata in the written file",
    ("SaveImage", "generation_info"): "provenance from upstream provider nodes",
}


def scope() -> list[str]:
    names: list[str] = []
    for line in (HERE / "core-nodes-in-scope.txt").read_text().splitlines():
        names += line.split("#")[0].split()
    return names


def reference() -> dict[str, Any]:
    return json.loads((HERE / "comfyui-core-interface.json").read_text())


def _entry(e: Any) -> tuple[Any, dict]:
    if not isinstance(e, list) or not e:
        return e, {}
    return e[0], (e[1] if len(e) > 1 and isinstance(e[1], dict) else {})


def diff_class(name: str, ours: dict | None, ref: dict) -> list[str]:
    if ours is None:
        return [f"{name}: missing"]
    out = []
    ours = dict(ours)
    order = {}
    for sec, names in ours.get("input_order", {}).items():
        kept = [n for n in names if (name, n) not in KILN_EXTRAS]
        if kept or len(kept) == len(names):  # drop a section only when Kiln's extras were all it held
            order[sec] = kept
    ours["input_order"] = order
    for key in TOP_LEVEL:
        if key == "display_name" and ref.get(key) is None:
            continue  # ComfyUI declares none (its editor shows the class name); Kiln may give a readable one
        if ours.get(key) != ref.get(key):
            out.append(f"{name}.{key}: ours {ours.get(key)!r} != ComfyUI {ref.get(key)!r}")
    for section in ("required", "optional"):
        r_sec = ref["input"].get(section, {})
        o_sec = ours["input"].get(section, {})
        for iname, r_entry in r_sec.items():
            if iname not in o_sec:
                out.append(f"{name}.{section}.{iname}: missing")
                continue
            r_type, r_opts = _entry(r_entry)
            o_type, o_opts = _entry(o_sec[iname])
            is_files = iname in FILE_LISTS and not (
                iname == "sampler_name" and name in FILE_LIST_CLASSES_EXEMPT_SAMPLER
            )
            if isinstance(r_type, list):
                if not isinstance(o_type, list):
                    out.append(f"{name}.{iname}: ours type {o_type!r} is not a choice list")
                elif not is_files and o_type != r_type:
                    out.append(f"{name}.{iname}: choices ours {o_type!r} != ComfyUI {r_type!r}")
            elif o_type != r_type:
                out.append(f"{name}.{iname}: type ours {o_type!r} != ComfyUI {r_type!r}")
            for k, v in r_opts.items():
                if k not in o_opts or o_opts[k] != v or type(o_opts[k]) is not type(v):
                    out.append(f"{name}.{iname}.{k}: ours {o_opts.get(k, '<absent>')!r} != ComfyUI {v!r}")
        for iname in o_sec:
            if (name, iname) in KILN_EXTRAS:
                if section != "optional":
                    out.append(f"{name}.{iname}: Kiln's extra input must be optional")
            elif iname not in r_sec:
                out.append(f"{name}.{section}.{iname}: extra input (ComfyUI has none)")
    r_hidden = ref["input"].get("hidden", {})
    o_hidden = ours["input"].get("hidden", {})
    if r_hidden != o_hidden:
        out.append(f"{name}.hidden: ours {o_hidden!r} != ComfyUI {r_hidden!r}")
    return out


def diff(info: dict[str, Any], names: list[str] | None = None) -> list[str]:
    ref = reference()
    out: list[str] = []
    for name in names or scope():
        out += diff_class(name, info.get(name), ref[name])
    return out


def main(argv: list[str]) -> int:
    from kiln import nodes
    from kiln.engine import Registry

    reg = Registry()
    nodes.register_builtin(reg)
    for err in getattr(reg, "load_errors", []):
        print("load error:", err)
    problems = diff(reg.object_info(), argv or None)
    print("\n".join(problems))
    missing = sum(1 for p in problems if p.endswith(": missing") and p.count(".") == 0)
    print(f"{len(problems)} differences, {missing} classes missing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
