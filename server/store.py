"""Durable queue, history and per-prompt event log in one SQLite file (WAL mode).

One row per accepted prompt carries its whole life: pending -> running -> success | error | interrupted.
A prompt is written (and committed) before ``POST /prompt`` answers, so an accepted prompt survives any
crash. Finishing a prompt writes its history entry, status and last events in one transaction, so a
prompt is either finished (and never run again) or not. Events are buffered and written in batches;
:meth:`Store.flush` runs before anything reads them.

All methods are called from the event loop thread. With ``synchronous=NORMAL`` in WAL mode a commit
survives the process being killed (SIGKILL); only a power loss can lose the last commits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine import KilnError

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY,
    number REAL NOT NULL,
    status TEXT NOT NULL,
    client_id TEXT,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    history TEXT,
    history_order INTEGER,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS prompts_status ON prompts(status);
CREATE INDEX IF NOT EXISTS prompts_history ON prompts(history_order);
CREATE TABLE IF NOT EXISTS events (
    prompt_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (prompt_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frames (
    prompt_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    node TEXT,
    format TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (prompt_id, seq)
);
"""

FINISHED = ("success", "error", "interrupted")


class StoreLocked(KilnError, RuntimeError):
    """Another server process is using this data directory."""


@dataclass
class PromptRow:
    prompt_id: str
    number: float
    status: str
    client_id: str | None
    prompt: dict
    extra_data: dict
    outputs_to_execute: list
    body_hash: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    history: dict | None
    last_seq: int

    @property
    def queue_item(self) -> list:
        """ComfyUI's 5-element queue item."""
        return [json_number(self.number), self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


def json_number(n: float) -> float | int:
    """A queue number as ComfyUI writes it: an int when it is whole (numbers are stored as REAL)."""
    return int(n) if float(n).is_integer() else n


_COLS = (
    "prompt_id, number, status, client_id, prompt, extra_data, outputs_to_execute, body_hash, created, "
    "started, finished, attempts, history, last_seq"
)


def _row(r: tuple) -> PromptRow:
    return PromptRow(
        r[0],
        r[1],
        r[2],
        r[3],
        json.loads(r[4]),
        json.loads(r[5]),
        json.loads(r[6]),
        r[7],
        r[8],
        r[9],
        r[10],
        r[11],
        json.loads(r[12]) if r[12] else None,
        r[13],
    )


class Store:
    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_dir(self.dir)  # two servers on one queue would run its prompts twice
        self.path = self.dir / "kiln.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self._pending_events: list[tuple[str, int, str, str]] = []
        self._pending_frames: list[tuple[str, int, str, str, bytes]] = []
        row = self.db.execute("SELECT MAX(history_order) FROM prompts").fetchone()
        self._history_order = row[0] or 0

    def close(self) -> None:
        self.flush()
        self.db.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the lock (the kernel also does when the process dies)
            self._lock = None

    # -- writes -------------------------------------------------------------------------------------
    def add(
        self,
        prompt_id: str,
        number: float,
        client_id: str | None,
        prompt: dict,
        extra_data: dict,
        outputs: list,
        body_hash: str,
    ) -> None:
        self.db.execute(
            "INSERT INTO prompts (prompt_id, number, status, client_id, prompt, extra_data, outputs_to_execute, "
            "body_hash, created) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
            (
                prompt_id,
                number,
                client_id,
                json.dumps(prompt),
                json.dumps(extra_data),
                json.dumps(outputs),
                body_hash,
                time.time(),
            ),
        )

    def mark_running(self, prompt_id: str) -> None:
        self.db.execute(
            "UPDATE prompts SET status='running', started=?, attempts=attempts+1 WHERE prompt_id=?",
            (time.time(), prompt_id),
        )

    def log_event(self, prompt_id: str, seq: int, type_: str, data_json: str) -> None:
        self._pending_events.append((prompt_id, seq, type_, data_json))
        if len(self._pending_events) >= 2048:
            self.flush()

    def log_frame(self, prompt_id: str, seq: int, node: str, fmt: str, data: bytes) -> None:
        """An output image sent as a binary frame (SaveImageWebsocket), replayed after event ``seq``."""
        self._pending_frames.append((prompt_id, seq, node, fmt, data))

    def _write_pending(self) -> None:
        batch, self._pending_events = self._pending_events, []
        frames, self._pending_frames = self._pending_frames, []
        if batch:
            self.db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)", batch)
        if frames:
            self.db.executemany("INSERT OR REPLACE INTO frames VALUES (?, ?, ?, ?, ?)", frames)

    def flush(self) -> None:
        if self._pending_events or self._pending_frames:
            self.db.execute("BEGIN")
            self._write_pending()
            self.db.execute("COMMIT")

    def finish(self, prompt_id: str, status: str, history: dict, last_seq: int) -> None:
        """Write the history entry and every buffered event in one transaction."""
        self._history_order += 1
        self.db.execute("BEGIN")
        try:
            self._write_pending()
            self.db.execute(
                "UPDATE prompts SET status=?, history=?, finished=?, history_order=?, last_seq=? WHERE prompt_id=?",
                (status, json.dumps(history), time.time(), self._history_order, last_seq, prompt_id),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def requeue(self, prompt_id: str) -> None:
        self.db.execute("UPDATE prompts SET status='pending', started=NULL WHERE prompt_id=?", (prompt_id,))
        self.db.execute("DELETE FROM events WHERE prompt_id=?", (prompt_id,))
        self.db.execute("DELETE FROM frames WHERE prompt_id=?", (prompt_id,))

    def delete(self, prompt_ids: Iterable[str]) -> None:
        self.flush()
        ids = [(p,) for p in prompt_ids]
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM prompts WHERE prompt_id=?", ids)
        self.db.executemany("DELETE FROM events WHERE prompt_id=?", ids)
        self.db.executemany("DELETE FROM frames WHERE prompt_id=?", ids)
        self.db.execute("COMMIT")

    def clear_history(self) -> None:
        self.flush()
        self.db.execute("BEGIN")
        for table in ("events", "frames"):
            self.db.execute(
                f"DELETE FROM {table} WHERE prompt_id IN (SELECT prompt_id FROM prompts WHERE status "
                "IN ('success','error','interrupted'))"
            )
        self.db.execute("DELETE FROM prompts WHERE status IN ('success','error','interrupted')")
        self.db.execute("COMMIT")

    def trim_history(self, keep: int) -> None:
        rows = self.db.execute(
            "SELECT prompt_id FROM prompts WHERE history_order IS NOT NULL "
            "ORDER BY history_order DESC LIMIT -1 OFFSET ?",
            (keep,),
        ).fetchall()
        if rows:
            self.delete(r[0] for r in rows)

    # -- reads --------------------------------------------------------------------------------------
    def get(self, prompt_id: str) -> PromptRow | None:
        r = self.db.execute(f"SELECT {_COLS} FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return _row(r) if r else None

    def status_of(self, prompt_id: str) -> tuple[str, str, float] | None:
        """(status, body_hash, number) without decoding the stored JSON."""
        r = self.db.execute("SELECT status, body_hash, number FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return (r[0], r[1], r[2]) if r else None

    def unfinished(self) -> list[PromptRow]:
        rows = self.db.execute(
            f"SELECT {_COLS} FROM prompts WHERE status IN ('pending','running') ORDER BY number, prompt_id"
        ).fetchall()
        return [_row(r) for r in rows]

    def max_number(self) -> float:
        r = self.db.execute("SELECT MAX(number) FROM prompts").fetchone()
        return r[0] if r and r[0] is not None else -1

    def history(self, max_items: int | None = None, offset: int | None = None) -> list[PromptRow]:
        """Finished prompts oldest-first; ComfyUI's max_items/offset rules."""
        if offset is not None and offset >= 0:
            lim = max_items if max_items is not None else -1
            rows = self.db.execute(
                f"SELECT {_COLS} FROM prompts WHERE history_order IS NOT NULL ORDER BY history_order LIMIT ? OFFSET ?",
                (lim, offset),
            ).fetchall()
            return [_row(r) for r in rows]
        if max_items is not None:
            rows = self.db.execute(
                f"SELECT {_COLS} FROM prompts WHERE history_order IS NOT NULL ORDER BY history_order DESC LIMIT ?",
                (max_items,),
            ).fetchall()
            return [_row(r) for r in reversed(rows)]
        rows = self.db.execute(
            f"SELECT {_COLS} FROM prompts WHERE history_order IS NOT NULL ORDER BY history_order"
        ).fetchall()
        return [_row(r) for r in rows]

    def frames(self, prompt_id: str, since: int = 0) -> dict[int, tuple[str, str, bytes]]:
        self.flush()
        rows = self.db.execute(
            "SELECT seq, node, format, data FROM frames WHERE prompt_id=? AND seq>?", (prompt_id, since)
        ).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def last_event_seq(self, prompt_id: str) -> int:
        """The highest logged event sequence number of a prompt, 0 when it has none."""
        return self.db.execute("SELECT MAX(seq) FROM events WHERE prompt_id=?", (prompt_id,)).fetchone()[0] or 0

    def has_events_after(self, prompt_id: str, since: int) -> bool:
        """Whether the prompt has a logged event after sequence ``since`` (buffered events included)."""
        self.flush()
        row = self.db.execute("SELECT 1 FROM events WHERE prompt_id=? AND seq>? LIMIT 1", (prompt_id, since)).fetchone()
        return row is not None

    def events(self, prompt_id: str, since: int = 0) -> list[tuple[int, str, str]]:
        self.flush()
        return self.db.execute(
            "SELECT seq, type, data FROM events WHERE prompt_id=? AND seq>? ORDER BY seq", (prompt_id, since)
        ).fetchall()


def _lock_dir(path: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; run one server per data dir
        return None
    fd = os.open(path / "kiln.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreLocked(
            f"another Kiln server is using the data directory {str(path)!r}; stop it or pass a different --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def row_status(row: PromptRow | None) -> str:
    return row.status if row is not None else "unknown"


def as_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
