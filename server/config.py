"""Server settings, in one frozen object built by the CLI (``kiln serve``) or by tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.engine import KilnError
from kiln.engine.net import is_loopback_host

DEFAULT_PORT = 8188
MB = 1024 * 1024

is_loopback = is_loopback_host  # the server's name for it (security.py and kiln.server export it)

# Budgets refused before running (README, "Budgets"). A prompt may use this share of the machine's memory: the
# rest is for the server, the loaded models and the system, and the estimates are lower bounds (a model's
# activations are not in them). The image cap is kiln.nodes.image.DEFAULT_MAX_IMAGE_PIXELS (the server does
# not import node packs): 8192x8192, see there why.
PROMPT_MEMORY_FRACTION = 0.5
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


def machine_memory() -> int | None:
    """Bytes of memory this process can have: the machine's RAM, or its cgroup's limit when that is lower."""
    total: int | None = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60) and (total is None or int(text) < total):
            total = int(text)  # "max" (v2) or a huge number (v1) means no limit
        break
    return total


def default_prompt_memory() -> int | None:
    """The default ``max_prompt_memory``: PROMPT_MEMORY_FRACTION of :func:`machine_memory` (None: unknown)."""
    total = machine_memory()
    return int(total * PROMPT_MEMORY_FRACTION) if total else None


def parse_memory_limit(text: str) -> int | None:
    """``--max-prompt-memory``: a size such as ``8GiB``, ``8G`` (10**9 bytes, as ``--cache ram:SIZE``),
    ``512MiB`` or a byte count; ``0``/``off``/``none``: no limit (None). Raises ValueError."""
    from kiln.engine.cache import parse_size

    if text.strip().lower() in ("0", "off", "none"):
        return None
    size = parse_size(text)
    return size or None


class InsecureBind(KilnError, ValueError):
    """Listening beyond loopback was asked for without an auth token."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: Path("data"))
    auth_token: str | None = None
    # what happens to the prompt that was running when the server died: "rerun" or "fail"
    on_crash: str = "rerun"
    max_attempts: int = 3  # a prompt that crashed the server this many times is failed, not re-run again
    max_body_bytes: int = 64 * MB  # JSON request bodies (graphs)
    max_upload_bytes: int = 100 * MB
    max_ws_message_bytes: int = 64 * MB
    max_string_bytes: int = 1 * MB  # one string in a submission (an input, a title): longer ones are refused
    preview_method: str = "none"  # server default; a prompt may override with extra_data.preview_method
    # per-socket send queue: previews are dropped past preview_backlog queued messages; past max_queue
    # messages (or max_queue_bytes) droppable messages go, and if that is not enough the client is closed
    preview_backlog: int = 32
    max_queue: int = 4096
    max_queue_bytes: int = 64 * MB
    # a socket whose queue is over its bounds (after coalescing) and that has not taken any data for this
    # many seconds has stopped reading and is disconnected; a slow reader that keeps reading never is
    stall_timeout: float = 10.0
    late_delivery_window: float = 300.0  # a socket connecting gets its client's prompts finished this recently
    allowed_origins: tuple[str, ...] = ()
    history_limit: int | None = 10000  # like ComfyUI; None or 0 keeps every entry (they are on disk)
    webhook_timeout: float = 10.0
    # the editor served at "/": a built ComfyUI frontend (a folder with index.html); None serves a short page
    # that says how to install one (``kiln serve`` fills this in from the ``ui`` extra when it is installed)
    front_end_root: Path | None = None
    max_userdata_bytes: int = 32 * MB  # one file stored through /userdata (a workflow, a settings file)
    # a prompt whose estimated peak memory at some node is over this many bytes is refused at validation,
    # naming the node (None or 0: no limit); an uploaded image of more pixels than max_image_pixels is
    # refused before it is decoded (0: no cap of Kiln's own)
    max_prompt_memory: int | None = field(default_factory=default_prompt_memory)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # where prompts run: 0 = a thread of the server process (no isolation: for tests and embedding);
    # N >= 1 = N local worker processes built from ``worker_spec`` (a ``kiln.workers.WorkerSpec``)
    workers: int = 0
    worker_spec: Any = None
    interrupt_grace: float = 10.0  # seconds an interrupted worker gets to stop cooperatively before it is ended
    max_prompt_seconds: float = 0.0  # a prompt running longer is stopped and failed (0: no limit; workers only)
    # a prompt handed to a worker holds a lease in the store, renewed by the worker's heartbeats; a worker
    # silent this many seconds (frozen, wedged in native code, its machine unreachable) is ended and its
    # prompt re-run once elsewhere
    worker_lease: float = 30.0
    fair_share: bool = True  # clients take turns in the queue (False: strictly by number, like ComfyUI)
    affinity: bool = True  # prefer an idle worker that holds the prompt's model files (False: least recently used)
    # workers as Ray actors: the cluster's address ("auto": the one on this machine, else a new local instance),
    # how many actors, and each actor's Ray resources ({"num_cpus": 1, "num_gpus": 0})
    ray: str | None = None
    ray_workers: int = 2
    ray_options: dict = field(default_factory=dict)
    # workers' outputs in object storage (workers that do not share the server's disk): s3://bucket/prefix,
    # an S3-compatible endpoint (None: AWS), and how /view serves them: "stream" or "redirect" (presigned URL)
    output_store: str | None = None
    output_store_endpoint: str | None = None
    output_serve: str = "stream"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.front_end_root is not None:
            object.__setattr__(self, "front_end_root", Path(self.front_end_root))
        if self.on_crash not in ("rerun", "fail"):
            raise ValueError(f"on_crash must be 'rerun' or 'fail', not {self.on_crash!r}")
        if self.output_serve not in ("stream", "redirect"):
            raise ValueError(f"output_serve must be 'stream' or 'redirect', not {self.output_serve!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (in-process) or more, not {self.workers}")
        if not 0 <= self.interrupt_grace < float("inf") or not 0 <= self.max_prompt_seconds < float("inf"):
            raise ValueError("interrupt_grace and max_prompt_seconds must be finite seconds >= 0")
        if not 0.5 <= self.worker_lease < float("inf"):
            raise ValueError("worker_lease must be finite seconds >= 0.5")
        if self.max_string_bytes < 1:
            raise ValueError(f"max_string_bytes must be at least 1, not {self.max_string_bytes}")
        if (self.max_prompt_memory or 0) < 0 or self.max_image_pixels < 0:
            raise ValueError("max_prompt_memory and max_image_pixels must be >= 0 (0: no limit)")
        if not 0 <= self.late_delivery_window < float("inf"):
            raise ValueError(f"late_delivery_window must be finite seconds >= 0, not {self.late_delivery_window}")

    @property
    def userdata_dir(self) -> Path:
        """Where the editor's user files live (settings, saved workflows): ``DATA_DIR/userdata``."""
        return self.data_dir / "userdata"

    @property
    def upload_tmp_dir(self) -> Path:
        """Private folder for uploads in flight (emptied at start-up: only this server uses it)."""
        return self.data_dir / "tmp-uploads"

    @property
    def loopback(self) -> bool:
        return all(is_loopback(h) for h in self.host.split(","))

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without a token."""
        if not self.loopback and not self.auth_token:
            raise InsecureBind(
                f"Refusing to listen on {self.host}: anyone who can reach it could run graphs and read files. "
                f"Pass --auth-token TOKEN (or set KILN_AUTH_TOKEN), or bind 127.0.0.1."
            )


def token_from_env() -> str | None:
    return os.environ.get("KILN_AUTH_TOKEN") or None
