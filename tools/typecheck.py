"""Type-check kiln.engine and kiln.server with mypy, as they are installed.

The build maps the repository's folders into one namespace (engine/ is ``kiln.engine``, server/ is
``kiln.server``, ...; see pyproject.toml), and mypy cannot follow that mapping: run on engine/ directly it
would call the package ``engine`` and fail on every ``from kiln.engine import ...``. So this script lays the
installed package out in a temporary directory, made of symlinks:

    <tmp>/kiln/<each entry of the repo's kiln/>  -> <repo>/kiln/<entry>
    <tmp>/kiln/engine                            -> <repo>/engine      (and server, nodes, training)

runs ``python -m mypy --config-file <repo>/pyproject.toml kiln/engine kiln/server`` there, prints mypy's
report with the paths written as repository paths (``kiln/engine/cache.py`` -> ``engine/cache.py``), then a
count of errors per package, and exits with mypy's status. Standard library only.

    python tools/typecheck.py              # extra arguments go to mypy, e.g. --no-incremental
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> where it lives in the installed package (pyproject.toml's [tool.setuptools.package-dir]).
MAPPED = {"engine": "kiln/engine", "server": "kiln/server", "nodes": "kiln/nodes", "training": "kiln/training"}
CHECKED = ("kiln/engine", "kiln/server")
_ERROR = re.compile(r"^(?P<path>[^:\s]+\.pyi?):\d+(?::\d+)?: error:")


def build_tree(tmp: Path) -> None:
    """The installed ``kiln`` package under ``tmp``, as symlinks into the repository."""
    pkg = tmp / "kiln"
    pkg.mkdir()
    for entry in sorted((ROOT / "kiln").iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for folder, installed in MAPPED.items():
        if (ROOT / folder).is_dir():
            (tmp / installed).symlink_to(ROOT / folder, target_is_directory=True)


def repo_path(path: str) -> str:
    """A path as mypy printed it (relative to the temporary tree) as a repository path."""
    path = path.replace(os.sep, "/")
    for folder, installed in MAPPED.items():
        if path == installed or path.startswith(installed + "/"):
            return folder + path[len(installed) :]
    return path


def map_paths(text: str) -> str:
    """Every ``kiln/engine/...``-style path at the start of a line, rewritten as a repository path."""
    out = []
    for line in text.splitlines(keepends=True):
        head, sep, rest = line.partition(":")
        out.append(repo_path(head) + sep + rest if sep and head.endswith((".py", ".pyi")) else line)
    return "".join(out)


def count_by_package(text: str) -> dict[str, int]:
    counts = {folder: 0 for folder in ("engine", "server")}
    for line in text.splitlines():
        m = _ERROR.match(line)
        if m:
            top = m.group("path").split("/", 1)[0]
            counts[top] = counts.get(top, 0) + 1
    return counts


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="kiln-typecheck-") as tmp_name:
        tmp = Path(tmp_name)
        build_tree(tmp)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            *argv,
            *CHECKED,
        ]
        env = {**os.environ, "MYPYPATH": ""}
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    report = map_paths(proc.stdout)
    sys.stdout.write(report)
    sys.stderr.write(map_paths(proc.stderr))
    counts = count_by_package(report)
    print("errors by package: " + ", ".join(f"{k}/ {v}" for k, v in counts.items()), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
