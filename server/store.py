"""Durable queue, history and per-prompt event log in one SQLite file (WAL mode).

One row per accepted prompt carries its whole life: pending -> running -> success | error | interrupted.
A prompt is written (and committed) before ``POST /prompt`` answers, so an accepted prompt survives any
crash. Finishing a prompt writes its history entry, status and last events in one transaction, so a
prompt is either finished (and never run again) or not. Events are buffered and written in batches;
:meth:`Store.flush` runs before anything reads them.

Also here: the quarantine of rows that cannot be read, the output-file journal of running prompts, the
leases of prompts handed to workers (renewed while the worker's heartbeats arrive) and the late-delivery
marks. Every SQL query of the server lives in this module (docs/ARCHITECTURE.md), which is why it is one
file.

All methods are called from the event loop thread, except ``add``/``mark_running`` with ``side=True``
(one huge row, written from a worker thread on a second connection). With ``synchronous=NORMAL`` in WAL mode
a commit survives the process being killed (SIGKILL); only a power loss can lose the last commits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine import KilnError

from .params import dumps as strict_dumps, dumps_in_pieces, finite

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
CREATE TABLE IF NOT EXISTS quarantine (
    prompt_id TEXT,
    reason TEXT NOT NULL,
    quarantined REAL NOT NULL,
    number, status, client_id, prompt, extra_data, outputs_to_execute, body_hash, created, started, finished,
    attempts, history, history_order, last_seq
);
CREATE TABLE IF NOT EXISTS output_files (
    prompt_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    tmp TEXT NOT NULL,
    PRIMARY KEY (prompt_id, node_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    prompt_id TEXT PRIMARY KEY,
    worker TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    granted REAL NOT NULL,
    heartbeat REAL NOT NULL,
    expires REAL NOT NULL
);
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
# the Jobs API's names for the stored statuses (ComfyUI's comfy_execution/jobs.py, plus "cancelled")
JOB_STATUS = {
    "pending": "pending",
    "running": "in_progress",
    "success": "completed",
    "error": "failed",
    "interrupted": "cancelled",
}
JOB_SORTS = {"created_at": "created", "execution_duration": "COALESCE(finished - started, 0)"}

_BAD_NUMBER = (
    "WHEN typeof(number) NOT IN ('real','integer') OR NOT (abs(number) <= ?) THEN 'queue number out of range' "
)
_SCAN_SQL = (
    "SELECT prompt_id, CASE "
    + _BAD_NUMBER
    + "WHEN status NOT IN ('pending','running','success','error','interrupted') THEN 'unknown status' "
    "WHEN typeof(prompt)!='text' OR NOT json_valid(prompt) THEN 'prompt is not JSON' "
    "WHEN typeof(extra_data)!='text' OR NOT json_valid(extra_data) THEN 'extra_data is not JSON' "
    "WHEN typeof(outputs_to_execute)!='text' OR NOT json_valid(outputs_to_execute) "
    "THEN 'outputs_to_execute is not JSON' "
    "WHEN history IS NOT NULL AND (typeof(history)!='text' OR NOT json_valid(history)) THEN 'history is not JSON' "
    "WHEN typeof(attempts)!='integer' OR typeof(last_seq)!='integer' THEN 'counters are not integers' "
    "ELSE NULL END AS why FROM prompts WHERE why IS NOT NULL"
)
_SCAN_NUMBERS_SQL = "SELECT prompt_id, CASE " + _BAD_NUMBER + "ELSE NULL END AS why FROM prompts WHERE why IS NOT NULL"


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


MAX_NUMBER = 2.0**53  # a queue number beyond this is not exact as a REAL (and not as a JSON number either)


def json_number(n: float) -> float | int:
    """A queue number as ComfyUI writes it: an int when it is whole (numbers are stored as REAL)."""
    return int(n) if float(n).is_integer() and abs(n) <= MAX_NUMBER else n


class DuplicatePrompt(KilnError, ValueError):
    """A prompt_id that is already stored."""


class UnreadableRow(KilnError, ValueError):
    """A stored prompt row that cannot be decoded (it is quarantined, never fatal)."""


_QCOLS = (
    "number, status, client_id, prompt, extra_data, outputs_to_execute, body_hash, created, started, finished, "
    "attempts, history, history_order, last_seq"
)
_COLS = (
    "prompt_id, number, status, client_id, prompt, extra_data, outputs_to_execute, body_hash, created, "
    "started, finished, attempts, history, last_seq"
)


def _row(r: tuple) -> PromptRow:
    try:
        return _decode_row(r)
    except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError, int limits, bad types
        raise UnreadableRow(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _decode_row(r: tuple) -> PromptRow:
    number = r[1]
    if not isinstance(number, (int, float)) or isinstance(number, bool) or not abs(number) <= MAX_NUMBER:
        raise ValueError(f"queue number {number!r} is out of range")
    row = PromptRow(
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
    if not isinstance(row.prompt, dict) or not isinstance(row.extra_data, dict):
        raise ValueError("prompt and extra_data must be JSON objects")
    if not isinstance(row.outputs_to_execute, list) or not (row.history is None or isinstance(row.history, dict)):
        raise ValueError("outputs_to_execute must be a list and history an object")
    return row


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
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(prompts)")}
        if "delivered" not in cols:  # a data dir from before late delivery: its prompts count as delivered
            self.db.execute("ALTER TABLE prompts ADD COLUMN delivered INTEGER NOT NULL DEFAULT 1")
        self.db.execute("CREATE INDEX IF NOT EXISTS prompts_undelivered ON prompts(client_id) WHERE delivered=0")
        self._pending_events: list[tuple[str, int, str, str]] = []
        self._pending_frames: list[tuple[str, int, str, str, bytes]] = []
        self.quarantined: list[tuple[str, str]] = []  # rows quarantined while reading (id, reason), for the log
        self._side: sqlite3.Connection | None = None
        self._side_lock = threading.Lock()
        row = self.db.execute("SELECT MAX(history_order) FROM prompts WHERE typeof(history_order)='integer'").fetchone()
        self._history_order = row[0] or 0

    def close(self) -> None:
        self.flush()
        self.db.close()
        with self._side_lock:
            if self._side is not None:
                self._side.close()
                self._side = None
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
        prompt_text: str | None = None,
        side: bool = False,
    ) -> None:
        """Insert a pending prompt; ``prompt_text`` is ``prompt`` already encoded (by a worker thread).

        ``side``: on the side connection, for a huge prompt written from a worker thread (see ``_writer``).
        Raises :class:`DuplicatePrompt` if the prompt_id is taken."""
        with self._writer(side) as db, _duplicate_as(prompt_id):
            db.execute(
                "INSERT INTO prompts (prompt_id, number, status, client_id, prompt, extra_data, outputs_to_execute, "
                "body_hash, created, delivered) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, 0)",
                (
                    prompt_id,
                    number,
                    client_id,
                    prompt_text if prompt_text is not None else encode(prompt),
                    encode(extra_data),
                    encode(outputs),
                    body_hash,
                    time.time(),
                ),
            )

    def mark_running(self, prompt_id: str, side: bool = False) -> None:
        """``side``: from a worker thread on the side connection (a huge row is rewritten: slow)."""
        with self._writer(side) as db:
            db.execute(
                "UPDATE prompts SET status='running', started=?, attempts=attempts+1 WHERE prompt_id=?",
                (time.time(), prompt_id),
            )

    @contextmanager
    def _writer(self, side: bool):
        """The loop's connection, or the side connection (under its lock) for one write of a huge row.

        Writing a multi-megabyte row takes a good part of a second; done on the loop thread it would hold
        every other client meanwhile. The side connection lets a worker thread do it (WAL: one writer at a
        time, the other waits on the busy timeout). Only single autocommit statements go through it.
        """
        if not side:
            yield self.db
            return
        with self._side_lock:
            if self._side is None:
                self._side = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._side.execute("PRAGMA synchronous=NORMAL")
                self._side.execute("PRAGMA busy_timeout=30000")
            yield self._side

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

    def finish(self, prompt_id: str, status: str, history: dict | str, last_seq: int, delivered: bool = True) -> None:
        """Write the history entry (an object, or its encoded text) and every buffered event in one
        transaction; the prompt's output file records go (its files are final). ``delivered``: a socket of its
        client got the final events."""
        self._history_order += 1
        self.db.execute("BEGIN")
        try:
            self._write_pending()
            self.db.execute(
                "UPDATE prompts SET status=?, history=?, finished=?, history_order=?, last_seq=?, delivered=? "
                "WHERE prompt_id=?",
                (
                    status,
                    history if isinstance(history, str) else encode(history),
                    time.time(),
                    self._history_order,
                    last_seq,
                    int(delivered),
                    prompt_id,
                ),
            )
            self.db.execute("DELETE FROM output_files WHERE prompt_id=?", (prompt_id,))
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
        self.db.executemany("DELETE FROM output_files WHERE prompt_id=?", ids)
        self.db.execute("COMMIT")

    # -- unreadable rows ----------------------------------------------------------------------------
    def quarantine(self, prompt_id: str, reason: str) -> None:
        """Move a prompt row that cannot be read into the ``quarantine`` table (kept for inspection)."""
        self.flush()
        self.db.execute("BEGIN")
        try:
            self.db.execute(
                f"INSERT INTO quarantine (prompt_id, reason, quarantined, {_QCOLS}) "
                f"SELECT prompt_id, ?, ?, {_QCOLS} FROM prompts WHERE prompt_id=?",
                (reason, time.time(), prompt_id),
            )
            for table in ("prompts", "events", "frames", "output_files"):
                self.db.execute(f"DELETE FROM {table} WHERE prompt_id=?", (prompt_id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def quarantine_unreadable(self) -> list[tuple[str, str]]:
        """Quarantine every row whose number, status or JSON columns cannot be read; returns (id, reason).
        Rows that pass this scan but still fail to decode are quarantined when read (``_rows``)."""
        try:
            bad = self.db.execute(_SCAN_SQL, (MAX_NUMBER,)).fetchall()
        except sqlite3.OperationalError:  # an SQLite without json_valid(): the numbers only
            bad = self.db.execute(_SCAN_NUMBERS_SQL, (MAX_NUMBER,)).fetchall()
        found = [(str(r[0]), str(r[1])) for r in bad]
        for pid, why in found:
            self.quarantine(pid, why)
        return found

    def _rows(self, rows: list[tuple]) -> list[PromptRow]:
        """Decode rows, quarantining any that cannot be read (a corrupt row is never fatal)."""
        out = []
        for r in rows:
            try:
                out.append(_row(r))
            except UnreadableRow as exc:
                self.quarantine(r[0], str(exc))
                self.quarantined.append((str(r[0]), str(exc)))
        return out

    # -- output files of a running prompt -----------------------------------------------------------
    def output_files(self, prompt_id: str) -> dict[tuple[str, int], tuple[str, str]]:
        """(node_id, index) -> (path, temporary path) of the output files recorded for a prompt."""
        rows = self.db.execute("SELECT node_id, idx, path, tmp FROM output_files WHERE prompt_id=?", (prompt_id,))
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    def record_output_file(self, prompt_id: str, node_id: str, idx: int, path: str, tmp: str) -> None:
        """Record (and commit) an output file before it is moved into place."""
        self.db.execute(
            "INSERT OR REPLACE INTO output_files VALUES (?, ?, ?, ?, ?)", (prompt_id, node_id, idx, path, tmp)
        )

    # -- leases of prompts handed to workers ----------------------------------------------------------
    def grant_lease(self, prompt_id: str, worker: str, attempt: int, ttl: float) -> None:
        """A worker took ``prompt_id``: its lease runs ``ttl`` seconds unless renewed."""
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)", (prompt_id, worker, attempt, now, now, now + ttl)
        )

    def renew_leases(self, prompt_ids: Iterable[str], ttl: float) -> None:
        """Heartbeats arrived for these prompts' workers: push their leases ``ttl`` seconds on (one commit)."""
        now = time.time()
        self.db.executemany(
            "UPDATE leases SET heartbeat=?, expires=? WHERE prompt_id=?", [(now, now + ttl, p) for p in prompt_ids]
        )

    def release_lease(self, prompt_id: str) -> None:
        self.db.execute("DELETE FROM leases WHERE prompt_id=?", (prompt_id,))

    def leases(self) -> list[dict]:
        """Every lease held now: prompt_id, worker, attempt, granted, heartbeat, expires (Unix times)."""
        rows = self.db.execute("SELECT prompt_id, worker, attempt, granted, heartbeat, expires FROM leases")
        keys = ("prompt_id", "worker", "attempt", "granted", "heartbeat", "expires")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def clear_leases(self) -> list[dict]:
        """Drop the leases a stopped server left (their prompts are recovered by status); returns them."""
        old = self.leases()
        self.db.execute("DELETE FROM leases")
        return old

    # -- late delivery ------------------------------------------------------------------------------
    def undelivered(self, client_id: str, since: float) -> list[str]:
        """Prompts of ``client_id`` finished after ``since`` whose final events no socket of it got."""
        rows = self.db.execute(
            "SELECT prompt_id FROM prompts WHERE client_id=? AND delivered=0 AND finished>=? "
            "AND history_order IS NOT NULL ORDER BY history_order",
            (client_id, since),
        ).fetchall()
        return [r[0] for r in rows]

    def mark_delivered(self, prompt_ids: list[str]) -> None:
        self.db.executemany("UPDATE prompts SET delivered=1 WHERE prompt_id=?", [(p,) for p in prompt_ids])

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
        rows = self._rows([r]) if r else []
        return rows[0] if rows else None

    def status_of(self, prompt_id: str) -> tuple[str, str, float] | None:
        """(status, body_hash, number) without decoding the stored JSON."""
        r = self.db.execute("SELECT status, body_hash, number FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return (r[0], r[1], r[2]) if r else None

    def unfinished(self) -> list[PromptRow]:
        rows = self.db.execute(
            f"SELECT {_COLS} FROM prompts WHERE status IN ('pending','running') ORDER BY number, prompt_id"
        ).fetchall()
        return self._rows(rows)

    def max_number(self) -> float:
        """The highest queue number in use (finite numbers only), -1 when there is none."""
        r = self.db.execute(
            "SELECT MAX(number) FROM prompts WHERE typeof(number) IN ('real','integer') AND abs(number) <= ?",
            (MAX_NUMBER,),
        ).fetchone()
        return r[0] if r and r[0] is not None else -1

    def history(self, max_items: int | None = None, offset: int | None = None) -> list[PromptRow]:
        """Finished prompts oldest-first; ComfyUI's max_items/offset rules."""
        if offset is not None and offset >= 0:
            lim = max_items if max_items is not None else -1
            rows = self.db.execute(
                f"SELECT {_COLS} FROM prompts WHERE history_order IS NOT NULL ORDER BY history_order LIMIT ? OFFSET ?",
                (lim, offset),
            ).fetchall()
            return self._rows(rows)
        if max_items is not None:
            rows = self.db.execute(
                f"SELECT {_COLS} FROM prompts WHERE history_order IS NOT NULL ORDER BY history_order DESC LIMIT ?",
                (max_items,),
            ).fetchall()
            return self._rows(rows[::-1])
        rows = self.db.execute(
            f"SELECT {_COLS} FROM prompts WHERE history_order IS NOT NULL ORDER BY history_order"
        ).fetchall()
        return self._rows(rows)

    def history_texts(self, max_items: int | None = None, offset: int | None = None) -> list[tuple[str, str]]:
        """``history`` as (prompt id, stored JSON text) pairs: an answer can be built from them without
        decoding and re-encoding graphs (a huge one costs a good part of a second each way)."""
        base = "SELECT prompt_id, history FROM prompts WHERE history_order IS NOT NULL AND history IS NOT NULL"
        if offset is not None and offset >= 0:
            lim = max_items if max_items is not None else -1
            return self.db.execute(f"{base} ORDER BY history_order LIMIT ? OFFSET ?", (lim, offset)).fetchall()
        if max_items is not None:
            rows = self.db.execute(f"{base} ORDER BY history_order DESC LIMIT ?", (max_items,)).fetchall()
            return rows[::-1]
        return self.db.execute(f"{base} ORDER BY history_order").fetchall()

    def history_text(self, prompt_id: str) -> str | None:
        r = self.db.execute("SELECT history FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return r[0] if r else None

    def jobs(
        self,
        statuses: Iterable[str],
        workflow_id: str | None = None,
        sort_by: str = "created_at",
        descending: bool = True,
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[list[JobRow], int]:
        """One page of prompts with the given stored statuses, and how many there are in all.

        ``sort_by`` is a key of ``JOB_SORTS``; ties keep the queue order. Read from the store, so the list
        is the same after a restart."""
        statuses = list(statuses)
        if not statuses:
            return [], 0
        where = f"status IN ({', '.join('?' * len(statuses))})"
        args: list[Any] = list(statuses)
        if workflow_id is not None:
            where += " AND json_extract(extra_data, '$.extra_pnginfo.workflow.id') = ?"
            args.append(workflow_id)
        total = self.db.execute(f"SELECT COUNT(*) FROM prompts WHERE {where}", args).fetchone()[0]
        order = "DESC" if descending else "ASC"
        rows = self.db.execute(
            "SELECT prompt_id, number, status, created, started, finished, "
            "json_extract(extra_data, '$.create_time'), json_extract(extra_data, '$.extra_pnginfo.workflow.id'), "
            "json_extract(history, '$.outputs'), json_extract(history, '$.status.messages') "
            f"FROM prompts WHERE {where} ORDER BY {JOB_SORTS[sort_by]} {order}, number {order}, prompt_id "
            "LIMIT ? OFFSET ?",
            [*args, -1 if limit is None else limit, offset],
        ).fetchall()
        out = [
            JobRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], _json_or_none(r[8]), _json_or_none(r[9]))
            for r in rows
        ]
        return out, total

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


@dataclass
class JobRow:
    """What the Jobs API lists about one prompt, read without decoding its graph."""

    prompt_id: str
    number: float
    status: str  # the stored status (pending, running, success, error, interrupted)
    created: float
    started: float | None
    finished: float | None
    create_time: Any  # extra_data.create_time (ms), as the client's graph editor reads it
    workflow_id: Any  # extra_data.extra_pnginfo.workflow.id
    outputs: dict | None
    messages: list | None


def _json_or_none(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


@contextmanager
def _duplicate_as(prompt_id: str):
    try:
        yield
    except sqlite3.IntegrityError:
        raise DuplicatePrompt(f"prompt_id {prompt_id!r} is already stored") from None


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
    """Compact strict JSON for the event log and the wire (NaN and infinities as null)."""
    return strict_dumps(obj)


def encode(obj: Any, in_pieces: bool = False) -> str:
    """Strict JSON for a stored column; ASCII-only, so any string SQLite is given is valid UTF-8.
    ``in_pieces``: a large object, encoded item by item so the loop thread is never held for long."""
    dumps = dumps_in_pieces if in_pieces else json.dumps
    try:
        return dumps(obj, allow_nan=False)
    except ValueError:
        return dumps(finite(obj), allow_nan=False)
