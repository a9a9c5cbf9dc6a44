"""The linter, the formatter and the type checker pass on the whole repository (config: pyproject.toml).

Fix what they report with ``ruff check --fix .`` and ``ruff format .``; type errors in engine/ and server/ are
listed by ``python tools/typecheck.py``. Skipped only where ruff or mypy is not installed (``pip install -e .[dev]``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    return [exe]


def _run(cmd: list[str], timeout: float = 300) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[-3:])} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_check():
    _run([*_ruff(), "check", "--no-cache", "--output-format", "concise", "."])


def test_ruff_format():
    _run([*_ruff(), "format", "--check", "--no-cache", "--output-format", "concise", "."])


def test_mypy_engine_and_server():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e .[dev])")
    _run([sys.executable, str(ROOT / "tools" / "typecheck.py")], timeout=600)
