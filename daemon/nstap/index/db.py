"""The SQLite database of the index: one connection, in one thread, its schema and migrations.

SQLite calls are quick but blocking, so every one of them runs in the ``nstap-store`` thread
(:meth:`IndexDb.run`); the tables' owners (:mod:`.captures`, :mod:`.anomalies`, :mod:`.alerts`,
:mod:`.sessions`) give it their work as functions. The database and its WAL and shared-memory
files are 0600, tightened at every open if an older daemon left them wider.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ..threads import worker_threads

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id TEXT PRIMARY KEY,
    container TEXT NOT NULL DEFAULT '',
    container_id TEXT NOT NULL DEFAULT '',
    runtime TEXT NOT NULL DEFAULT '',
    netns INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    anomaly_id TEXT,
    mode TEXT NOT NULL DEFAULT '',
    trigger_at REAL NOT NULL DEFAULT 0,
    window_start REAL NOT NULL DEFAULT 0,
    window_end REAL NOT NULL DEFAULT 0,
    filter TEXT NOT NULL DEFAULT '',
    snaplen INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    file TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    packets INTEGER NOT NULL DEFAULT 0,
    pre_packets INTEGER NOT NULL DEFAULT 0,
    kernel_drops INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL,
    onset_at REAL,
    pre_truncated INTEGER NOT NULL DEFAULT 0,
    side TEXT NOT NULL DEFAULT 'container',
    interface TEXT NOT NULL DEFAULT '',
    evidence TEXT
);
CREATE INDEX IF NOT EXISTS captures_created ON captures (created_at);
CREATE TABLE IF NOT EXISTS anomalies (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    container TEXT NOT NULL,
    container_id TEXT NOT NULL,
    runtime TEXT NOT NULL,
    netns INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    resolved_at REAL,
    findings INTEGER NOT NULL DEFAULT 1,
    numbers TEXT NOT NULL DEFAULT '{}',
    summary TEXT NOT NULL DEFAULT '',
    capture_id TEXT,
    started_at REAL,
    cause TEXT NOT NULL DEFAULT 'unknown',
    cause_text TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS anomalies_first ON anomalies (first_seen);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,
    alertname TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    starts_at TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    capture_id TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS alerts_fp ON alerts (fingerprint, starts_at);
CREATE INDEX IF NOT EXISTS alerts_capture ON alerts (capture_id);
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (received_at);
CREATE TABLE IF NOT EXISTS uploads (
    capture_id TEXT PRIMARY KEY,
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    done TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS revoked_sessions (
    value TEXT PRIMARY KEY,
    issued_at REAL NOT NULL
);
"""
# Columns added since the first release: an index made by an older daemon gets them at open.
MIGRATIONS = {
    "captures": {
        "onset_at": "REAL",
        "pre_truncated": "INTEGER NOT NULL DEFAULT 0",
        "side": "TEXT NOT NULL DEFAULT 'container'",
        "interface": "TEXT NOT NULL DEFAULT ''",
        "evidence": "TEXT",
        "uploaded_at": "REAL",  # storage.s3: when every object of the capture was confirmed in the bucket
        "uploaded_objects": "TEXT NOT NULL DEFAULT ''",  # storage.s3: which ones (pcap,evidence,bundle,index)
    },
    "anomalies": {"started_at": "REAL", "cause": "TEXT NOT NULL DEFAULT 'unknown'", "cause_text": "TEXT NOT NULL DEFAULT ''"},
}


class IndexDb:
    """The index's SQLite database and the one thread every call to it runs in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = worker_threads("nstap-store")
        self._db: sqlite3.Connection | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the index's thread (where every SQLite call is made)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def open(self) -> None:
        """Open (creating) the database and bring its schema up to date (blocking: the index's thread)."""
        # Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the database's
        # mode); files an older daemon left with a wider mode are tightened.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for path in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            if path.exists():
                os.chmod(path, 0o600)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        for table, columns in MIGRATIONS.items():
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        self._db = db

    async def close(self) -> None:
        """Close the database and end its thread."""
        await self.run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def execute(self, sql: str, args: Iterable = ()) -> sqlite3.Cursor:
        """One statement (blocking: the index's thread)."""
        if self._db is None:
            raise sqlite3.ProgrammingError("the index is not open")
        return self._db.execute(sql, tuple(args))

    def fetch(self, sql: str, args: Iterable = ()) -> list[tuple]:
        """The rows of one query (blocking: the index's thread)."""
        return self.execute(sql, args).fetchall()

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and empty it (after a prune)."""
        self.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def file_bytes(self) -> int:
        """Bytes of the database file."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def folded_bytes(self) -> int:
        """Bytes the database file has once its write-ahead log is folded in (its pages as this
        connection sees them; blocking: the index's thread). At least the file's size now."""
        pages = self.fetch("PRAGMA page_count")[0][0]
        size = self.fetch("PRAGMA page_size")[0][0]
        return max(pages * size, self.file_bytes())

    def bytes(self) -> int:
        """Bytes of the index on disk: the database and its write-ahead log."""
        total = self.file_bytes()
        try:
            total += self.path.with_name(self.path.name + "-wal").stat().st_size
        except OSError:
            pass
        return total
