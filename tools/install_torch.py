"""Install torch 2.13.0, choosing the build for this machine, and say which one was installed.

- ``KILN_TORCH=cpu``, ``cuda`` or an index URL overrides the choice; ``KILN_TORCH=skip`` installs nothing.
- Otherwise: the CUDA build (the package index's default torch) where an NVIDIA GPU answers ``nvidia-smi``,
  and the CPU build everywhere else: from PyTorch's CPU wheel index when it is reachable, else whatever the
  configured package index offers (on most indexes that is the CUDA build: the script says so).
- A torch 2.13.0 that is already installed is kept.

Run by ``make install`` and ``make install-dev`` before anything else, so pip never resolves torch itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def installed() -> str | None:
    code = "import torch, sys; sys.stdout.write(torch.__version__ + ' cuda=' + str(torch.version.cuda))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def has_nvidia_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/torch/", timeout=10) as resp:
            return resp.status < 400
    except Exception:
        return False


def pip(*args: str) -> int:
    cmd = [sys.executable, "-m", "pip", "install", "-q", f"torch=={VERSION}", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main() -> int:
    choice = os.environ.get("KILN_TORCH", "").strip()
    if choice == "skip":
        print("KILN_TORCH=skip: torch not installed by Kiln's set-up")
        return 0
    have = installed()
    if have and have.startswith(VERSION):
        print(f"torch {have} is already installed; keeping it")
        return 0
    if not choice:
        choice = "cuda" if has_nvidia_gpu() else "cpu"
        print(f"{'an NVIDIA GPU answers nvidia-smi' if choice == 'cuda' else 'no NVIDIA GPU found'}: {choice} build")
    if choice == "cuda":
        rc = pip()
    elif choice == "cpu":
        if reachable(CPU_INDEX):
            rc = pip("--index-url", CPU_INDEX)
        else:
            print(f"PyTorch's CPU index ({CPU_INDEX}) is not reachable: installing what the configured index offers")
            rc = pip()
    else:
        rc = pip("--index-url", choice)
    if rc != 0:
        return rc
    print(f"installed torch {installed()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
