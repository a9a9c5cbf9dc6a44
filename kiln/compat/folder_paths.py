"""ComfyUI's ``folder_paths`` module, answered from Kiln's folders.

Every call reads the Folders active now (the running executor's, else those under ``KILN_BASE_DIR`` or
the current directory: :func:`kiln.engine.get_folders`), so a pack sees the same files Kiln's own nodes do.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from kiln.engine import get_folders
from kiln.engine.folders import UnsafePath, safe_join

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
_extensions: dict[str, set[str]] = {}  # kinds a pack registered with its own extensions


def _f() -> Any:
    return get_folders()


def _exts(kind: str) -> set[str]:
    return _extensions.get(kind, supported_pt_extensions)


class _FolderMap(MutableMapping):
    """``folder_names_and_paths``: kind -> ([folders], {extensions}), read from and written to the Folders."""

    def __getitem__(self, kind: str) -> tuple[list[str], set[str]]:
        f = _f()
        if kind not in f.models and kind not in _extensions:
            raise KeyError(kind)
        return [str(p) for p in f.model_dirs(kind)], _exts(kind)

    def __setitem__(self, kind: str, value: Any) -> None:
        paths, exts = (value[0], value[1]) if isinstance(value, (tuple, list)) and len(value) == 2 else (value, None)
        f = _f()
        f.models[kind] = []
        for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            f.add_model_path(kind, p)
        if exts is not None:
            _extensions[kind] = set(exts)

    def __delitem__(self, kind: str) -> None:
        _f().models.pop(kind, None)
        _extensions.pop(kind, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_f().models))

    def __len__(self) -> int:
        return len(_f().models)


folder_names_and_paths = _FolderMap()


def __getattr__(name: str) -> Any:
    f = _f()
    dynamic = {
        "base_path": lambda: str(f.base_dir),
        "models_dir": lambda: str(f.model_dirs("checkpoints")[0].parent),
        "output_directory": lambda: str(f.output_dir),
        "temp_directory": lambda: str(f.temp_dir),
        "input_directory": lambda: str(f.input_dir),
        "user_directory": lambda: str(f.base_dir / "user"),
    }
    if name in dynamic:
        return dynamic[name]()
    raise AttributeError(f"module 'folder_paths' has no attribute {name!r}")


def get_output_directory() -> str:
    return str(_f().output_dir)


def get_temp_directory() -> str:
    return str(_f().temp_dir)


def get_input_directory() -> str:
    return str(_f().input_dir)


def get_user_directory() -> str:
    return str(_f().base_dir / "user")


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": get_output_directory, "temp": get_temp_directory, "input": get_input_directory}.get(
        type_name, lambda: None
    )()


def get_folder_paths(folder_name: str) -> list[str]:
    return [str(p) for p in _f().model_dirs(folder_name)]


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    _f().add_model_path(folder_name, full_folder_path, first=is_default)


def get_filename_list(folder_name: str) -> list[str]:
    return _f().list_models(folder_name, _exts(folder_name))


def get_full_path(folder_name: str, filename: str) -> str | None:
    p = _f().find_model(folder_name, filename)
    return str(p) if p is not None and p.is_file() else None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    p = get_full_path(folder_name, filename)
    if p is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return p


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """``"cat.png [output]"`` -> ``("cat.png", <output folder>)``; no annotation -> ``(name, None)``."""
    for kind in ("output", "input", "temp"):
        tag = f" [{kind}]"
        if name.endswith(tag):
            return name[: -len(tag)], get_directory_by_type(kind)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base = annotated_filepath(name)
    base = base or default_dir or get_input_directory()
    try:
        return str(safe_join(base, name))
    except UnsafePath:
        raise ValueError(f"{name!r} leaves its folder") from None


def exists_annotated_filepath(name: str) -> bool:
    try:
        return os.path.exists(get_annotated_filepath(name))
    except ValueError:
        return False


def get_save_image_path(
    filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
) -> tuple[str, str, int, str, str]:
    """(folder, file name base, next counter, subfolder, prefix) for ``<base>_<NNNNN>_.<ext>`` files."""
    from kiln.nodes.image import expand_prefix

    filename_prefix = expand_prefix(filename_prefix, image_width, image_height)
    subfolder, _, filename = filename_prefix.replace("\\", "/").rpartition("/")
    try:
        folder = safe_join(output_dir, subfolder) if subfolder else Path(output_dir).resolve()
    except UnsafePath:
        raise ValueError(
            f"Saving image outside the output folder is not allowed (filename_prefix {filename_prefix!r})"
        ) from None
    counter = 1
    if folder.is_dir():
        stem = filename + "_"
        for f in os.listdir(folder):
            if f.startswith(stem):
                digits = f[len(stem) :].split("_", 1)[0]
                if digits.isdigit():
                    counter = max(counter, int(digits) + 1)
    return str(folder), filename, counter, subfolder, filename_prefix


def filter_files_extensions(files: Iterable[str], extensions: Iterable[str]) -> list[str]:
    exts = {e.lower() for e in extensions}
    return sorted(f for f in files if not exts or os.path.splitext(f)[1].lower() in exts)


def filter_files_content_types(files: Iterable[str], content_types: Iterable[str]) -> list[str]:
    """Files whose guessed MIME type is one of ``content_types`` ("image", "video", "audio", "model")."""
    wanted = set(content_types)
    out = []
    for f in files:
        ext = os.path.splitext(f)[1].lower()
        mime = mimetypes.guess_type(f, strict=False)[0] or ""
        kind = "model" if ext in supported_pt_extensions else mime.split("/", 1)[0]
        if kind in wanted:
            out.append(f)
    return out


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None) -> tuple[list[str], dict]:
    skip = set(excluded_dir_names or [])
    found: list[str] = []
    dirs: dict[str, float] = {}
    if not os.path.isdir(directory):
        return found, dirs
    for root, subdirs, files in os.walk(directory, followlinks=True):
        subdirs[:] = [d for d in subdirs if d not in skip]
        dirs[root] = os.path.getmtime(root)
        found += [os.path.relpath(os.path.join(root, f), directory) for f in files]
    return found, dirs
