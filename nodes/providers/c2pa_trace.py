"""What ran to make a saver's images, read from the graph (the hidden PROMPT) for the C2PA manifest.

:func:`trace` walks upstream of the saver: samplers (seed, sampler, scheduler, steps, CFG, denoise, followed
through primitive nodes), model files (checkpoint, LoRAs, ControlNets, VAE; each with its SHA-256, cached by
mtime and size), provider nodes, the loaded images whose pixels were edited (``parents``: img2img, inpaint,
outpaint, provider edits) and those that only guided generation (``hints``: ControlNet and mask images).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
_MODEL_FILES = {  # loader class -> (input, folder kind, role)
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints", "checkpoint"),
    "CheckpointLoader": ("ckpt_name", "checkpoints", "checkpoint"),
    "ImageOnlyCheckpointLoader": ("ckpt_name", "checkpoints", "checkpoint"),
    "UNETLoader": ("unet_name", "diffusion_models", "checkpoint"),
    "LoraLoader": ("lora_name", "loras", "lora"),
    "LoraLoaderModelOnly": ("lora_name", "loras", "lora"),
    "ControlNetLoader": ("control_net_name", "controlnet", "controlnet"),
    "DiffControlNetLoader": ("control_net_name", "controlnet", "controlnet"),
    "VAELoader": ("vae_name", "vae", "vae"),
}
IMAGE_LOADERS = {"LoadImage", "LoadImageOutput", "LoadImageMask"}  # LoadImageMask: always an input, not a parent
_PARTIAL = {"VAEEncodeForInpaint", "SetLatentNoiseMask", "InpaintModelConditioning", "ImagePadForOutpaint"}
_PROVIDER_PREFIXES = ("OpenAI", "GoogleImagen", "Replicate")


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, stamp: tuple[int, int]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(p: Path) -> str | None:
    try:
        return _file_sha256(str(p), (p.stat().st_mtime_ns, p.stat().st_size))
    except OSError:
        return None


def graph_sha256(graph: dict | None) -> str | None:
    if not graph:
        return None
    text = json.dumps(graph, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def _literal(graph: dict, v: Any, depth: int = 0) -> Any:
    """A widget value, followed through primitive nodes (``["12", 0]`` -> that node's single value)."""
    if not _is_link(v):
        return v
    node = graph.get(str(v[0])) or {}
    values = [x for x in (node.get("inputs") or {}).values() if not _is_link(x)]
    if depth < 4 and len(node.get("inputs") or {}) == 1 and values:
        return values[0]
    if depth < 4 and "value" in (node.get("inputs") or {}):
        return _literal(graph, node["inputs"]["value"], depth + 1)
    return None


@dataclass
class Trace:
    """What the graph did to make the saver's images."""

    samplers: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    providers: list[dict] = field(default_factory=list)
    parents: list[dict] = field(default_factory=list)  # {"node", "path", "title"}: pixels edited
    hints: list[dict] = field(default_factory=list)  # ControlNet / reference images: inputs to generation
    partial: bool = False  # inpaint or outpaint: only part of the image regenerated


def _image_path(class_type: str, name: Any) -> Path | None:
    if not isinstance(name, str):
        return None
    try:
        from kiln.nodes.image import annotated_path, as_output_name

        return annotated_path(as_output_name(name) if class_type == "LoadImageOutput" else name)
    except Exception:
        return None


def trace(graph: dict | None, saver_id: str | None, folders: Any = None) -> Trace:
    """Walk upstream of the saver (or of every node, when it cannot be found) and record what ran."""
    t = Trace()
    if not graph:
        return t
    start = [str(saver_id)] if saver_id is not None and str(saver_id) in graph else []
    if not start:
        start = [k for k, n in graph.items() if str((n or {}).get("class_type", "")).startswith("Save")]
    seen: set[str] = set()
    # (node id, reached through a hint input, reached through a sampler/provider (pixels regenerated))
    queue: collections.deque[tuple[str, bool]] = collections.deque((s, False) for s in start)
    while queue:
        nid, hint = queue.popleft()
        if nid in seen:
            continue
        seen.add(nid)
        node = graph.get(nid) or {}
        ct = str(node.get("class_type", ""))
        inputs = node.get("inputs") or {}
        _record(t, graph, nid, ct, inputs, hint, folders)
        for name, v in inputs.items():
            if _is_link(v):
                via_hint = hint or ("ControlNet" in ct and name in ("image", "hint")) or name.startswith("clip_vision")
                queue.append((str(v[0]), via_hint))
    return t


def _record(t: Trace, graph: dict, nid: str, ct: str, inputs: dict, hint: bool, folders: Any) -> None:
    if ct in SAMPLERS:
        s = {"node": nid, "class": ct}
        for k in ("seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"):
            if k in inputs:
                s[k] = _literal(graph, inputs[k])
        for k, src_class, src_key in (
            ("noise", "RandomNoise", "noise_seed"),
            ("sampler", "KSamplerSelect", "sampler_name"),
        ):
            v = inputs.get(k)
            if _is_link(v) and (graph.get(str(v[0])) or {}).get("class_type") == src_class:
                s[src_key] = _literal(graph, (graph[str(v[0])].get("inputs") or {}).get(src_key))
        t.samplers.append(s)
    elif ct in _MODEL_FILES:
        key, kind, role = _MODEL_FILES[ct]
        name = _literal(graph, inputs.get(key))
        m: dict[str, Any] = {"role": role, "name": name, "loader": ct}
        if folders is not None and isinstance(name, str):
            try:
                p = folders.find_model(kind, name)
            except Exception:
                p = None
            if p is not None and p.is_file():
                m["sha256"] = file_sha256(p)
        for k in ("strength_model", "strength_clip"):
            if k in inputs and not _is_link(inputs[k]):
                m[k] = inputs[k]
        t.models.append(m)
    elif ct in IMAGE_LOADERS:
        name = _literal(graph, inputs.get("image"))
        entry = {"node": nid, "title": str(name), "path": _image_path(ct, name)}
        (t.hints if hint or ct == "LoadImageMask" else t.parents).append(entry)
    elif ct.startswith(_PROVIDER_PREFIXES):
        p = {"node": nid, "class": ct}
        for k in ("model", "model_override", "endpoint"):
            if k in inputs and not _is_link(inputs[k]):
                p[k] = inputs[k]
        p["edit"] = any(_is_link(inputs.get(k)) for k in ("image", "image_2", "image_3", "input_image"))
        p["mask"] = _is_link(inputs.get("mask"))
        t.providers.append(p)
    if ct in _PARTIAL:
        t.partial = True
