"""Server settings, in one frozen object built by the CLI (``kiln serve``) or by tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kiln.engine import KilnError
from kiln.engine.net import is_loopback_host

DEFAULT_PORT = 8188
MB = 1024 * 1024

is_loopback = is_loopback_host  # the server's name for it (security.py and kiln.server export it)


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.front_end_root is not None:
            object.__setattr__(self, "front_end_root", Path(self.front_end_root))
        if self.on_crash not in ("rerun", "fail"):
            raise ValueError(f"on_crash must be 'rerun' or 'fail', not {self.on_crash!r}")
        if self.max_string_bytes < 1:
            raise ValueError(f"max_string_bytes must be at least 1, not {self.max_string_bytes}")
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
