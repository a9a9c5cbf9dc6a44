"""Rules of docs/ARCHITECTURE.md that a machine can check.

- Every exception class Kiln defines derives from ``kiln.engine.errors.KilnError``.
- engine/ speaks neither ComfyUI's wire format nor the providers' (costs, billing, vendors): it emits neutral
  typed events and errors, and the server, the CLI and the nodes give them those meanings.
- Only ``kiln`` is installed: no top-level ``engine``, ``nodes``, ``server`` or ``training``; and
  ``import kiln.engine`` stays light.

Each check runs in a fresh interpreter, so what it imports cannot leak into other tests (or from them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kiln", "kiln.engine", "kiln.nodes", "kiln.server", "kiln.training", "kiln.workers")


def _python(code: str, cwd: Path, timeout: float = 300) -> str:
    """Run ``code`` in a fresh interpreter in ``cwd``, without PYTHONPATH (so only what is installed counts)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"the check itself failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# -- (a) one exception hierarchy -------------------------------------------------------------------------------
_COLLECT_EXCEPTIONS = r"""
import importlib, json, pkgutil, sys

from kiln.engine.errors import KilnError

modules, skipped, broken = {}, [], []

def load(name):
    if name in modules:
        return True
    try:
        modules[name] = importlib.import_module(name)
        return True
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing != "kiln":  # an optional extra (openai, boto3, peft, ...) is not installed
            skipped.append(f"{name} (needs {exc.name or exc})")
        else:
            broken.append(f"{name}: {type(exc).__name__}: {exc}")
    except Exception as exc:
        broken.append(f"{name}: {type(exc).__name__}: {exc}")
    return False

for pkg_name in PACKAGES:
    if not load(pkg_name):
        continue
    pkg = sys.modules[pkg_name]
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + ".", onerror=lambda name: None):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # kiln/__main__.py runs the CLI
            load(info.name)

offenders = set()
for mod in modules.values():
    for obj in list(vars(mod).values()):
        if (isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__.startswith("kiln")
                and not issubclass(obj, KilnError)):
            bases = ", ".join(b.__name__ for b in obj.__bases__)
            offenders.add(f"{obj.__module__}.{obj.__qualname__} (bases: {bases})")
print(json.dumps({"offenders": sorted(offenders), "skipped": skipped, "broken": broken,
                  "modules": len(modules)}))
"""


def test_every_exception_derives_from_kiln_error(tmp_path):
    code = f"PACKAGES = {list(PACKAGES)!r}\n" + _COLLECT_EXCEPTIONS
    found = json.loads(_python(code, tmp_path).strip().splitlines()[-1])
    assert found["modules"] > 20, found
    assert not found["broken"], "modules that failed to import:\n  " + "\n  ".join(found["broken"])
    assert not found["offenders"], (
        "exception classes that do not derive from kiln.engine.errors.KilnError (give them KilnError as a base, "
        "keeping a builtin base beside it where callers catch that):\n  " + "\n  ".join(found["offenders"])
    )


# -- (b) engine/ has no wire format and no provider terms ----------------------------------------------------
# ComfyUI's message and field names belong in server/protocol.py and server/event_router.py; costs and vendors
# belong to nodes/providers. Matched case-insensitively, as whole words where letters border them
# (underscores and digits separate words, so `_record_cost` and `cost_usd` are caught; `thousand` is not).
WIRE_NAMES = (
    "comfy_type",
    "comfy_data",
    "to_comfy",
    "node_errors",
    "extra_info",
    "exception_message",
    "current_inputs",
    "execution_start",
    "execution_cached",
    "execution_success",
    "execution_error",
    "execution_interrupted",
    "progress_state",
)
PROVIDER_TERMS = ("record_cost", "total_cost", "usd", "billing")
_FORBIDDEN = re.compile(
    r"(?<![a-z])(?:" + "|".join(map(re.escape, WIRE_NAMES + PROVIDER_TERMS)) + r")(?![a-z])"
    r"|(?<![a-z])providers?(?![a-z])"  # provider, providers, provider_cost
    r"|(?<![a-z])openai",  # OpenAI, OpenAIImage, openai_client
    re.IGNORECASE,
)


def test_engine_has_no_wire_names_or_provider_terms():
    hits = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in _FORBIDDEN.finditer(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)!r} in {line.strip()[:100]}")
    assert not hits, (
        "engine/ must emit neutral events and errors (the server maps them to ComfyUI's messages; "
        "costs belong to nodes/providers):\n  " + "\n  ".join(hits)
    )


# -- (c) one installed namespace; a light core -------------------------------------------------------------
@pytest.mark.parametrize("name", ["engine", "nodes", "server", "training", "workers"])
def test_no_generic_top_level_package_is_installed(tmp_path, name):
    out = _python(f"import importlib.util; print(importlib.util.find_spec({name!r}))", tmp_path)
    assert out.strip() == "None", f"`import {name}` resolves outside the repository: {out.strip()}"


def test_import_kiln_engine_stays_light(tmp_path):
    heavy = ("torch", "aiohttp", "kiln.nodes", "kiln.server")
    out = _python(f"import sys, kiln.engine; print([m for m in {heavy!r} if m in sys.modules])", tmp_path)
    assert out.strip() == "[]", f"`import kiln.engine` imported {out.strip()}"
