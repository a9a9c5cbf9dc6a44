"""Session fixture: one executor over the shipped models (see shipped_harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from shipped_harness import Shapes  # noqa: E402


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Shapes:
    torch.set_num_threads(1)
    return Shapes(tmp_path_factory.mktemp("shapes"))
