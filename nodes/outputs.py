"""Crash-safe output files, for every node that saves one.

:func:`write_output` writes the bytes under a hidden temporary name in the target folder and then moves the
file into place in one atomic step, never over another file: after a crash (even SIGKILL) a name holds the
complete file or nothing. When the run belongs to a server that keeps an output journal (the executor
service ``output_files``, see ``kiln.server.journal``), the target of each output (prompt id, node id, the
node's n-th output) is recorded before the move, so a re-run of the prompt after a crash writes that same
file again (atomically replacing the earlier attempt's copy) instead of adding a second one: exactly one
complete file per output.

    name = write_output(folder, png_bytes, (f"cat_{n:05d}_.png" for n in itertools.count(1)))
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.engine.context import current

JOURNAL = "output_files"  # the executor service a server installs (kiln.server.journal.SERVICE_NAME)
STORE = "output_store"  # object storage for a worker's outputs (kiln.workers.output_store.SERVICE)


def _journal() -> tuple[Any, Any]:
    """(journal, node context) when the running prompt is journaled, else (None, None)."""
    ctx = current()
    if ctx is None:
        return None, None
    journal = ctx.run.services.get(JOURNAL) if isinstance(ctx.run.services, dict) else None
    if journal is None or not journal.active(ctx.prompt_id):
        return None, None
    return journal, ctx


def temp_name(folder: Path, name: str) -> Path:
    """A hidden temporary name beside ``name`` (same folder, so the final move is a rename)."""
    return folder / f".{name}.{secrets.token_hex(6)}.tmp"


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _link_into_place(tmp: Path, target: Path) -> bool:
    """Move ``tmp`` to ``target`` unless ``target`` exists; False (and ``tmp`` removed) if it does."""
    try:
        os.link(tmp, target)  # atomic, and fails rather than overwrite
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    except OSError:  # a file system without hard links: check, then rename
        if target.exists() or target.is_symlink():
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, target)
        return True
    tmp.unlink(missing_ok=True)
    return True


def write_output(folder: Path, data: bytes, names: Iterable[str], journaled: bool = True) -> str:
    """Write ``data`` as the first name of ``names`` that is free in ``folder`` (atomically, never over
    another file) and return that name. ``folder`` must exist. See the module docstring for re-runs. When the
    run has an output store (a worker of ``kiln serve --output-store``), the file is also stored there.

    ``journaled=False`` skips the journal (and, in a worker, its round trip to the server before each file):
    for temporary previews, which a re-run may simply write again under a new name."""
    name = _write_output(folder, data, names, journaled)
    _store(folder, name, data)
    return name


def _store(folder: Path, name: str, data: bytes) -> None:
    ctx = current()
    if ctx is None or not isinstance(ctx.run.services, dict):
        return
    store = ctx.run.services.get(STORE)
    if store is None:
        return
    f = ctx.run.folders
    roots = {"output": f.output_dir, "temp": f.temp_dir} if f is not None else {}
    store.put_output(ctx.prompt_id, folder, name, data, roots)


def _write_output(folder: Path, data: bytes, names: Iterable[str], journaled: bool = True) -> str:
    journal, ctx = _journal() if journaled else (None, None)
    key = None
    if journal is not None:
        key = (ctx.prompt_id, ctx.node_id, journal.next_index(ctx.prompt_id, ctx.node_id))
        done = _rewrite_previous(journal, key, folder, data)
        if done is not None:
            return done
    for name in names:
        target = folder / name
        if target.exists() or target.is_symlink():
            continue
        tmp = temp_name(folder, name)
        if key is not None:
            journal.record(*key, str(target), str(tmp))  # committed before the file can appear
        try:
            _write(tmp, data)
            placed = _link_into_place(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if placed:
            return name
    raise FileExistsError(f"no free output name in {folder}")


def _rewrite_previous(journal: Any, key: tuple, folder: Path, data: bytes) -> str | None:
    """Write the output an earlier attempt recorded, under its recorded name; None if it cannot be reused."""
    previous = journal.previous(*key)
    if previous is None:
        return None
    path, old_tmp = Path(previous[0]), Path(previous[1])
    old_tmp.unlink(missing_ok=True)  # the earlier attempt died before moving it into place
    if os.path.realpath(path.parent) != os.path.realpath(folder) or (path.exists() and not path.is_file()):
        return None  # another folder this time (a changed prefix): a fresh name
    tmp = temp_name(folder, path.name)
    journal.record(*key, str(path), str(tmp))
    try:
        _write(tmp, data)
        if path.exists():
            os.replace(tmp, path)  # the earlier attempt's file: replaced whole, never two copies
        elif not _link_into_place(tmp, path):
            return None  # the name was taken meanwhile by something else
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.name
