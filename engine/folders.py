"""Where inputs, outputs and models live: ComfyUI's folder layout, plus ``extra_model_paths.yaml``.

Layout under a base directory: ``models/<kind>/`` (checkpoints, loras, vae, controlnet, embeddings,
safety, ...), ``input/``, ``output/``, ``temp/``. Every path taken from a request goes through
:meth:`Folders.safe_path`, which refuses anything that would leave its folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import KilnError

MODEL_EXTENSIONS = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".pt2"})
MODEL_KINDS = (
    "checkpoints",
    "loras",
    "vae",
    "controlnet",
    "embeddings",
    "clip",
    "diffusion_models",
    "upscale_models",
    "safety",
    "configs",
    "clip_vision",
    "style_models",
    "hypernetworks",
    "gligen",
    "vae_approx",
    "photomaker",
    "text_encoders",
    "diffusers",
)
ALIASES = {"unet": "diffusion_models", "t2i_adapter": "controlnet", "clip": "text_encoders"}
# ComfyUI's older folder names, still searched after the current one (models/unet, models/clip).
LEGACY_DIRS = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}


class UnsafePath(KilnError, ValueError):
    """A file name from a request would leave its folder."""


class Folders:
    def __init__(
        self,
        base_dir: str | Path = ".",
        *,
        input_dir: str | Path | None = None,
        output_dir: str | Path | None = None,
        temp_dir: str | Path | None = None,
        models_dir: str | Path | None = None,
        extra_model_paths: Iterable[str | Path] = (),
    ):
        self.base_dir = Path(base_dir).resolve()
        self.input_dir = Path(input_dir or self.base_dir / "input").resolve()
        self.output_dir = Path(output_dir or self.base_dir / "output").resolve()
        self.temp_dir = Path(temp_dir or self.base_dir / "temp").resolve()
        models = Path(models_dir or self.base_dir / "models").resolve()
        self.models: dict[str, list[Path]] = {k: [models / k] for k in MODEL_KINDS}
        for kind, legacy in LEGACY_DIRS.items():
            self.models[kind] += [models / name for name in legacy]
        default_yaml = self.base_dir / "extra_model_paths.yaml"
        for y in [default_yaml, *extra_model_paths]:
            if Path(y).is_file():
                self.load_extra_model_paths(y)

    # -- model folders ------------------------------------------------------------------------------
    def add_model_path(self, kind: str, path: str | Path, first: bool = False) -> None:
        kind = ALIASES.get(kind, kind)
        paths = self.models.setdefault(kind, [])
        p = Path(path).expanduser().resolve()
        if p in paths:
            return
        paths.insert(0, p) if first else paths.append(p)

    def load_extra_model_paths(self, yaml_path: str | Path) -> None:
        """ComfyUI's ``extra_model_paths.yaml``: named sections with ``base_path`` and folder entries."""
        import yaml

        data = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        yaml_dir = Path(yaml_path).resolve().parent
        for section in data.values():
            if not isinstance(section, dict):
                continue
            base = section.get("base_path")
            base_p = Path(os.path.expandvars(str(base))).expanduser() if base else yaml_dir
            if not base_p.is_absolute():
                base_p = yaml_dir / base_p
            first = bool(section.get("is_default"))
            for kind, value in section.items():
                if kind in ("base_path", "is_default"):
                    continue
                for line in str(value).splitlines():
                    line = line.strip()
                    if line:
                        p = Path(os.path.expandvars(line)).expanduser()
                        self.add_model_path(kind, p if p.is_absolute() else base_p / p, first)

    def model_dirs(self, kind: str) -> list[Path]:
        return list(self.models.get(ALIASES.get(kind, kind), []))

    def list_models(
        self, kind: str, extensions: Iterable[str] = MODEL_EXTENSIONS, include_dirs: bool = False
    ) -> list[str]:
        """Files (relative names with '/') in a model kind's folders; diffusers folders if asked."""
        exts = {e.lower() for e in extensions}
        names: set[str] = set()
        for root in self.model_dirs(kind):
            if not root.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                d = Path(dirpath)
                if include_dirs and (d / "model_index.json").is_file() and d != root:
                    names.add(d.relative_to(root).as_posix())
                    dirnames[:] = []
                    continue
                dirnames[:] = [x for x in dirnames if not x.startswith(".")]
                for f in filenames:
                    if Path(f).suffix.lower() in exts:
                        names.add((d / f).relative_to(root).as_posix())
        return sorted(names)

    def find_model(self, kind: str, name: str) -> Path | None:
        for root in self.model_dirs(kind):
            try:
                p = safe_join(root, name, allow_links=True)
            except UnsafePath:
                return None
            if p.exists():
                return p
        return None

    # -- input / output / temp ----------------------------------------------------------------------
    def dir_for(self, type_: str) -> Path:
        if type_ == "output":
            return self.output_dir
        if type_ == "input":
            return self.input_dir
        if type_ == "temp":
            return self.temp_dir
        raise UnsafePath(f"unknown folder type {type_!r}; use input, output or temp")

    def safe_path(self, type_: str, filename: str, subfolder: str = "") -> Path:
        root = self.dir_for(type_)
        rel = f"{subfolder}/{filename}" if subfolder else filename
        return safe_join(root, rel)

    def list_inputs(
        self, extensions: Iterable[str] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    ) -> list[str]:
        exts = {e.lower() for e in extensions}
        root = self.input_dir
        if not root.is_dir():
            return []
        out = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for f in filenames:
                if Path(f).suffix.lower() in exts:
                    out.append((Path(dirpath) / f).relative_to(root).as_posix())
        return sorted(out)


def safe_join(root: str | Path, rel: str, allow_links: bool = False) -> Path:
    """``root / rel``, refusing absolute paths, ``..``, NUL bytes, backslashes and symlinks out of root.

    ``allow_links`` keeps only the checks on the name itself: for model folders, where users link
    files in from other disks (list_models follows links too, so what is listed can be found).
    """
    if not isinstance(rel, str) or "\0" in rel or "\\" in rel:
        raise UnsafePath(f"invalid file name {rel!r}")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePath(f"absolute paths are not allowed: {rel!r}")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(f"'..' is not allowed in {rel!r}")
    root_r = Path(root).resolve()
    p = root_r.joinpath(*parts) if parts else root_r
    if allow_links:
        return p
    real = p.resolve()
    if real != root_r and root_r not in real.parents:
        raise UnsafePath(f"{rel!r} leads outside its folder")
    return p


_default: Folders | None = None


def get_folders() -> Folders:
    """The running node's folders, else those of the executor validating now (``use_folders``), else
    folders under ``KILN_BASE_DIR`` or the current directory. Nothing sets a process-wide default: callers
    pass their folders to the executor or scope them with ``use_folders``."""
    from .context import active_folders

    f = active_folders()
    if f is not None:
        return f
    global _default
    if _default is None:
        _default = Folders(os.environ.get("KILN_BASE_DIR") or Path.cwd())
    return _default
