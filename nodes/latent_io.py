"""SaveLatent / LoadLatent: latents as files in ComfyUI's ``.latent`` format.

A ``.latent`` file is safetensors with the samples under ``latent_tensor`` and an empty marker tensor
``latent_format_version_0``; the graph goes in the safetensors metadata (``prompt`` and one entry per
``extra_pnginfo`` key, JSON), as ComfyUI writes it. Files without the marker come from ComfyUI's first
format, which stored unscaled latents: they are multiplied by 1 / 0.18215 on load, as ComfyUI does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import torch
from safetensors.torch import load_file, save

from kiln import engine
from kiln.engine import Combo, Hidden, NodeError, NodeResult, Socket, String, get_folders
from kiln.engine.folders import UnsafePath
from kiln.nodes.image import annotated_path, expand_prefix
from kiln.nodes.latent import check_latent
from kiln.nodes.outputs import write_output

VERSION_KEY = "latent_format_version_0"
LEGACY_SCALE = 1.0 / 0.18215


def _latent_files() -> list[str]:
    """The ``.latent`` files directly in the input folder (ComfyUI lists no subfolders here)."""
    root = get_folders().input_dir
    if not root.is_dir():
        return []
    return sorted(f.name for f in root.iterdir() if f.is_file() and f.name.endswith(".latent"))


def _output_folder(prefix: str) -> tuple[Path, str, str]:
    """(folder, subfolder, base name) for a filename_prefix inside the output folder."""
    folders = get_folders()
    prefix = expand_prefix(prefix, 0, 0)
    sub, _, base = prefix.replace("\\", "/").rpartition("/")
    if not base:
        raise NodeError("filename_prefix must end with a file name", input_name="filename_prefix")
    try:
        folder = folders.safe_path("output", sub) if sub else folders.dir_for("output")
    except UnsafePath as exc:
        raise NodeError(
            f"filename_prefix {prefix!r} would save outside the output folder ({exc})",
            input_name="filename_prefix",
            hint="use a relative prefix such as 'latents/cat'",
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    return folder, sub, base


def _names(folder: Path, base: str):
    """``<base>_<NNNNN>_.latent`` names from one past the highest number already in ``folder``."""
    pattern = re.compile(re.escape(base) + r"_(\d+)_\.latent$")
    counter = 1 + max((int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))), default=0)
    return (f"{base}_{n:05d}_.latent" for n in itertools.count(counter))


class SaveLatent(engine.Node):
    """Saves latents to the output folder as a .latent file (readable by ComfyUI), with the graph in its
    metadata."""

    display_name = "SaveLatent"
    category = "_for_testing"
    output_node = True

    def run(
        self,
        samples: Annotated[Any, Socket("LATENT")],
        filename_prefix: Annotated[
            str, String(tooltip="Prefix of the file name; may contain a subfolder (e.g. latents/cat)")
        ] = "latents/ComfyUI",
        prompt: Annotated[dict | None, Hidden("PROMPT")] = None,
        extra_pnginfo: Annotated[dict | None, Hidden("EXTRA_PNGINFO")] = None,
    ):
        s = check_latent(samples)
        folder, sub, base = _output_folder(filename_prefix)
        metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
        for k, v in (extra_pnginfo or {}).items():
            metadata[str(k)] = json.dumps(v)
        tensors = {"latent_tensor": s["samples"].detach().cpu().contiguous(), VERSION_KEY: torch.tensor([])}
        # the shared output writer: atomic, never over another file, journaled for re-runs after a crash
        name = write_output(folder, save(tensors, metadata=metadata), _names(folder, base))
        return NodeResult(ui={"latents": [{"filename": name, "subfolder": sub, "type": "output"}]})


class LoadLatent(engine.Node):
    """Loads a .latent file (ComfyUI's format) from the input folder."""

    display_name = "LoadLatent"
    category = "_for_testing"
    outputs = ("LATENT",)

    def run(self, latent: Annotated[str, Combo(_latent_files)]):
        try:
            path = annotated_path(latent)
            data = load_file(str(path), device="cpu")
        except (UnsafePath, FileNotFoundError):
            raise NodeError(
                f"latent file {latent!r} not found in the input folder",
                input_name="latent",
                hint="copy a .latent file (SaveLatent writes them to output/) into input/",
            ) from None
        except Exception as exc:
            raise NodeError(f"cannot read {latent!r} as a .latent file: {exc}", input_name="latent") from None
        if "latent_tensor" not in data:
            raise NodeError(f"{latent!r} holds no 'latent_tensor'", input_name="latent", hint="use a .latent file")
        samples = data["latent_tensor"].float()
        return {"samples": samples if VERSION_KEY in data else samples * LEGACY_SCALE}

    @classmethod
    def fingerprint(cls, latent: str) -> str:
        try:
            return hashlib.sha256(annotated_path(latent).read_bytes()).hexdigest()
        except Exception:
            return float("nan")  # type: ignore[return-value]

    @classmethod
    def validate(cls, latent: str) -> bool | str:
        try:
            p = annotated_path(latent)
        except UnsafePath as exc:
            return f"Invalid latent file: {latent} ({exc})"
        if not p.is_file():
            return f"Invalid latent file: {latent}"
        return True


NODES = [SaveLatent, LoadLatent]
